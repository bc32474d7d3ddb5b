"""Models over paired halves of an image (H2 instance retrieval): a dual encoder and a
cross-encoder.

``PairDual(tower_a, tower_b, dim, metric)``: two zoo models, one per half, whose classifier
(their ``feature_path`` Linear) is replaced by a projection to ``dim``; ``forward(xa, xb)``
returns ``(emb_a, emb_b)`` for the retrieval task (query = top half, gallery = bottom half).
Taps ``tower_a.<feature_path>`` / ``tower_b.<feature_path>`` (:attr:`PairDual.taps`) hold the
raw embeddings. ``metric``:

- ``"cosine"``: the outputs are the raw embeddings; the losses and the task use the cosine
  (``similarity = "cosine"``);
- ``"gssf"``: a learnable :class:`~crossdistill.losses.gssf.GSSF` metric ``s(x, y) = x^T M
  y`` on unit embeddings; the outputs are ``(unit a, M unit b)``, whose dot product is
  ``s`` (``similarity = "dot"``: ITC with ``similarity: dot``, the retrieval task with
  ``similarity: dot``).

``CrossEncoder``: one small pre-norm transformer over both halves' patch tokens; each token
is a patch embedding + a position embedding (shared by the halves, which have the same
grid) + a segment embedding (0: top, 1: bottom), with a class token in front; a linear head
on the final class token gives one relevance score per pair. Inputs:

- ``xa`` (B, C, h, w), ``xb`` (B', C, h, w): the (B, B') matrix of every ``a_i`` against
  every ``b_j`` (in-batch candidates: the score matrix that the ranking losses distil);
- ``xa``, ``xb`` (B, K, C, h, w): the (B, K) scores of aligned candidate lists (the
  ``rerank`` task's lists).

Pairs are scored in chunks of ``chunk`` sequences (memory); the patch embedding of each
half runs once per image.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import MODELS
from ..schema import Count, Depth, ImgSize, Width
from .mlp import replace_head, tag, to_hw
from .vit import Block, PatchEmbed, check_patch

METRICS = ("cosine", "gssf")


class PairDual(nn.Module):
    def __init__(self, tower_a: nn.Module, tower_b: nn.Module, dim: int,
                 metric: str = "cosine", groups: int = 8):
        super().__init__()
        if metric not in METRICS:
            raise ConfigError("metric", metric, f"one of {', '.join(METRICS)}")
        for name, tower in (("tower_a", tower_a), ("tower_b", tower_b)):
            replace_head(tower, lambda head: nn.Linear(head.in_features, dim), name)
        self.tower_a, self.tower_b, self.dim, self.metric = tower_a, tower_b, dim, metric
        self.taps = [f"tower_a.{tower_a.feature_path}", f"tower_b.{tower_b.feature_path}"]
        self.similarity = "dot" if metric == "gssf" else "cosine"
        if metric == "gssf":
            from ..losses.gssf import GSSF

            self.gssf = GSSF(dim, groups)

    def io(self, a: str = "xa", b: str = "xb") -> dict:
        return {"inputs": {"xa": a, "xb": b}}

    def forward(self, xa: Tensor, xb: Tensor):
        ea, eb = self.tower_a(xa), self.tower_b(xb)
        if self.metric == "gssf":
            return F.normalize(ea, dim=-1), self.gssf.transform(F.normalize(eb, dim=-1))
        return ea, eb


class CrossEncoder(nn.Module):
    def __init__(self, half_hw: tuple[int, int], in_channels: int = 1, patch: int = 7,
                 dim: int = 32, depth: int = 1, heads: int = 2, mlp_ratio: float = 2.0,
                 stem: tuple[int, ...] = (), chunk: int = 4096):
        super().__init__()
        n = check_patch(half_hw, patch)
        if dim % heads:
            raise ConfigError("heads", heads, f"a divisor of dim ({dim})")
        self.half_hw, self.in_channels, self.tokens_per_half = tuple(half_hw), in_channels, n
        layers, prev = [], in_channels
        for c in stem:  # a convolutional stem before the patches (Xiao et al., 2021)
            layers += [nn.Conv2d(prev, c, 3, padding=1), nn.GELU()]
            prev = c
        self.stem = nn.Sequential(*layers)
        self.patch_embed = PatchEmbed(prev, dim, patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, n, dim))
        self.segment = nn.Parameter(torch.zeros(2, 1, dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 1)
        self.chunk = int(chunk)
        for p in (self.pos_embed, self.segment, self.cls_token):
            nn.init.trunc_normal_(p, std=0.02)

    def io(self, a: str = "xa", b: str = "xb") -> dict:
        return {"inputs": {"xa": a, "xb": b}}

    def half_tokens(self, x: Tensor, segment: int) -> Tensor:
        """(N, T, D) tokens of N halves: patch + position + segment embedding."""
        return self.patch_embed(self.stem(x)) + self.pos_embed + self.segment[segment]

    def score_tokens(self, ta: Tensor, tb: Tensor) -> Tensor:
        """Scores (N,) of aligned token sequences (N, T, D) each."""
        out = []
        for s in range(0, len(ta), self.chunk):
            a, b = ta[s:s + self.chunk], tb[s:s + self.chunk]
            x = torch.cat([self.cls_token.expand(len(a), -1, -1), a, b], dim=1)
            out.append(self.head(self.norm(self.blocks(x))[:, 0]).squeeze(-1))
        return torch.cat(out)

    def _check(self, x: Tensor, name: str, dims: int) -> None:
        want = (self.in_channels, *self.half_hw)
        if x.dim() != dims or tuple(x.shape[-3:]) != want:
            raise ConfigError(f"model.{name}", tuple(x.shape),
                              f"halves of shape {want}: (B, C, h, w) for the in-batch matrix "
                              "or (B, K, C, h, w) for candidate lists, both the same")

    def forward(self, xa: Tensor, xb: Tensor) -> Tensor:
        dims = xa.dim()
        self._check(xa, "xa", dims if dims in (4, 5) else 4)
        self._check(xb, "xb", dims)
        if dims == 5:  # aligned candidate lists
            if xa.shape[:2] != xb.shape[:2]:
                raise ConfigError("model.xb", tuple(xb.shape),
                                  f"candidate lists of xa's (B, K) = {tuple(xa.shape[:2])}")
            b, k = xa.shape[:2]
            ta = self.half_tokens(xa.flatten(0, 1), 0)
            tb = self.half_tokens(xb.flatten(0, 1), 1)
            return self.score_tokens(ta, tb).view(b, k)
        ta, tb = self.half_tokens(xa, 0), self.half_tokens(xb, 1)
        n, m = len(ta), len(tb)
        ia = torch.arange(n, device=xa.device).repeat_interleave(m)
        ib = torch.arange(m, device=xa.device).repeat(n)
        return self.score_tokens(ta[ia], tb[ib]).view(n, m)


class FusionEncoder(nn.Module):
    """A cross-encoder on two CNN towers (METER's shape: one encoder per side, then a fusion
    transformer over both sides' tokens). Each tower's last stage map (captured by a forward
    hook on ``stages[-1]``) is average-pooled to a ``grid`` of tokens, projected to ``dim``,
    given a position and a segment embedding, and the fusion blocks run on every pair's
    ``2 * grid`` tokens; the score is a linear head on the tokens' mean plus, when
    ``residual``, ``scale * cos(e_a, e_b)`` of the towers' own pooled embeddings (a
    bi-encoder prior that the fusion corrects; ``scale`` is learned, init 1 / 0.05; the head
    starts at zero, so the fusion starts silent). ``freeze_towers``: the towers (e.g. a
    trained dual encoder's) stay fixed, BatchNorm statistics included. Inputs
    as :class:`CrossEncoder`'s: in-batch halves give the (B, B') matrix, aligned lists the
    (B, K) scores; the towers run once per half."""

    def __init__(self, tower_a: nn.Module, tower_b: nn.Module, emb: int, dim: int = 32,
                 depth: int = 1, heads: int = 2, grid: tuple[int, int] = (2, 4),
                 mlp_ratio: float = 2.0, residual: bool = True, freeze_towers: bool = False,
                 chunk: int = 4096):
        super().__init__()
        if dim % heads:
            raise ConfigError("heads", heads, f"a divisor of dim ({dim})")
        for name, tower in (("tower_a", tower_a), ("tower_b", tower_b)):
            replace_head(tower, lambda head: nn.Linear(head.in_features, emb), name)
            if not getattr(tower, "stages", None):
                raise ConfigError(name, type(tower).__name__, "a zoo model with `stages`")
        self.tower_a, self.tower_b = tower_a, tower_b
        self.taps = [f"tower_a.{tower_a.feature_path}", f"tower_b.{tower_b.feature_path}"]
        self.grid = tuple(grid)
        n = self.grid[0] * self.grid[1]
        chans = []
        for tower in (tower_a, tower_b):
            stage = tower.get_submodule(tower.stages[-1])
            stage.register_forward_hook(_keep_map)
            chans.append(_out_channels(stage))
        self.proj = nn.ModuleList([nn.Linear(c, dim) for c in chans])
        self.pos_embed = nn.Parameter(torch.zeros(1, n, dim))
        self.segment = nn.Parameter(torch.zeros(2, 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 1)
        self.residual = bool(residual)
        self.log_scale = nn.Parameter(torch.tensor(math.log(20.0)), requires_grad=residual)
        self.chunk = int(chunk)
        for p in (self.pos_embed, self.segment):
            nn.init.trunc_normal_(p, std=0.02)
        if residual:  # the fusion starts silent: the score is the towers' scaled cosine
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.freeze_towers = bool(freeze_towers)
        if freeze_towers:
            for p in [*tower_a.parameters(), *tower_b.parameters()]:
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_towers:  # frozen towers keep their BatchNorm statistics
            self.tower_a.eval()
            self.tower_b.eval()
        return self

    def io(self, a: str = "xa", b: str = "xb") -> dict:
        return {"inputs": {"xa": a, "xb": b}}

    def encode(self, x: Tensor, side: int) -> tuple[Tensor, Tensor]:
        """(tokens (N, T, D), unit embeddings (N, E)) of N halves of one side."""
        tower = self.tower_a if side == 0 else self.tower_b
        stage = tower.get_submodule(tower.stages[-1])
        e = tower(x)
        fmap = stage.__dict__.pop("_last_map")
        tok = F.adaptive_avg_pool2d(fmap, self.grid).flatten(2).transpose(1, 2)
        tok = self.proj[side](tok) + self.pos_embed + self.segment[side]
        return tok, F.normalize(e, dim=-1)

    def _encode_list(self, x: Tensor, side: int) -> tuple[Tensor, Tensor]:
        """``encode`` of (B, K, ...) lists, flattened; a list that repeats one item (the
        query of a re-ranking list) is encoded once per row (the same values, less work)."""
        b, k = x.shape[:2]
        if k > 1 and bool((x == x[:, :1]).all()):
            tok, e = self.encode(x[:, 0], side)
            return (tok.repeat_interleave(k, 0), e.repeat_interleave(k, 0))
        return self.encode(x.flatten(0, 1), side)

    def fuse(self, ta: Tensor, tb: Tensor) -> Tensor:
        out = []
        for s in range(0, len(ta), self.chunk):
            x = torch.cat([ta[s:s + self.chunk], tb[s:s + self.chunk]], dim=1)
            out.append(self.head(self.norm(self.blocks(x)).mean(1)).squeeze(-1))
        return torch.cat(out)

    def forward(self, xa: Tensor, xb: Tensor) -> Tensor:
        if xa.dim() != xb.dim() or xa.dim() not in (4, 5):
            raise ConfigError("model.xb", (tuple(xa.shape), tuple(xb.shape)),
                              "halves (B, C, h, w) each, or aligned lists (B, K, C, h, w)")
        scale = self.log_scale.exp() if self.residual else 0.0
        if xa.dim() == 5:
            if xa.shape[:2] != xb.shape[:2]:
                raise ConfigError("model.xb", tuple(xb.shape),
                                  f"candidate lists of xa's (B, K) = {tuple(xa.shape[:2])}")
            b, k = xa.shape[:2]
            (ta, ea), (tb, eb) = self._encode_list(xa, 0), self._encode_list(xb, 1)
            return (self.fuse(ta, tb) + scale * (ea * eb).sum(-1)).view(b, k)
        (ta, ea), (tb, eb) = self.encode(xa, 0), self.encode(xb, 1)
        n, m = len(ta), len(tb)
        ia = torch.arange(n, device=xa.device).repeat_interleave(m)
        ib = torch.arange(m, device=xa.device).repeat(n)
        return self.fuse(ta[ia], tb[ib]).view(n, m) + scale * ea @ eb.T


def _keep_map(module: nn.Module, _inputs, output: Tensor) -> None:
    """Forward hook: keep a tower stage's output map on the stage (read once by
    :meth:`FusionEncoder.encode`); a plain attribute, so copies of the model work."""
    module.__dict__["_last_map"] = output


def _out_channels(stage: nn.Module) -> int:
    convs = [m for m in stage.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ConfigError("tower", type(stage).__name__, "a last stage with a Conv2d")
    return convs[-1].out_channels


def _half_hw(img_size, split: str = "rows") -> tuple[int, int]:
    h, w = to_hw(img_size)
    if h % 2:
        raise ConfigError("img_size", img_size, "an even number of rows (two halves)")
    return h // 2, w


@MODELS.register(
    "pair-dual",
    family="dual",
    description="two zoo towers (top half, bottom half) projected into one embedding space; "
    "cosine or a learnable GSSF metric",
    paper="Radford et al., Learning Transferable Visual Models From Natural Language "
    "Supervision, 2021 (dual encoder); Diao et al., GSSF, 2024 (metric)",
)
def pair_dual(
    *,
    num_classes: Count = 10,
    in_channels: Width = 1,
    img_size: ImgSize | tuple[ImgSize, ImgSize] = 28,
    tower: str = "cnn",
    channels: Width | tuple[Width, ...] = (16, 32),
    dim: Width = 64,
    metric: Literal["cosine", "gssf"] = "cosine",
    groups: Width = 8,
) -> nn.Module:
    """``img_size`` is the whole image's; each tower sees one half (``img_size`` rows / 2).
    ``tower``: a zoo model name (``channels`` passed where it takes them); ``num_classes``
    only sizes the classifier that the projection replaces."""
    from . import create

    if tower in ("pair-dual", "pair-cross"):
        raise ConfigError("tower", tower, "an image model of the zoo")
    hw = _half_hw(img_size)
    kw = {"channels": channels} if tower in ("cnn",) else {}
    towers = [create(tower, field="tower", num_classes=num_classes,
                     in_channels=in_channels, img_size=hw, **kw) for _ in range(2)]
    model = PairDual(*towers, dim, metric, groups)
    stages = [f"tower_a.{s}" for s in getattr(towers[0], "stages", [])]
    return tag(model, family="dual", stages=stages, feature_path=model.taps[0])


@MODELS.register(
    "pair-cross",
    family="transformer",
    description="a cross-encoder: one small transformer over both halves' patches "
    "(segment embeddings), one score per pair",
    paper="Kim et al., ViLT: Vision-and-Language Transformer Without Convolution or Region "
    "Supervision, 2021 (single-stream cross-encoder)",
)
def pair_cross(
    *,
    num_classes: Count = 1,
    in_channels: Width = 1,
    img_size: ImgSize | tuple[ImgSize, ImgSize] = 28,
    patch: ImgSize = 7,
    dim: Width = 32,
    depth: Depth = 1,
    heads: Depth = 2,
    mlp_ratio: float = 2.0,
    stem: tuple[Width, ...] = (),
    chunk: Count = 4096,
) -> nn.Module:
    """``img_size`` is the whole image's (each half: ``img_size`` rows / 2); ``num_classes``
    is ignored (one score per pair); ``stem``: the channels of 3 x 3 conv + GELU layers run
    on each half before the patch embedding (empty: a plain ViT patch embedding)."""
    if not 0 < float(mlp_ratio) <= 16:
        raise ConfigError("mlp_ratio", mlp_ratio, "a ratio in (0, 16]")
    model = CrossEncoder(_half_hw(img_size), in_channels, patch, dim, depth, heads,
                         float(mlp_ratio), tuple(stem), chunk)
    return tag(model, family="transformer",
               stages=[f"blocks.{i}" for i in range(depth)], feature_path="head")


@MODELS.register(
    "pair-fusion",
    family="transformer",
    description="a cross-encoder: two CNN towers, a fusion transformer over both halves' "
    "tokens (segment embeddings), one score per pair (+ the towers' cosine as a prior)",
    paper="Dou et al., An Empirical Study of Training End-to-End Vision-and-Language "
    "Transformers (METER), 2022",
)
def pair_fusion(
    *,
    num_classes: Count = 10,
    in_channels: Width = 1,
    img_size: ImgSize | tuple[ImgSize, ImgSize] = 28,
    tower: str = "cnn",
    channels: Width | tuple[Width, ...] = (32, 64, 64),
    emb: Width = 64,
    dim: Width = 32,
    depth: Depth = 1,
    heads: Depth = 2,
    grid: tuple[ImgSize, ImgSize] = (2, 4),
    residual: bool = True,
    freeze_towers: bool = False,
    chunk: Count = 4096,
) -> nn.Module:
    """Towers as ``pair-dual``'s (so a trained ``pair-dual`` initialises them: its
    ``tower_a`` / ``tower_b`` weights load by name); ``emb``: the towers' embedding size."""
    from . import create

    hw = _half_hw(img_size)
    kw = {"channels": channels} if tower in ("cnn",) else {}
    towers = [create(tower, field="tower", num_classes=num_classes, in_channels=in_channels,
                     img_size=hw, **kw) for _ in range(2)]
    model = FusionEncoder(*towers, emb, dim, depth, heads, tuple(grid), 2.0, residual,
                          freeze_towers, chunk)
    return tag(model, family="transformer", stages=[f"blocks.{i}" for i in range(depth)],
               feature_path="head")
