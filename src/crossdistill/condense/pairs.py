"""The condensation harness extended to image-text pairs (multimodal dataset distillation).

A pair condenser learns ``N`` synthetic pairs instead of ``ipc`` labelled images per class:
an *image* side in the real data's (normalised) pixel space, read through a frozen image
encoder, and a *text* side directly in the frozen text encoder's embedding space (as in the
vision-language distillation literature, where captions are learned as sentence embeddings),
optionally with an ``N x N`` soft similarity target. What the pairs train are two
**projection heads** (the "student"), one per side, on top of the frozen encoders; they are
judged by **retrieval** on a real gallery, recall@1/5/10 both ways.

Pieces (each used the same way by every method, baselines included):

* :class:`PairEncoders`: the frozen image encoder (features from a forward hook on a module
  path, a :class:`~crossdistill.taps.Tap`; gradients flow to the input pixels) and the frozen
  text encoder that embeds the real text side once (``None`` when the text side already is
  an embedding).
* :class:`RealPairs`: the real training pairs (image pixels + text embeddings) and their
  cached image features; :func:`h2_pairs` builds the H2 setting (top half <-> bottom half of
  the same digit image).
* :class:`DualHeads` / :class:`ProjectionHead`: the trainable heads (the official code's
  ProjectionHead: Linear -> GELU -> Linear -> dropout, residual, LayerNorm) and a fixed logit
  scale ``1 / temperature``.
* :func:`infonce` (CLIP's symmetric loss, identity target) and :func:`wbce` (the weighted
  binary cross-entropy to a soft similarity target of LoRS and RepBlend).
* :func:`record_pair_experts`: expert trajectories of the heads on the real pairs (InfoNCE,
  plain SGD), the parameters after every epoch; cached in memory, and to disk with
  :func:`save_experts` / :func:`load_experts`.
* :class:`PairCondenser` (``init / step / synthetic``, like
  :class:`~crossdistill.condense.base.Condenser`) and :func:`synthesize_pairs`; baselines
  :func:`random_pairs` (random real pairs of the same ``N``) and :func:`full_pairs`.
* :func:`evaluate_pairs`: the evaluation protocol, equal for every set: fresh heads (seeded)
  trained on the set *only* (its features precomputed through the frozen encoder; its own
  loss: ``wbce`` to its similarity target when it has one, else ``infonce``), SGD momentum
  0.9, weight decay 5e-4, lr x0.1 at half the steps, full batch up to ``batch_size``; the
  lr (from ``candidates``) and the step (every ``eval_every``) are chosen on the *val*
  gallery's mean recall, and the test gallery is read once, for the chosen heads. (The
  official RepBlend/LoRS evaluation keeps the best epoch *on the test set*; we do not.)

Metric names: ``tr@k`` = image -> text retrieval (the image is the query), ``ir@k`` =
text -> image, ``r_mean`` = the mean of the six recalls (the official ``r_mean``).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..io import load_weights, save_weights
from ..losses.similarity import clip_loss
from ..schema import Count, Fraction, Pos, Seed, Width
from ..taps import Capture, Tap
from ..tasks.retrieval import recall_at_k
from .base import MemoryMeter

PAIR_LOSSES = ("infonce", "wbce")
BRANCHES = ("image", "text")


# -- the synthetic pairs ------------------------------------------------------------------------
@dataclass
class PairSet:
    """A condensed set of image-text pairs.

    ``image`` (N, C, H, W) image-side inputs in the real data's normalised pixel space;
    ``text`` (N, D) text-side embeddings (the frozen text encoder's output space); ``sim``
    optional (N, N) soft similarity target (``None``: the identity, pair i matches only text
    i); ``loss`` the loss the evaluation trains heads with (``"infonce"`` for hard pairs,
    ``"wbce"`` for a soft target); ``meta`` method, N, synthesis seconds, ``stored_numbers``.
    """

    image: Tensor
    text: Tensor
    sim: Tensor | None = None
    loss: str = "infonce"
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.image)
        if self.text.dim() != 2 or len(self.text) != n:
            raise ConfigError("pairs.text", tuple(self.text.shape), f"(N={n}, D) embeddings")
        if self.sim is not None and tuple(self.sim.shape) != (n, n):
            raise ConfigError("pairs.sim", tuple(self.sim.shape), f"an ({n}, {n}) matrix")
        if self.loss not in PAIR_LOSSES:
            raise ConfigError("pairs.loss", self.loss, f"allowed: {', '.join(PAIR_LOSSES)}")
        if self.loss == "infonce" and self.sim is not None:
            raise ConfigError("pairs.loss", self.loss, "'wbce' for a set with a soft target")

    def __len__(self) -> int:
        return len(self.image)

    def target(self) -> Tensor:
        """The (N, N) similarity target (the identity when the set has none)."""
        return self.sim if self.sim is not None else torch.eye(len(self))

    def save(self, path: str | os.PathLike) -> Path:
        """Safetensors (image, text, sim) + a JSON sidecar with ``loss`` and ``meta``."""
        path = Path(path)
        t = {"image": self.image, "text": self.text}
        if self.sim is not None:
            t["sim"] = self.sim
        save_weights(t, path)
        side = {**self.meta, "loss": self.loss}
        path.with_suffix(".json").write_text(json.dumps(side, indent=2, default=str))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> PairSet:
        path = Path(path)
        t = load_weights(path, "pairs")
        if "image" not in t or "text" not in t:
            raise ConfigError("pairs", str(path), "a pair set file with image and text tensors")
        side = path.with_suffix(".json")
        meta = json.loads(side.read_text()) if side.is_file() else {}
        return cls(t["image"], t["text"], t.get("sim"), meta.pop("loss", "infonce"), meta)


# -- frozen encoders and real pairs ---------------------------------------------------------
class PairEncoders:
    """The frozen encoders of the two sides.

    ``image``: an ``nn.Module`` over image-side inputs; its features are read by a forward
    hook at ``image_tap`` (a module path such as ``"fc:input"``, validated here), so any
    model can serve without rewriting it. ``text`` / ``text_tap``: the same for the text
    side, used only to embed real text-side inputs once (:meth:`embed_text`); ``None`` when
    the text side is given as embeddings. Both are frozen: ``eval()``, no parameter gradients;
    :meth:`image_features` lets gradients flow to its *input* (the synthetic pixels).
    """

    def __init__(self, image: nn.Module, image_tap: str | Tap = "fc:input",
                 text: nn.Module | None = None, text_tap: str | Tap | None = None,
                 chunk: int = 1000):
        if not isinstance(image, nn.Module):
            raise ConfigError("encoders.image", type(image).__name__, "an nn.Module")
        if text is not None and text_tap is None:
            raise ConfigError("encoders.text_tap", None, "a module path when text is given")
        if not (isinstance(chunk, int) and chunk >= 1):
            raise ConfigError("encoders.chunk", chunk, "an integer >= 1")
        self.image, self.text, self.chunk = image, text, chunk
        self.image_tap = Tap.parse(image_tap)
        self.text_tap = Tap.parse(text_tap) if text_tap is not None else None
        for m in (image, text):
            if m is not None:
                m.eval().requires_grad_(False)
        self._img = Capture(image, {"f": self.image_tap}, "encoders.image_tap")
        self._txt = Capture(text, {"f": self.text_tap}, "encoders.text_tap") if text else None

    @staticmethod
    def _run(model: nn.Module, cap: Capture, x: Tensor) -> Tensor:
        model.eval()
        cap.active = True
        try:
            model(x)
            f = cap.get("f")
        finally:
            cap.active = False
            cap.clear()
        return f.flatten(1)

    def image_features(self, x: Tensor) -> Tensor:
        """(N, D_img) features of image-side inputs ``x``; differentiable w.r.t. ``x``."""
        parts = [self._run(self.image, self._img, x[i:i + self.chunk])
                 for i in range(0, len(x), self.chunk)]
        return torch.cat(parts)

    @torch.no_grad()
    def embed_text(self, x: Tensor) -> Tensor:
        """(N, D_txt) embeddings of real text-side inputs (no gradients)."""
        if self.text is None:
            raise ConfigError("encoders.text", None, "a text encoder to embed raw text inputs")
        return torch.cat([self._run(self.text, self._txt, x[i:i + self.chunk])
                          for i in range(0, len(x), self.chunk)])


class RealPairs:
    """Real pairs: ``image`` (N, C, H, W) inputs, ``text`` (N, D) embeddings; the image
    features through ``encoders`` are computed once, on first use (:meth:`features`)."""

    def __init__(self, image: Tensor, text: Tensor, encoders: PairEncoders, seed: int = 0):
        if len(image) != len(text) or len(image) == 0:
            raise ConfigError("pairs", (len(image), len(text)), "as many images as texts, > 0")
        if text.dim() != 2:
            raise ConfigError("pairs.text", tuple(text.shape), "(N, D) embeddings")
        self.image, self.text, self.encoders = image, text, encoders
        self.gen = torch.Generator().manual_seed(seed)
        self._feats: Tensor | None = None

    def __len__(self) -> int:
        return len(self.image)

    def features(self) -> tuple[Tensor, Tensor]:
        """(image features, text embeddings) of every pair (no gradients), cached."""
        if self._feats is None:
            with torch.no_grad():
                self._feats = self.encoders.image_features(self.image).detach()
        return self._feats, self.text

    def pick(self, n: int, gen: torch.Generator | None = None) -> Tensor:
        if n > len(self):
            raise ConfigError("condense.n_pairs", n, f"at most the {len(self)} real pairs")
        return torch.randperm(len(self), generator=gen or self.gen)[:n]


def h2_halves(x: Tensor) -> tuple[Tensor, Tensor]:
    """(top, bottom) halves of images ``x`` (N, C, H, W) along the height (H even)."""
    if x.dim() != 4 or x.shape[2] % 2:
        raise ConfigError("pairs.images", tuple(x.shape), "(N, C, H, W) with an even H")
    h = x.shape[2] // 2
    return x[:, :, :h].contiguous(), x[:, :, h:].contiguous()


def h2_pairs(data, encoders: PairEncoders, limit: int | None = None, seed: int = 0) -> RealPairs:
    """The H2 setting: pair i = (top half of image i, the text encoder's embedding of its
    bottom half) of a :class:`~crossdistill.data.Dataset` ``data`` (its first ``limit``)."""
    x = data.x if limit is None else data.x[:limit]
    top, bottom = h2_halves(x)
    return RealPairs(top, encoders.embed_text(bottom), encoders, seed)


# -- heads and losses -----------------------------------------------------------------------
class ProjectionHead(nn.Module):
    """``LayerNorm(p + dropout(fc(GELU(p))))`` with ``p = projection(x)`` (the official
    code's ProjectionHead; the residual is the first layer's output)."""

    def __init__(self, d_in: int, dim: int, dropout: float = 0.0):
        super().__init__()
        self.projection = nn.Linear(d_in, dim)
        self.fc = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        p = self.projection(x)
        return self.layer_norm(p + self.dropout(self.fc(F.gelu(p))))


class DualHeads(nn.Module):
    """An image head and a text head into one ``dim``-space; a fixed logit scale
    ``1 / temperature`` (not trained, as in the official code)."""

    def __init__(self, d_img: int, d_txt: int, dim: int = 64, dropout: float = 0.0,
                 temperature: float = 0.07):
        super().__init__()
        for k, v in (("heads.dim", dim), ("heads.d_img", d_img), ("heads.d_txt", d_txt)):
            if not (isinstance(v, int) and v >= 1):
                raise ConfigError(k, v, "an integer >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError("heads.dropout", dropout, "in [0, 1)")
        if not temperature > 0:
            raise ConfigError("heads.temperature", temperature, "must be > 0")
        self.image = ProjectionHead(d_img, dim, dropout)
        self.text = ProjectionHead(d_txt, dim, dropout)
        self.scale = 1.0 / temperature

    def embed(self, fi: Tensor, ft: Tensor) -> tuple[Tensor, Tensor]:
        return F.normalize(self.image(fi), dim=-1), F.normalize(self.text(ft), dim=-1)

    def forward(self, fi: Tensor, ft: Tensor) -> Tensor:
        """(B_img, B_txt) logits ``scale * cos``."""
        u, v = self.embed(fi, ft)
        return self.scale * u @ v.T


def make_heads(d_img: int, d_txt: int, seed: int, **head_kw) -> DualHeads:
    """Fresh heads whose initialisation depends only on ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DualHeads(d_img, d_txt, **head_kw)


def infonce(logits: Tensor) -> Tensor:
    """CLIP's symmetric InfoNCE of square ``logits`` (row i's positive is column i):
    ``1/2 [CE(logits, diag) + CE(logits^T, diag)]``."""
    y = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y))


