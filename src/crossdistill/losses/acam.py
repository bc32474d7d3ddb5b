"""ACAM-KD's adaptive masked feature loss and the static teacher-mask baseline it is compared
with.

Paper: Lan and Tian, "ACAM-KD: Adaptive and Cooperative Attention Masking for Knowledge
Distillation", ICCV 2025 (arXiv 2503.06307). No official code was found: every form detail
below (the attention width, pooled keys/values, the normaliser, the diversity form, which
tensors are detached) is our inference from the abstract, public summaries and
methods/dense.md.

* ``acam`` (stateful; :class:`ACAMLoss`): STCA-FF fuses teacher and (projected) student maps
  by cross-attention, teacher pixels as queries, student pixels as keys/values:
  ``F_f = softmax(Q(F_t) K(phi(F_s))^T / sqrt(d)) V(phi(F_s))``; ASCM turns ``F_f`` into M
  spatial masks ``S_m = sigmoid(conv3x3(F_f))`` (H x W) and M channel masks
  ``C_m = sigmoid(MLP(GAP(F_f)))`` (C). Loss (:func:`masked_mse` + :func:`mask_diversity`):
  ``L = 1/(B M) sum_{b,m} sum_{c,h,w} S_m C_m (F_t - phi(F_s))^2 / sum_{c,h,w} S_m C_m
  + lambda * mean_{m<n} cos(S_m x C_m, S_n x C_n)``.
  The normaliser (the masks' mass) makes the term a weighted mean, so shrinking every mask
  cannot drive it to zero; the diversity term keeps the M masks on different pixels and
  channels. Fusion and masks are parameters of the loss module: they train with the student
  (and its projector ``phi``, the Term's projector), follow its state, and are never exported.
* ``static_mask`` (the claim's baseline, FGD-style): the same weighted mean with one mask
  fixed by the teacher, as FGD's focal term (Yang et al., "Focal and Global Knowledge
  Distillation for Detectors", CVPR 2022, Eqs. 3-5): spatial ``softmax_hw(mean_c |F_t| / T)``
  and channel ``softmax_c(mean_hw |F_t| / T)``, T = 0.5. Without boxes there is no
  foreground/background split (segmentation form: inference), and FGD's attention and global
  terms are left out; since both attentions sum to 1 the normaliser is 1, i.e. FGD's
  ``H W C``-scaled sum divided by ``H W C``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..projectors import resize_map
from ..registry import LOSSES
from ..schema import Depth, NonNeg, Temperature, Width
from .features import _no_autocast, _pair, _require_same_shape, _upcast

PAPER = "ACAM-KD: Adaptive and Cooperative Attention Masking for Knowledge Distillation"
FGD = "Focal and Global Knowledge Distillation for Detectors"


def _check_maps(name: str, s: Tensor, t: Tensor) -> None:
    _require_same_shape(name, s, t)
    if s.dim() != 4:
        raise ConfigError(f"{name}.inputs", tuple(s.shape), "(B, C, H, W) feature maps")


def masked_mse(s: Tensor, t: Tensor, spatial: Tensor, channel: Tensor,
               eps: float = 1e-12) -> Tensor:
    """Mask-weighted mean squared error, averaged over samples and masks:
    ``1/(B M) sum_{b,m} [sum_{c,h,w} S_bmhw C_bmc (t - s)^2_bchw] / [sum_hw S_bmhw sum_c C_bmc]``.

    ``s``, ``t``: (B, C, H, W) (``t`` is detached); ``spatial``: (B, M, H, W);
    ``channel``: (B, M, C); masks non-negative (gradients flow into them)."""
    d2 = (s - t.detach()).pow(2)
    num = torch.einsum("bmhw,bmc,bchw->bm", spatial, channel, d2)
    den = spatial.sum((2, 3)) * channel.sum(2)
    return (num / den.clamp_min(eps)).mean()


def mask_diversity(spatial: Tensor, channel: Tensor) -> Tensor:
    """Mean pairwise cosine similarity of the M joint masks ``S_m x C_m`` of each sample,
    averaged over samples and the ``M (M - 1) / 2`` pairs; 0 for a single mask. The cosine of
    two outer products factorises, ``cos(S_m x C_m, S_n x C_n) = cos(S_m, S_n) cos(C_m, C_n)``,
    so the (C, H, W) masks are never built. Lower = masks further apart."""
    m = spatial.shape[1]
    if m < 2:
        return spatial.sum() * 0.0
    s = F.normalize(spatial.flatten(2), dim=-1)
    c = F.normalize(channel, dim=-1)
    cos = (s @ s.transpose(1, 2)) * (c @ c.transpose(1, 2))  # (B, M, M)
    i, j = torch.triu_indices(m, m, 1, device=cos.device)
    return cos[:, i, j].mean()


class STCAFusion(nn.Module):
    """Student-teacher cross-attention feature fusion (STCA-FF): per-pixel tokens, queries
    from the teacher map, keys and values from the projected student map average-pooled to at
    most ``kv_grid x kv_grid`` (keeps the attention cheap: HW x kv_grid^2), one head of width
    ``dim``. Returns ``F_f`` (B, dim, H, W) on the teacher's grid."""

    def __init__(self, channels: int, dim: int, kv_grid: int):
        super().__init__()
        self.q = nn.Conv2d(channels, dim, 1)
        self.k = nn.Conv2d(channels, dim, 1)
        self.v = nn.Conv2d(channels, dim, 1)
        self.kv_grid, self.scale = int(kv_grid), 1.0 / math.sqrt(dim)

    def forward(self, ft: Tensor, fs: Tensor) -> Tensor:
        b, _, h, w = ft.shape
        kv = resize_map(fs, (min(h, self.kv_grid), min(w, self.kv_grid)))
        q = self.q(ft).flatten(2).transpose(1, 2)  # (B, HW, d)
        k = self.k(kv).flatten(2)  # (B, d, N)
        v = self.v(kv).flatten(2).transpose(1, 2)  # (B, N, d)
        attn = torch.softmax((q @ k) * self.scale, dim=-1)
        return (attn @ v).transpose(1, 2).reshape(b, -1, h, w)


