"""Losses on intermediate features: elementwise matches (FitNets-style) and attention transfer.

The elementwise losses (``mse``, ``l1``, ``smooth_l1``, ``cosine``) compare tensors position by
position, so student and teacher must have the same shape; when they do not, the fix is a
projector on the student tap, and the error says so. ``at`` compares spatial attention maps,
which only need compatible spatial layouts, so it works across channel widths and also on
(B, N, D) token tensors from vision transformers.

This module also holds the small helpers the other loss modules share.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..registry import LOSSES
from ..schema import NonNeg, Pos

_HALF = (torch.float16, torch.bfloat16)


def _upcast(x: Tensor) -> Tensor:
    """Half precision -> float32; float32/float64 pass through (gradcheck runs in float64)."""
    return x.float() if x.dtype in _HALF else x


def _pair(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Detach the teacher and bring both to one dtype of at least float32 precision."""
    t = t.detach()
    if s.dtype == t.dtype and s.dtype in _WIDE:  # the common case, without the conversions
        return s, t
    dtype = torch.promote_types(torch.promote_types(s.dtype, t.dtype), torch.float32)
    return s.to(dtype), t.to(dtype)


_WIDE = (torch.float32, torch.float64)


def _no_autocast(x: Tensor) -> torch.autocast:
    """Autocast off: relation matrices and contrastive logits need full-precision matmuls."""
    return torch.autocast(x.device.type, enabled=False)


def _tokens_to_maps(x: Tensor, field: str) -> Tensor:
    """(B, N, D) tokens -> (B, D, h, w) maps; a leading cls token is dropped if N-1 is square.

    4-D tensors pass through unchanged. Patch tokens are assumed to be in row-major order, as
    produced by a ViT patch embedding.
    """
    if x.dim() == 4:
        return x
    if x.dim() != 3:
        raise ConfigError(field, tuple(x.shape), "expected (B, C, H, W) maps or (B, N, D) tokens")
    n = x.shape[1]
    if math.isqrt(n) ** 2 != n:
        if n > 1 and math.isqrt(n - 1) ** 2 == n - 1:
            x = x[:, 1:]
        else:
            raise ConfigError(
                field, tuple(x.shape), "token tensors need N or N-1 (cls token) to be a square"
            )
    side = math.isqrt(x.shape[1])
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)


def _require_same_shape(name: str, s: Tensor, t: Tensor) -> None:
    if s.shape != t.shape:
        raise ConfigError(
            f"{name}.inputs",
            f"student {tuple(s.shape)} vs teacher {tuple(t.shape)}",
            "an elementwise loss needs equal shapes; add a projector on the student tap "
            "(e.g. linear or 1x1 conv) that maps it to the teacher's shape",
        )


@LOSSES.register(
    "mse",
    paper="FitNets: Hints for Thin Deep Nets",
    year=2015,
    inputs="features",
    default_weight=100.0,
)
def mse(s: Tensor, t: Tensor) -> Tensor:
    """Hint loss of FitNets (Adriana Romero et al., ICLR 2015): mean squared error.

    ``L = mean((s - t)^2)`` over every element (the paper writes ``1/2 ||t - r(s)||^2``, where
    ``r`` is the regressor -- here the caller's projector). Shapes: any, but ``s`` and ``t``
    equal. Recommended term weight 100 (the one-stage FitNets setting of the CRD benchmark;
    the paper itself pre-trains with the hint alone).
    """
    _require_same_shape("mse", s, t)
    s, t = _pair(s, t)
    return F.mse_loss(s, t)


@LOSSES.register("l1", paper=None, year=None, inputs="features", default_weight=1.0)
def l1(s: Tensor, t: Tensor) -> Tensor:
    """Mean absolute error ``mean(|s - t|)``; less dominated by outlier activations than MSE.

    Shapes: any, ``s`` and ``t`` equal. Default weight 1.0.
    """
    _require_same_shape("l1", s, t)
    s, t = _pair(s, t)
    return F.l1_loss(s, t)


@LOSSES.register("smooth_l1", paper="Fast R-CNN", year=2015, inputs="features", default_weight=1.0)
def smooth_l1(s: Tensor, t: Tensor, *, beta: NonNeg = 1.0) -> Tensor:
    """Smooth L1 / Huber (Ross Girshick, Fast R-CNN, 2015), mean over elements.

    Per element ``0.5 d^2 / beta`` if ``|d| < beta`` else ``|d| - 0.5 beta`` with ``d = s - t``:
    quadratic near zero, linear for outliers. Shapes: any, equal. Default weight 1.0.
    """
    if not beta >= 0:
        raise ConfigError("smooth_l1.beta", beta, "must be >= 0")
    _require_same_shape("smooth_l1", s, t)
    s, t = _pair(s, t)
    return F.smooth_l1_loss(s, t, beta=beta)


@LOSSES.register("cosine", paper=None, year=None, inputs="features", default_weight=1.0)
def cosine(s: Tensor, t: Tensor) -> Tensor:
    """``1 - cos(s_i, t_i)`` on each flattened sample, averaged over the batch.

    Ignores feature scale, which often differs wildly between architectures.
    Shapes: (B, ...), ``s`` and ``t`` equal. Default weight 1.0.
    """
    _require_same_shape("cosine", s, t)
    s, t = _pair(s, t)
    batch = s.shape[0]
    sim = F.cosine_similarity(s.reshape(batch, -1), t.reshape(batch, -1), dim=1, eps=1e-8)
    return 1 - sim.mean()


def _attention(f: Tensor, p: float) -> Tensor:
    """a(F) = normalise_L2( mean_c |F_c|^p ) flattened over positions: (B,C,H,W) -> (B,H*W)."""
    return F.normalize(f.abs().pow(p).mean(dim=1).flatten(1), dim=1)


@LOSSES.register(
    "at",
    paper="Paying More Attention to Attention: Improving the Performance of Convolutional "
    "Neural Networks via Attention Transfer",
    year=2017,
    inputs="features",
    default_weight=1000.0,
)
def at(s: Tensor, t: Tensor, *, p: Pos = 2.0) -> Tensor:
    """Attention transfer (Sergey Zagoruyko, Nikos Komodakis, ICLR 2017).

    With ``a(F) = v / ||v||_2``, ``v = vec( 1/C sum_c |F_c|^p )``, the loss is
    ``mean_{i,j} (a(F_s)_ij - a(F_t)_ij)^2`` over batch and positions, i.e. the squared
    distance of the paper's Eq. 2 divided by H*W (the normalisation of the CRD benchmark code,
    which the weight 1000 goes with). Channel counts may differ. When spatial sizes differ,
    the larger map is adaptive-average-pooled to the smaller one.

    Shapes: (B, C, H, W) maps or (B, N, D) tokens (N treated as a square grid, a cls token
    dropped when N-1 is square). Default p=2; recommended term weight 1000.
    """
    s, t = _pair(_tokens_to_maps(s, "at.student"), _tokens_to_maps(t, "at.teacher"))
    size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
    if s.shape[-2:] != size:
        s = F.adaptive_avg_pool2d(s, size)
    if t.shape[-2:] != size:
        t = F.adaptive_avg_pool2d(t, size)
    return (_attention(s, p) - _attention(t, p)).pow(2).mean()