def wbce(logits: Tensor, target: Tensor) -> Tensor:
    """Weighted BCE of LoRS / RepBlend (``MultilabelContrastiveLoss('WBCE')``):
    ``l_ij = BCE(sigmoid(logits_ij), target_ij)``; positives = ``target > 0.5``; the loss is
    ``1/2 (mean of l over positives + mean of l over negatives)`` (an empty group counts 0).
    Computed from the logits (log-sigmoid) instead of the official ``log(sigmoid + 1e-6)``:
    the same value away from saturation, without its floor at |logit| > ~13."""
    if logits.shape != target.shape:
        raise ConfigError("wbce.target", tuple(target.shape), f"shape {tuple(logits.shape)}")
    target = target.to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    pos = (target > 0.5).detach()
    lp = torch.where(pos, loss, torch.zeros_like(loss)).sum() / pos.sum().clamp_min(1)
    ln = torch.where(pos, torch.zeros_like(loss), loss).sum() / (~pos).sum().clamp_min(1)
    return 0.5 * (lp + ln)


def pair_loss(name: str, logits: Tensor, target: Tensor | None) -> Tensor:
    if name == "infonce":
        return infonce(logits)
    return wbce(logits, target if target is not None else torch.eye(len(logits)))


# -- expert trajectories --------------------------------------------------------------------
_EXPERTS: dict = {}