class ASCM(nn.Module):
    """Adaptive spatial-channel masking: from ``F_f`` (B, dim, H, W), ``masks`` spatial masks
    ``sigmoid(conv3x3(F_f))`` (B, M, H, W) and channel masks ``sigmoid(MLP(GAP(F_f)))``
    (B, M, C), C the distilled width."""

    def __init__(self, dim: int, channels: int, masks: int, hidden: int):
        super().__init__()
        self.masks, self.channels = int(masks), int(channels)
        self.spatial = nn.Conv2d(dim, masks, 3, padding=1)
        self.channel = nn.Sequential(
            nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, masks * channels)
        )

    def forward(self, f: Tensor) -> tuple[Tensor, Tensor]:
        s = torch.sigmoid(self.spatial(f))
        c = torch.sigmoid(self.channel(f.mean((2, 3)))).view(f.shape[0], self.masks,
                                                             self.channels)
        return s, c


def _positive_int(field: str, v, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ConfigError(field, v, f"an integer >= {lo}")
    return v


@LOSSES.register("acam", paper=PAPER, year=2025, inputs="features", default_weight=1.0,
                 stateful=True)
class ACAMLoss(nn.Module):
    """ACAM-KD feature loss (module doc) on one tapped map. The student side must already be
    the teacher's shape: give the Term a projector (``conv1x1``: the paper's ``phi``).

    ``masks`` M (default 4), ``dim`` attention width (32), ``kv_grid`` key/value grid side
    (8), ``diversity_weight`` lambda (1.0); all our choices (the paper's are unknown). The
    student map enters the fusion detached (ours): the student is pulled only by the masked
    difference and cannot lower its loss by steering where the masks look; fusion and masks
    learn from both terms."""

    def __init__(self, s_shape, t_shape, *, num_samples=None, masks: Depth = 4,
                 dim: Width = 32, kv_grid: Depth = 8, diversity_weight: NonNeg = 1.0):
        super().__init__()
        s_shape, t_shape = tuple(s_shape), tuple(t_shape or ())
        if len(t_shape) != 4 or s_shape[1:] != t_shape[1:]:
            raise ConfigError(
                "acam.inputs", f"student {s_shape} vs teacher {t_shape}",
                "two equal (B, C, H, W) maps: give the term projector: conv1x1 (phi)",
            )
        self.m = _positive_int("acam.masks", masks)
        dim = _positive_int("acam.dim", dim)
        kv_grid = _positive_int("acam.kv_grid", kv_grid)
        if isinstance(diversity_weight, bool) or not diversity_weight >= 0:
            raise ConfigError("acam.diversity_weight", diversity_weight, "a number >= 0")
        self.diversity_weight = float(diversity_weight)
        c = t_shape[1]
        self.fusion = STCAFusion(c, dim, kv_grid)
        self.ascm = ASCM(dim, c, self.m, hidden=max(dim, 16))

    def masks(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(S, C)`` for projected student ``s`` and teacher ``t`` maps (both detached)."""
        return self.ascm(self.fusion(t.detach(), s.detach()))

    def forward(self, s: Tensor, t: Tensor, *, y=None, idx=None, **_) -> Tensor:
        s, t = _upcast(s), _upcast(t).detach()
        _check_maps("acam", s, t)
        spatial, channel = self.masks(s, t)
        with _no_autocast(s):  # the weighted sums in full precision under AMP
            spatial, channel = spatial.to(s.dtype), channel.to(s.dtype)
            loss = masked_mse(s, t, spatial, channel)
            if self.diversity_weight and self.m > 1:
                loss = loss + self.diversity_weight * mask_diversity(spatial, channel)
        return loss


def teacher_masks(t: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """FGD's attention masks of a teacher map (B, C, H, W): spatial (B, 1, H, W) =
    ``softmax_hw(mean_c |F_t| / T)``, channel (B, 1, C) = ``softmax_c(mean_hw |F_t| / T)``;
    each sums to 1 per sample."""
    a = t.detach().abs()
    b, c, h, w = a.shape
    spatial = torch.softmax(a.mean(1).flatten(1) / temperature, -1).view(b, 1, h, w)
    channel = torch.softmax(a.mean((2, 3)) / temperature, -1).view(b, 1, c)
    return spatial, channel


@LOSSES.register("static_mask", paper=FGD, year=2022, inputs="features", default_weight=1.0)
def static_mask(s: Tensor, t: Tensor, *, temperature: Temperature = 0.5) -> Tensor:
    """Static teacher-attention masked MSE (FGD-style focal term without boxes; the baseline of
    the ACAM-KD claim): :func:`masked_mse` with the single mask :func:`teacher_masks` ``(t,
    T)``, i.e. ``1/B sum_b sum_{c,h,w} A^S_hw A^C_c (t - s)^2``. The masks come from the
    teacher alone, so they are the same for an image at every epoch. Shapes: equal (B, C, H, W)
    maps (a projector on the student tap)."""
    _check_maps("static_mask", s, t)
    s, t = _pair(s, t)
    with _no_autocast(s):
        spatial, channel = teacher_masks(t, float(temperature))
        return masked_mse(s, t, spatial, channel)
