"""A tiny SegFormer (MiT encoder + all-MLP decoder), ``(B, C, H, W) -> (B, K, H, W)``.

Paper: Xie et al., "SegFormer: Simple and Efficient Design for Semantic Segmentation with
Transformers", NeurIPS 2021. The encoder is hierarchical: each stage starts with an
*overlapping* patch embedding (a strided conv, kernel 7 / stride 4 for the first stage and
kernel 3 / stride 2 after it, then LayerNorm), followed by transformer blocks with
*efficient self-attention* (keys and values from a map reduced by a ``sr x sr`` strided conv:
cost ``N^2 / sr^2``) and a *Mix-FFN* (``fc1 -> depthwise 3x3 conv -> GELU -> fc2``; the conv
leaks position, so there is no positional embedding and any input size works). The decoder
is all-MLP: each stage map -> linear (1x1 conv) to ``decoder_dim`` -> bilinear upsampling to
the first stage's grid -> concatenation (deepest first) -> fuse (1x1 conv, BN, ReLU) ->
classifier (``head``) -> bilinear upsampling to the input size.

Sizes are for 56x56 canvases on a CPU: four stages of strides 4, 2, 2, 2 (MiT's; 14, 7, 4,
2 cell grids), one block each, widths (16, 32, 64, 128), reduction ratios 4, 2, 1, 1 by
default. Our choices (not the paper's): the first patch embedding keeps MiT's 7x7 kernel for
any stride; the reduction conv pads the map (zeros, right/bottom) to a multiple of ``sr``
instead of dropping the remainder, so any size works; the classifier starts at N(0, 0.01)
(near-uniform first predictions); no drop-path or dropout.

Taps (module paths):

* ``patch_embeds.<i>``: stage ``i``'s overlapping patch embedding; output *tokens*
  ``(B, N_i, C_i)`` (after its LayerNorm, row-major over the ``h_i x w_i`` grid), the tensor
  TransKD's patch-embedding alignment reads; listed in ``model.embed_taps``.
* ``encoder.<i>``: stage ``i`` (its blocks and final LayerNorm); output a *map*
  ``(B, C_i, h_i, w_i)``; listed in ``model.encoder_stages``.
* ``decoder``: the fused decoder map ``(B, decoder_dim, h_0, w_0)``; ``head``: the 1x1
  classifier (logits on the first stage's grid, before the final upsampling).

``model.stages`` = ``encoder_stages + ["decoder"]`` as for the other zoo models.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import MODELS
from ..schema import Count, Depth, ImgSize, Pos, Width
from .mlp import check_common, check_positive, tag, to_hw


class OverlapPatchEmbed(nn.Module):
    """Strided conv with overlapping windows (kernel ``k``, padding ``k // 2``; MiT: 7/4/3
    for the first stage, 3/2/1 after) then LayerNorm. Map ``(B, C_in, H, W)`` -> tokens
    ``(B, N, dim)``, ``N = ceil(H / s) * ceil(W / s)`` for odd ``k >= s``."""

    def __init__(self, cin: int, dim: int, stride: int, kernel: int):
        super().__init__()
        k = kernel
        self.proj = nn.Conv2d(cin, dim, k, stride=stride, padding=k // 2)
        self.norm = nn.LayerNorm(dim)

    def out_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
        """The token grid this embedding gives an ``hw`` input."""
        c = self.proj
        k, s, p = c.kernel_size[0], c.stride[0], c.padding[0]
        return tuple((x + 2 * p - k) // s + 1 for x in hw)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


def tokens_map(x: Tensor, hw: tuple[int, int]) -> Tensor:
    """(B, N, C) row-major tokens -> (B, C, h, w)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *hw)


def _interp_matrix(n_in: int, n_out: int, like: Tensor) -> Tensor:
    """(n_in, n_out) weights of 1-D linear resizing (align_corners=False), column j = the
    input weights of output j."""
    eye = torch.eye(n_in, dtype=like.dtype, device=like.device)[None]
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0]