def _branch_params(heads: DualHeads) -> dict[str, list[Tensor]]:
    return {b: [p.detach().clone() for p in getattr(heads, b).parameters()] for b in BRANCHES}


def record_pair_experts(fi: Tensor, ft: Tensor, *, n: int, epochs: int, lr_img: float = 0.1,
                        lr_txt: float = 0.1, batch_size: int = 32, seed: int = 0,
                        head_kw: dict | None = None) -> list[list[dict[str, list[Tensor]]]]:
    """``n`` trajectories of fresh heads trained on the real pairs' features ``(fi, ft)``
    with InfoNCE (the official buffer.py: SGD, per-branch lrs, no momentum, no weight decay,
    constant lr); each is the list of ``{"image": params, "text": params}`` at epochs
    0..``epochs``. Cached in memory by the data and the settings."""
    head_kw = dict(head_kw or {})
    for k, v in (("experts.n", n), ("experts.epochs", epochs), ("experts.batch_size",
                                                                 batch_size)):
        if not (isinstance(v, int) and v >= 1):
            raise ConfigError(k, v, "an integer >= 1")
    key = (tuple(fi.shape), float(fi.double().sum()), float(ft.double().sum()), n, epochs,
           lr_img, lr_txt, batch_size, seed, json.dumps(head_kw, sort_keys=True))
    if key in _EXPERTS:
        return _EXPERTS[key]
    out = []
    for e in range(n):
        s = seed * 7919 + e
        heads = make_heads(fi.shape[1], ft.shape[1], s, **head_kw).train()
        opt = torch.optim.SGD([{"params": heads.image.parameters(), "lr": lr_img},
                               {"params": heads.text.parameters(), "lr": lr_txt}],
                              lr=lr_img, momentum=0.0)
        gen = torch.Generator().manual_seed(s)
        traj = [_branch_params(heads)]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)  # dropout, if any
            for _ in range(epochs):
                order = torch.randperm(len(fi), generator=gen)
                for k in range(0, len(fi), batch_size):
                    ids = order[k:k + batch_size]
                    if len(ids) < 2:
                        continue
                    u, v = heads.embed(fi[ids], ft[ids])
                    loss = clip_loss(u, v, heads.scale)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                traj.append(_branch_params(heads))
        out.append(traj)
    _EXPERTS[key] = out
    return out


