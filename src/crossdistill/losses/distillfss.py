"""DistillFSS's losses: a multi-class focal loss (on labels or on the teacher's argmax) and the
mean MSE between teacher and student coarse maps.

Paper: De Marinis et al., "DistillFSS: Synthesizing Few-Shot Knowledge into a Lightweight
Segmentation Model", 2025 (code: pasqualedem/DistillFSS, ``distillfss/models/loss.py``, as
read). With ``FL(z, c) = w_c (1 - p_c)^gamma (-log p_c)``, ``p = softmax(z)`` over the class
axis, per position:

* distillation (``DistillationLoss``): ``L = 1/2 [FL(z_s, argmax z_t) + L_coarse]``;
* refinement with labels (``RefineDistillationLoss``, alpha = beta = gamma = 1/3):
  ``L = 1/3 [FL(z_t, y) + FL(z_s, y) + L_coarse]``;
* ``L_coarse = mean_g MSE(M_t^g, M_s^g)``: per feature group ``g`` the mean squared error
  over all elements, averaged over the groups (the official code sums the per-level MSEs of
  a group and divides by their count, then averages over classes).

Terms here: ``fss_focal`` (labels), ``fss_focal_kd`` (the teacher's argmax as the target),
``fss_coarse_mse``; the 1/2 and 1/3 are the Terms' weights (``methods/distillfss.py``). The
focal values are per position, so the Term averages them over the positions that count
(the official ``torch.mean`` over all pixels; -100 pixels give 0 and are left out).

crossdistill had no multi-class focal loss to reuse: ``losses/detection.py``'s
``focal_heatmap`` is CenterNet's penalty-reduced sigmoid focal loss on Gaussian heatmaps
(summed, divided by the object count), another loss. Bug of the official code not copied:
its ``FocalLoss`` with class ``weights`` reads ``self.weights.to(x.device)`` with ``x``
undefined (a NameError as soon as weights are given); here ``weights[c]`` of each position's
target class multiplies its focal value, as the code intends.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..registry import LOSSES
from ..schema import NonNeg
from .features import _pair, _upcast

PAPER = "DistillFSS: Synthesizing Few-Shot Knowledge into a Lightweight Segmentation Model"


def _class_last(z: Tensor, class_dim: int, field: str) -> Tensor:
    if isinstance(class_dim, bool) or not isinstance(class_dim, int) or not (
            -z.dim() <= class_dim < z.dim()):
        raise ConfigError(f"{field}.class_dim", class_dim, f"a dim of the {z.dim()}-d logits")
    return z if class_dim in (-1, z.dim() - 1) else z.movedim(class_dim, -1)


def _weights(weights, k: int, field: str, like: Tensor) -> Tensor | None:
    if weights is None:
        return None
    w = torch.as_tensor(weights, dtype=like.dtype, device=like.device)
    if w.dim() != 1 or len(w) != k or not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ConfigError(f"{field}.weights", list(weights) if hasattr(weights, "__len__")
                          else weights, f"{k} finite class weights >= 0, one per class")
    return w


def focal(z: Tensor, target: Tensor, gamma: float = 2.0, weights: Tensor | None = None) -> Tensor:
    """Per-position focal loss ``w_c (1 - p_c)^gamma (-log p_c)`` of logits ``z`` (..., K)
    against integer targets ``target`` (...) (-100: value 0). ``gamma = 0`` without weights
    is the cross-entropy."""
    if z.shape[:-1] != target.shape:
        raise ConfigError("fss_focal.target", tuple(target.shape),
                          f"one class id per position of the logits {tuple(z.shape)}")
    valid = target != -100
    c = torch.where(valid, target.long(), 0)
    logp = F.log_softmax(z, -1).gather(-1, c[..., None])[..., 0]
    value = (1 - logp.exp()).clamp_min(0).pow(gamma) * -logp
    if weights is not None:
        value = value * weights[c]
    return torch.where(valid, value, torch.zeros_like(value))


def _gamma(gamma, field: str) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma <= 10:
        raise ConfigError(f"{field}.gamma", gamma, "a number in [0, 10] (the paper: 2)")
    return float(gamma)


@LOSSES.register("fss_focal", paper=PAPER, year=2025, inputs="labels", default_weight=1.0)
def fss_focal(s: Tensor, t: Tensor | None = None, *, y: Tensor, gamma: NonNeg = 2.0,
              weights: list[float] | None = None, class_dim: int = -1) -> Tensor:
    """Focal loss of the student logits ``s`` against the labels ``y`` (per position; the
    teacher is ignored). ``class_dim``: where ``s`` keeps its class axis (1 for raw
    ``(B, K, H, W)`` maps read by an ``output.*`` tap; the adapter's logits have it last).
    ``weights``: one per class (the official code crashes when they are given)."""
    z = _class_last(_upcast(s), class_dim, "fss_focal")
    return focal(z, y, _gamma(gamma, "fss_focal"), _weights(weights, z.shape[-1], "fss_focal",
                                                             z))


@LOSSES.register("fss_focal_kd", paper=PAPER, year=2025, inputs="logits", default_weight=0.5)
def fss_focal_kd(s: Tensor, t: Tensor, *, gamma: NonNeg = 2.0,
                 weights: list[float] | None = None, class_dim: int = -1) -> Tensor:
    """Focal loss of the student logits against the teacher's hard prediction
    ``argmax_k t`` (DistillFSS's logit distillation; per position)."""
    z = _class_last(_upcast(s), class_dim, "fss_focal_kd")
    zt = _class_last(t.detach(), class_dim, "fss_focal_kd")
    if zt.shape != z.shape:
        raise ConfigError("fss_focal_kd.inputs", f"student {tuple(z.shape)} vs teacher "
                          f"{tuple(zt.shape)}", "logits of one shape")
    w = _weights(weights, z.shape[-1], "fss_focal_kd", z)
    return focal(z, zt.argmax(-1), _gamma(gamma, "fss_focal_kd"), w)


@LOSSES.register("fss_coarse_mse", paper=PAPER, year=2025, inputs="features",
                 default_weight=0.5)
def fss_coarse_mse(s, t) -> Tensor:
    """``mean_g mean((M_t^g - M_s^g)^2)`` over the tapped coarse maps (a tap or a list of
    taps, one per feature group; shapes may differ between groups, not between sides)."""
    s = [s] if torch.is_tensor(s) else list(s)
    t = [t] if torch.is_tensor(t) else list(t)
    if not s or len(s) != len(t):
        raise ConfigError("fss_coarse_mse.teacher", len(t),
                          f"one teacher coarse map per student map ({len(s)})")
    out = []
    for i, (a, b) in enumerate(zip(s, t)):
        if a.shape != b.shape:
            raise ConfigError(f"fss_coarse_mse.student.{i}", tuple(a.shape),
                              f"the teacher's coarse map shape {tuple(b.shape)}")
        a, b = _pair(a, b)
        out.append((a - b).pow(2).mean())
    return torch.stack(out).mean()