def resize_bilinear(x: Tensor, size) -> Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` as two matmuls with
    the separable interpolation matrices: the same values (to rounding), and on a CPU about
    3x faster forward + backward than the interpolate kernel at the sizes used here."""
    size = tuple(int(v) for v in size)
    if tuple(x.shape[-2:]) == size:
        return x
    mh = _interp_matrix(x.shape[-2], size[0], x)
    mw = _interp_matrix(x.shape[-1], size[1], x)
    return torch.matmul(mh.t(), torch.matmul(x, mw))


class EfficientAttention(nn.Module):
    """Multi-head self-attention whose keys/values come from the token map reduced by a
    ``sr x sr`` stride-``sr`` conv + LayerNorm (``sr = 1``: plain attention)."""

    def __init__(self, dim: int, heads: int, sr: int):
        super().__init__()
        self.heads, self.sr = heads, sr
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr > 1:
            self.reduce = nn.Conv2d(dim, dim, sr, stride=sr)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        b, n, d = x.shape
        h = self.heads
        q = self.q(x).view(b, n, h, d // h).transpose(1, 2)
        kv = x
        if self.sr > 1:
            m = tokens_map(x, hw)
            r = self.sr  # zero-pad right/bottom to a multiple of sr (ours: any size works)
            m = F.pad(m, (0, (-hw[1]) % r, 0, (-hw[0]) % r))
            kv = self.norm(self.reduce(m).flatten(2).transpose(1, 2))
        k, v = self.kv(kv).view(b, kv.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class MixFFN(nn.Module):
    """``fc1 -> depthwise 3x3 conv (on the token grid) -> GELU -> fc2``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        x = self.fc1(x)
        x = self.dwconv(tokens_map(x, hw)).flatten(2).transpose(1, 2)
        return self.fc2(self.act(x))


class Block(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))`` then ``x + ffn(norm2(x))``."""

    def __init__(self, dim: int, heads: int, sr: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = EfficientAttention(dim, heads, sr)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = MixFFN(dim, max(1, int(round(dim * mlp_ratio))))

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        x = x + self.attn(self.norm1(x), hw)
        return x + self.ffn(self.norm2(x), hw)


class Stage(nn.Module):
    """One encoder stage after its patch embedding: blocks then LayerNorm; tokens in,
    map ``(B, C, h, w)`` out."""

    def __init__(self, dim: int, depth: int, heads: int, sr: int, mlp_ratio: float):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, sr, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        for blk in self.blocks:
            x = blk(x, hw)
        return tokens_map(self.norm(x), hw)


class MLPDecoder(nn.Module):
    """All-MLP decoder: per stage 1x1 conv (a token-wise linear) to ``dim``, bilinear
    upsampling to the first stage's grid, concatenation deepest first, fuse (1x1 conv, BN,
    ReLU). Returns the fused map ``(B, dim, h_0, w_0)``."""

    def __init__(self, widths: list[int], dim: int):
        super().__init__()
        self.linears = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in widths)
        self.fuse = nn.Sequential(nn.Conv2d(len(widths) * dim, dim, 1, bias=False),
                                  nn.BatchNorm2d(dim), nn.ReLU(inplace=True))

    def forward(self, maps: list[Tensor]) -> Tensor:
        size = maps[0].shape[-2:]
        ups = [resize_bilinear(lin(m), size) for lin, m in zip(self.linears, maps)]
        return self.fuse(torch.cat(ups[::-1], 1))


class SegFormer(nn.Module):
    """patch_embeds.i -> encoder.i per stage -> decoder -> head -> upsample to the input."""

    def __init__(self, in_channels: int, num_classes: int, widths, depths, heads, srs,
                 strides, mlp_ratio: float, decoder_dim: int):
        super().__init__()
        cins = [in_channels, *widths[:-1]]
        self.patch_embeds = nn.ModuleList(
            OverlapPatchEmbed(ci, c, s, 7 if i == 0 else max(3, 2 * s - 1))
            for i, (ci, c, s) in enumerate(zip(cins, widths, strides)))
        self.encoder = nn.ModuleList(
            Stage(c, d, h, r, mlp_ratio) for c, d, h, r in zip(widths, depths, heads, srs))
        self.decoder = MLPDecoder(list(widths), decoder_dim)
        self.head = nn.Conv2d(decoder_dim, num_classes, 1)
        self.apply(_init)
        nn.init.normal_(self.head.weight, 0.0, 0.01)  # ours: near-uniform first predictions

    def features(self, x: Tensor) -> list[Tensor]:
        """The stage maps ``[(B, C_i, h_i, w_i)]``, shallow to deep."""
        maps = []
        for embed, stage in zip(self.patch_embeds, self.encoder):
            hw = embed.out_hw(tuple(x.shape[-2:]))
            x = stage(embed(x), hw)
            maps.append(x)
        return maps

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        logits = self.head(self.decoder(self.features(x)))
        return resize_bilinear(logits, size)


def _init(m: nn.Module) -> None:
    """SegFormer's initialisation: truncated normal (std 0.02) linears, LayerNorm (1, 0),
    convs normal with std sqrt(2 / fan_out)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def _ints(field: str, v, n: int | None) -> list[int]:
    if isinstance(v, int) and not isinstance(v, bool):
        v = [v] * (n or 1)
    if not isinstance(v, (tuple, list)) or not v or (n is not None and len(v) != n):
        want = f"{n} positive ints, one per stage" if n else "a non-empty list of positive ints"
        raise ConfigError(field, v, want)
    for x in v:
        check_positive(field, x, "positive ints" + (f", one per stage ({n})" if n else ""))
    return list(v)


@MODELS.register(
    "segformer-tiny",
    family="seg",
    description="tiny SegFormer: MiT encoder (overlapping patch embeddings, efficient "
    "attention, Mix-FFN; 4 stages of strides 4,2,2,2) + all-MLP decoder (11 classes)",
    paper="Xie et al., SegFormer: Simple and Efficient Design for Semantic Segmentation with "
    "Transformers, 2021",
)
def segformer_tiny(
    *,
    num_classes: Count = 11,
    in_channels: Width = 1,
    img_size: ImgSize | tuple[ImgSize, ImgSize] = 56,
    widths: Width | tuple[Width, ...] = (16, 32, 64, 128),
    depths: Depth | tuple[Depth, ...] = 1,
    heads: Depth | tuple[Depth, ...] | None = None,
    sr_ratios: Depth | tuple[Depth, ...] | None = None,
    strides: Depth | tuple[Depth, ...] | None = None,
    mlp_ratio: Pos = 2.0,
    decoder_dim: Width = 64,
) -> nn.Module:
    """Per-pixel classifier. ``widths`` fixes the stage count; ``depths``, ``heads``,
    ``sr_ratios`` (spatial reduction of keys/values) and ``strides`` (of each patch
    embedding) are one int per stage (or one int for all); each width divisible by its
    heads. Defaults: heads ``C_i / 16`` (head width 16; 1 when ``C_i`` is not a multiple of
    16), strides ``4, 2, 2, 2, ...`` (MiT's; ``(2, 2, 2, 2)`` halves the first grid's cell),
    sr_ratios ``4, 2, 1, 1, ...`` (MiT's 8, 4, 2, 1 are for 512+ px images). ``img_size`` is
    only validated: any input size works (no position embedding)."""
    check_common(num_classes, in_channels)
    to_hw(img_size)
    widths = _ints("widths", widths, None)
    n = len(widths)
    if heads is None:
        heads = [c // 16 if c % 16 == 0 else 1 for c in widths]
    if sr_ratios is None:
        sr_ratios = [max(1, 4 >> i) for i in range(n)]
    if strides is None:
        strides = [4 if i == 0 else 2 for i in range(n)]
    depths, heads = _ints("depths", depths, n), _ints("heads", heads, n)
    srs, strides = _ints("sr_ratios", sr_ratios, n), _ints("strides", strides, n)
    for c, h in zip(widths, heads):
        if c % h:
            raise ConfigError("heads", heads, f"divisors of the widths {widths}")
    check_positive("decoder_dim", decoder_dim)
    if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not (
            0 < mlp_ratio <= 64):
        raise ConfigError("mlp_ratio", mlp_ratio, "a number in (0, 64]")
    model = SegFormer(in_channels, num_classes, widths, depths, heads, srs, strides,
                      float(mlp_ratio), decoder_dim)
    enc = [f"encoder.{i}" for i in range(n)]
    model.encoder_stages = enc
    model.embed_taps = [f"patch_embeds.{i}" for i in range(n)]
    return tag(model, family="seg", stages=[*enc, "decoder"], feature_path="head")