def save_experts(experts, path: str | os.PathLike) -> Path:
    t = {f"{i}.{e}.{b}.{j}": p for i, traj in enumerate(experts) for e, st in enumerate(traj)
         for b in BRANCHES for j, p in enumerate(st[b])}
    return save_weights(t, path, metadata={"n": str(len(experts)),
                                            "epochs": str(len(experts[0]) - 1)})


def load_experts(path: str | os.PathLike):
    t = load_weights(path, "experts")
    n = 1 + max(int(k.split(".")[0]) for k in t)
    ep = 1 + max(int(k.split(".")[1]) for k in t)
    out = []
    for i in range(n):
        traj = []
        for e in range(ep):
            st = {}
            for b in BRANCHES:
                js = sorted(int(k.split(".")[3]) for k in t if k.startswith(f"{i}.{e}.{b}."))
                st[b] = [t[f"{i}.{e}.{b}.{j}"] for j in js]
            traj.append(st)
        out.append(traj)
    return out


# -- condensers -----------------------------------------------------------------------------
class PairCondenser:
    """Base class of pair condensers (registered in ``CONDENSERS`` with ``data = "pairs"``;
    the image harness refuses them, :func:`synthesize_pairs` runs them).

    Constructor arguments every pair condenser takes: ``n_pairs``, ``encoders`` (a
    :class:`PairEncoders`), ``device``, ``seed``, ``iterations``, ``init`` (``"real"``:
    random real pairs; ``"noise"``: Gaussian pixels and embeddings with the real data's
    mean and std), and the heads' shape ``head_dim``, ``dropout``, ``temperature``.
    """

    name = "pairs-base"
    data = "pairs"

    def __init__(self, *, n_pairs: Count, encoders: PairEncoders, device: str = "cpu",
                 seed: Seed = 0, iterations: int = 1000, init: Literal["real", "noise"] = "real",
                 head_dim: Width = 64, dropout: Fraction = 0.0, temperature: Pos = 0.07):
        if not (isinstance(n_pairs, int) and n_pairs >= 2):
            raise ConfigError("condense.n_pairs", n_pairs, "an integer >= 2")
        if not isinstance(encoders, PairEncoders):
            raise ConfigError("condense.encoders", type(encoders).__name__, "a PairEncoders")
        if init not in ("real", "noise"):
            raise ConfigError("condense.init", init, "allowed: 'real' or 'noise'")
        if not (isinstance(head_dim, int) and head_dim >= 1):
            raise ConfigError("condense.head_dim", head_dim, "an integer >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError("condense.dropout", dropout, "in [0, 1)")
        if not temperature > 0:
            raise ConfigError("condense.temperature", temperature, "must be > 0")
        self.n_pairs, self.encoders, self.device = n_pairs, encoders, device
        self.seed, self.iterations, self.init_mode = seed, iterations, init
        self.head_kw = {"dim": head_dim, "dropout": dropout, "temperature": temperature}
        self.gen = torch.Generator().manual_seed(seed)
        self.image_syn: Tensor | None = None
        self.text_syn: Tensor | None = None

    def init(self, real: RealPairs) -> None:
        if self.init_mode == "real":
            ids = real.pick(self.n_pairs, self.gen)
            img, txt = real.image[ids], real.text[ids]
        else:
            shape = (self.n_pairs, *real.image.shape[1:])
            img = torch.randn(shape, generator=self.gen) * real.image.std() + real.image.mean()
            txt = (torch.randn(self.n_pairs, real.text.shape[1], generator=self.gen)
                   * real.text.std() + real.text.mean())
        self.image_syn = img.detach().clone().to(self.device).requires_grad_(True)
        self.text_syn = txt.detach().clone().float().to(self.device).requires_grad_(True)

    def step(self, real: RealPairs, it: int) -> dict[str, float]:
        raise NotImplementedError

    def synthetic(self) -> PairSet:
        return PairSet(self.image_syn.detach().cpu().clone(), self.text_syn.detach().cpu().clone(),
                       meta={"method": self.name, "n_pairs": self.n_pairs})


def stored_numbers(s: PairSet, sim_numbers: int | None = None) -> dict:
    """Numbers stored per pair: pixels, text embedding, and the similarity target's share."""
    pix = int(math.prod(s.image.shape[1:]))
    sim = 0.0 if s.sim is None else (sim_numbers if sim_numbers is not None else len(s) ** 2)
    return {"pixels": pix, "text": int(s.text.shape[1]), "sim_per_pair": sim / len(s)}


def synthesize_pairs(method: str, real: RealPairs, *, n_pairs: int, iterations: int,
                     seed: int = 0, device: str = "cpu", progress: bool = True,
                     callback: Callable[[int, PairCondenser], None] | None = None,
                     every: int = 0, **hyper) -> PairSet:
    """Run a registered pair condenser on ``real``; ``callback(it, condenser)`` after every
    ``every``-th outer step (and after the last; ``every=0``: never). Meta gets wall time
    (callbacks excluded) and peak memory."""
    from ..registry import CONDENSERS

    cls = CONDENSERS.get(method, "condense.method")
    if getattr(cls, "data", "images") != "pairs":
        raise ConfigError("condense.method", method, "a pair condenser (data = 'pairs'); "
                          "image condensers run with condense.harness.synthesize")
    if not (isinstance(iterations, int) and iterations >= 0):
        raise ConfigError("condense.iterations", iterations, "an integer >= 0")
    if not (isinstance(every, int) and every >= 0):
        raise ConfigError("condense.every", every, "an integer >= 0")
    cond = cls(n_pairs=n_pairs, encoders=real.encoders, device=device, seed=seed,
               iterations=iterations, **hyper)
    losses, spent = [], 0.0
    with MemoryMeter(device) as mem:
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            cond.init(real)
            bar = tqdm(range(iterations), desc=f"condense {method} N={n_pairs}", leave=False,
                       disable=not progress, dynamic_ncols=True)
            for it in bar:
                m = cond.step(real, it)
                if m:
                    losses.append(float(m.get("loss", float("nan"))))
                    bar.set_postfix({k: f"{v:.4g}" for k, v in m.items()})
                if callback is not None and every and ((it + 1) % every == 0
                                                       or it + 1 == iterations):
                    t1 = time.perf_counter()
                    callback(it + 1, cond)
                    spent += time.perf_counter() - t1
            syn = cond.synthetic()
        seconds = time.perf_counter() - t0 - spent
    syn.meta.update(method=method, n_pairs=n_pairs, iterations=iterations, seed=seed,
                    synth_seconds=seconds, peak_mem_mib=mem.peak_mib, peak_mem_how=mem.how,
                    first_loss=losses[0] if losses else None,
                    last_loss=losses[-1] if losses else None,
                    hyper={k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
                           for k, v in hyper.items() if k != "experts"})
    syn.meta.setdefault("stored_numbers", stored_numbers(syn))
    return syn


def random_pairs(real: RealPairs, n: int, seed: int = 0) -> PairSet:
    """Baseline: ``n`` random real pairs (seeded), hard pairs (InfoNCE in evaluation)."""
    if not (isinstance(n, int) and n >= 2):
        raise ConfigError("n_pairs", n, "an integer >= 2")
    ids = real.pick(n, torch.Generator().manual_seed(seed))
    s = PairSet(real.image[ids].clone(), real.text[ids].clone(),
                meta={"method": "random", "n_pairs": n, "seed": seed, "synth_seconds": 0.0})
    s.meta["stored_numbers"] = stored_numbers(s)
    return s


def full_pairs(real: RealPairs) -> PairSet:
    """Baseline: every real training pair, judged by the same protocol."""
    return PairSet(real.image, real.text, meta={"method": "full", "n_pairs": len(real)})


# -- evaluation -----------------------------------------------------------------------------
@dataclass
class PairEvalConfig:
    """Training of fresh heads on a pair set (equal for every set)."""

    steps: int = 200
    batch_size: int = 128
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 5e-4
    eval_every: int = 20


#: lrs tried on val for every set (the official evaluation uses the distilled lr, ~0.1).
PAIR_LRS = (0.01, 0.03, 0.1)


def pair_candidates(base: PairEvalConfig | None = None, lrs=PAIR_LRS) -> list[PairEvalConfig]:
    base = base or PairEvalConfig()
    lrs = list(lrs)
    if not lrs or any(not isinstance(x, (int, float)) or not x > 0 for x in lrs):
        raise ConfigError("eval.lrs", lrs, "a non-empty list of positive numbers")
    return [replace(base, lr=float(lr)) for lr in lrs]


def _check_cfg(c) -> PairEvalConfig:
    if not isinstance(c, PairEvalConfig):
        raise ConfigError("eval.candidates", c, "PairEvalConfig instances")
    for k in ("steps", "batch_size", "eval_every"):
        v = getattr(c, k)
        if not (isinstance(v, int) and v >= 1):
            raise ConfigError(f"eval.{k}", v, "an integer >= 1")
    if not (isinstance(c.lr, (int, float)) and c.lr > 0):
        raise ConfigError("eval.lr", c.lr, "must be > 0")
    return c


@torch.no_grad()
def retrieval(heads: DualHeads, fi: Tensor, ft: Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """Recall@k both ways of pairs ``(fi[i], ft[i])`` embedded by ``heads``: ``tr@k`` image
    -> text, ``ir@k`` text -> image, ``r_mean`` their mean."""
    heads.eval()
    u, v = heads.embed(fi, ft)
    i2t, t2i = recall_at_k(u, v, ks), recall_at_k(v, u, ks)  # keys "r@k"
    out = {f"tr@{k}": i2t[f"r@{k}"] for k in ks}
    out.update({f"ir@{k}": t2i[f"r@{k}"] for k in ks})
    out["r_mean"] = sum(out.values()) / len(out)
    return out


def train_heads(fi: Tensor, ft: Tensor, target: Tensor | None, loss: str, cfg: PairEvalConfig,
                *, seed: int, head_kw: dict | None = None,
                on_eval: Callable[[int, DualHeads], None] | None = None) -> DualHeads:
    """Fresh heads (seeded) trained on features ``(fi, ft)`` of a set only; ``on_eval(step,
    heads)`` every ``cfg.eval_every`` steps (and at the end)."""
    heads = make_heads(fi.shape[1], ft.shape[1], 10_007 * seed + 1, **(head_kw or {}))
    opt = torch.optim.SGD(heads.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [cfg.steps // 2], 0.1)
    gen = torch.Generator().manual_seed(seed)
    n, order, pos = len(fi), torch.empty(0, dtype=torch.long), 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout, if any
        for step in range(1, cfg.steps + 1):
            if pos + min(cfg.batch_size, n) > len(order):
                order, pos = torch.randperm(n, generator=gen), 0
            ids = order[pos:pos + cfg.batch_size]
            pos += len(ids)
            heads.train()
            logits = heads(fi[ids], ft[ids])
            t = target[ids][:, ids] if target is not None else None
            lo = pair_loss(loss, logits, t)
            opt.zero_grad(set_to_none=True)
            lo.backward()
            opt.step()
            sched.step()
            if on_eval is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                on_eval(step, heads)
    return heads.eval()


def set_features(s: PairSet, encoders: PairEncoders) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        return encoders.image_features(s.image.float()).detach(), s.text.float()


def evaluate_pairs(s: PairSet, encoders: PairEncoders, val: tuple[Tensor, Tensor],
                   test: tuple[Tensor, Tensor] | None, *,
                   candidates: list[PairEvalConfig] | None = None, n_models: int = 1,
                   seed: int = 0, head_kw: dict | None = None) -> dict:
    """The protocol of the module docstring. ``val`` / ``test``: (image features, text
    embeddings) of the real galleries (e.g. ``RealPairs.features()``). Returns ``test_*``
    (mean over ``n_models``) and ``val_*`` (model 0, at the chosen step: optimistic),
    ``chosen`` (lr, step) and every candidate's best val ``r_mean``. ``test=None``: val
    only (for checkpoint choices along a synthesis), the test gallery untouched."""
    cands = [_check_cfg(c) for c in (candidates or pair_candidates())]
    if not (isinstance(n_models, int) and n_models >= 1):
        raise ConfigError("eval.n_models", n_models, "an integer >= 1")
    fi, ft = set_features(s, encoders)
    target = s.sim.float() if s.sim is not None else None
    best: dict = {}
    tried = []

    for c in cands:
        rec = {"val": -1.0}

        def keep(step, heads, c=c, rec=rec):
            r = retrieval(heads, *val)
            if r["r_mean"] > rec["val"]:  # strict: ties keep the earlier step
                rec.update(val=r["r_mean"], step=step, metrics=r, state=copy.deepcopy(
                    heads.state_dict()))

        train_heads(fi, ft, target, s.loss, c, seed=seed * 1000, head_kw=head_kw, on_eval=keep)
        tried.append({"lr": c.lr, "step": rec["step"], "val_r_mean": rec["val"]})
        if not best or rec["val"] > best["val"]:
            best = {**rec, "cfg": c}
    chosen = best["cfg"]
    info = dict(chosen={"lr": chosen.lr, "step": best["step"], **{
        k: v for k, v in asdict(chosen).items() if k not in ("lr",)}}, candidates=tried,
        loss=s.loss, n_models=n_models)
    val_out = {f"val_{k}": v for k, v in best["metrics"].items()}
    if test is None:  # selection only (checkpoints, curves): the test gallery is not touched
        return {**val_out, **info}
    heads = make_heads(fi.shape[1], ft.shape[1], 0, **(head_kw or {}))
    heads.load_state_dict(best["state"])
    tests = [retrieval(heads, *test)]  # model 0: the test gallery read once, here
    for k in range(1, n_models):
        got = {}

        def at(step, h, got=got, want=best["step"]):
            if step == want:
                got["r"] = retrieval(h, *test)

        train_heads(fi, ft, target, s.loss, replace(chosen, eval_every=best["step"]),
                    seed=seed * 1000 + k, head_kw=head_kw, on_eval=at)
        tests.append(got["r"])
    out = {f"test_{k}": sum(t[k] for t in tests) / len(tests) for k in tests[0]}
    return {**out, **val_out, **info}
