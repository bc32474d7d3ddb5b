"""Losses on class logits: supervised cross-entropy, KD (forward KL), reverse KL, DKD and DIST.

All functions take student logits ``s`` and teacher logits ``t`` of shape (..., K): classes
on the last dimension, any leading dims (samples, tokens, pixels). ``ce``, ``kd``, ``rkl``
and ``dkd`` return one value per position, shape (...); the :class:`~crossdistill.Term`
averages them over the context's mask (labelled positions for ``ce``). ``dist`` compares
relations across the batch, so it returns a scalar over the valid rows (``mask``).
Softmaxes run in at least float32 (half inputs are upcast), because a bf16 softmax at
temperature 4 loses most of the "dark knowledge" in the tail.
The teacher is always detached. None of these multiplies its own term weight; the weight a
paper recommends is registered as ``default_weight``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..registry import LOSSES
from ..schema import Fraction, NonNeg, Temperature
from .divergences import kl
from .features import _pair, _upcast

_MASK = 1000.0  # subtracted from the target logit so it vanishes from the NCKD softmax


def _check_temperature(name: str, temperature: float) -> None:
    if not temperature > 0:
        raise ConfigError(f"{name}.temperature", temperature, "must be a positive number")


def _check_logits(name: str, s: Tensor, t: Tensor) -> None:
    if s.dim() < 2 or s.shape != t.shape:
        hint = ""
        if s.dim() >= 2 and s.shape[:-1] == t.shape[:-1]:
            hint = (
                f" (vocabularies differ: student {s.shape[-1]}, teacher {t.shape[-1]}; a "
                "same-tokenizer loss needs one vocabulary: use a cross-tokenizer loss such as "
                "ULD or ALM for different tokenizers)"
            )
        raise ConfigError(
            f"{name}.inputs",
            f"student {tuple(s.shape)} vs teacher {tuple(t.shape)}",
            "both must be (..., classes) logits of the same shape" + hint,
        )


def _soft_kl(log_p_s: Tensor, p_t: Tensor) -> Tensor:
    """KL(p_t || p_s) summed over the last (class) dimension: one value per position."""
    return F.kl_div(log_p_s, p_t, reduction="none").sum(-1)


@LOSSES.register(
    "ce",
    paper="Rethinking the Inception Architecture for Computer Vision (label smoothing)",
    year=2016,
    inputs="labels",
    default_weight=1.0,
)
def ce(s: Tensor, t: Tensor | None = None, *, y: Tensor, label_smoothing: Fraction = 0.0) -> Tensor:
    """Cross-entropy of the student logits against hard labels; the teacher is ignored.

    Implements ``-sum_k q_ik log softmax(s_i)_k`` per position i, with ``q = (1-eps)
    onehot(y) + eps/K`` (label smoothing, Christian Szegedy et al., 2016; ``eps=0`` is plain
    CE); the Term averages over the labelled positions.

    Shapes: ``s`` (..., K) logits, ``y`` (...) integer targets; ``y == -100`` marks an
    unlabelled sample or ignored token/pixel (value 0 there, left out of the mean by the
    Term). Default weight 1.0.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ConfigError("ce.label_smoothing", label_smoothing, "must be in [0, 1)")
    y = y.long()
    if s.dim() == 2:
        return F.cross_entropy(
            _upcast(s), y, label_smoothing=label_smoothing, ignore_index=-100, reduction="none"
        )
    per = F.cross_entropy(
        _upcast(s).reshape(-1, s.shape[-1]),
        y.reshape(-1),
        label_smoothing=label_smoothing,
        ignore_index=-100,
        reduction="none",
    )
    return per.view(y.shape)


@LOSSES.register(
    "kd",
    paper="Distilling the Knowledge in a Neural Network",
    year=2015,
    inputs="logits",
    default_weight=0.9,
)
def kd(s: Tensor, t: Tensor, *, temperature: Temperature = 4.0) -> Tensor:
    """Soft-target distillation (Geoffrey Hinton, Oriol Vinyals, Jeff Dean, 2015).

    ``L_i = T^2 * KL( softmax(t_i/T) || softmax(s_i/T) )`` per position i (Eq. 2's soft
    targets; the Term averages over positions). The ``T^2`` keeps the
    gradient scale independent of ``T`` (the paper's argument), so the term weight need not be
    re-tuned when ``T`` changes.

    Shapes: ``s``, ``t`` (..., K) logits -> (...). Default T=4, term weight 0.9.

    Weighting convention (the same in the ``kd`` recipe, the README and the demo): terms are
    added with independent weights, as in the CRD code (``gamma*CE + alpha*KD + beta*other``),
    not Hinton's convex ``(1-alpha)*CE + alpha*KD``, because a run may stack any number of
    terms (kd + a feature hint + ...), for which a convex mix is undefined. Every recipe keeps
    CE at weight 1.0 (as DKD's code does for its methods), so recipes differ only in what they
    add; the default is therefore ``1.0*CE + 0.9*T^2*KL`` (CRD's own KD row uses CE 0.1: set
    ``weight: 0.1`` on the ``ce`` term to reproduce it).
    """
    _check_temperature("kd", temperature)
    _check_logits("kd", s, t)
    s, t = _pair(s, t)
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    p_t = F.softmax(t / temperature, dim=-1)
    return _soft_kl(log_p_s, p_t) * temperature**2


@LOSSES.register(
    "rkl",
    paper="TAID: Temporally Adaptive Interpolated Distillation (reverse-KL baseline)",
    year=2025,
    inputs="logits",
    default_weight=1.0,
)
def rkl(s: Tensor, t: Tensor, *, temperature: Temperature = 1.0) -> Tensor:
    """Reverse KL, the mode-seeking baseline that TAID (Shing et al., "TAID: Temporally Adaptive
    Interpolated Distillation", ICLR 2025) compares against next to forward KL:
    ``L_i = T^2 * KL( softmax(s_i/T) || softmax(t_i/T) )`` per position i.

    Gradient flows through both the student's distribution and its log-probabilities (the
    teacher is detached). Default T=1 (the paper's setting).
    """
    _check_temperature("rkl", temperature)
    _check_logits("rkl", s, t)
    s, t = _pair(s, t)
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    return kl(log_p_s, log_p_t) * temperature**2


def _binary_target_kl(s: Tensor, t: Tensor, onehot: Tensor, temperature: float) -> Tensor:
    """TCKD: KL between the binary distributions [p_target, 1 - p_target] of teacher/student."""
    p_s = F.softmax(s / temperature, dim=-1)
    p_t = F.softmax(t / temperature, dim=-1)
    b_s = torch.stack([(p_s * onehot).sum(-1), (p_s * (1 - onehot)).sum(-1)], dim=-1)
    b_t = torch.stack([(p_t * onehot).sum(-1), (p_t * (1 - onehot)).sum(-1)], dim=-1)
    return _soft_kl(torch.log(b_s), b_t)


def _non_target_kl(s: Tensor, t: Tensor, onehot: Tensor, temperature: float) -> Tensor:
    """NCKD: KL over the non-target classes, renormalised by masking the target logit."""
    log_p_s = F.log_softmax(s / temperature - _MASK * onehot, dim=-1)
    p_t = F.softmax(t / temperature - _MASK * onehot, dim=-1)
    return _soft_kl(log_p_s, p_t)


@LOSSES.register(
    "dkd",
    paper="Decoupled Knowledge Distillation",
    year=2022,
    inputs="logits",
    default_weight=1.0,
)
def dkd(
    s: Tensor,
    t: Tensor,
    *,
    y: Tensor,
    alpha: NonNeg = 1.0,
    beta: NonNeg = 8.0,
    temperature: Temperature = 4.0,
) -> Tensor:
    """Decoupled KD (Borui Zhao, Quan Cui, Renjie Song, Yiyu Qiu, Jiajun Liang, CVPR 2022).

    KD splits into target-class KD and non-target-class KD; DKD weights them separately:
    ``L = T^2 * (alpha * TCKD + beta * NCKD)`` with
    ``TCKD = KL([p_y^t, 1-p_y^t] || [p_y^s, 1-p_y^s])`` and
    ``NCKD = KL(p_hat^t || p_hat^s)``, where ``p_hat`` is the softmax over the classes other
    than ``y`` (computed by subtracting 1000 from the target logit before the softmax).
    Both KLs are per position (the Term averages). Classic KD equals
    ``TCKD + (1 - p_y^t) NCKD`` (Eq. 1 of the paper).

    Shapes: ``s``, ``t`` (..., K) logits, ``y`` (...) labels; positions with ``y = -100``
    return 0 and the Term leaves them out of the mean (DKD needs a target class).
    Defaults alpha=1, beta=8, T=4 (CIFAR-100). Term weight 1.0; the paper ramps the DKD
    term linearly over the first 20 epochs -- that warm-up is a term-weight schedule,
    configured outside this function.
    """
    _check_temperature("dkd", temperature)
    _check_logits("dkd", s, t)
    s, t = _pair(s, t)
    y = y.long()
    labelled = y != -100
    onehot = F.one_hot(y.clamp_min(0), s.shape[-1]).to(s.dtype)
    tckd = _binary_target_kl(s, t, onehot, temperature)
    nckd = _non_target_kl(s, t, onehot, temperature)
    return torch.where(labelled, (alpha * tckd + beta * nckd) * temperature**2, 0.0)


def _mean_pearson(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Mean over rows of the Pearson correlation between matching rows of ``a`` and ``b``."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    corr = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)
    return corr.mean()


@LOSSES.register(
    "dist",
    paper="Knowledge Distillation from A Stronger Teacher",
    year=2022,
    inputs="logits",
    default_weight=1.0,
)
def dist(
    s: Tensor,
    t: Tensor,
    *,
    beta: NonNeg = 1.0,
    gamma: NonNeg = 1.0,
    temperature: Temperature = 4.0,
    mask: Tensor | None = None,
) -> Tensor:
    """DIST (Tao Huang, Shan You, Fei Wang, Chen Qian, Chang Xu, NeurIPS 2022).

    Matches *relations* instead of exact probabilities, so a much stronger teacher's sharper
    outputs need not be reproduced exactly. With ``Y = softmax(Z / T)`` row-wise:
    ``inter = 1 - 1/B sum_i rho(Y^s_i,:, Y^t_i,:)`` (per sample, across classes),
    ``intra = 1 - 1/K sum_k rho(Y^s_:,k, Y^t_:,k)`` (per class, across the batch),
    ``L = T^2 * (beta * inter + gamma * intra)``, where rho is the Pearson correlation
    (with eps=1e-8 in the denominator).

    Shapes: ``s``, ``t`` (..., K) logits; leading dims are flattened to rows and only the
    rows the context's ``mask`` keeps enter (>= 2 rows for a meaningful intra term).
    Defaults beta=gamma=1, T=4 (the paper's ImageNet setting); term weight 1.0.
    """
    _check_temperature("dist", temperature)
    _check_logits("dist", s, t)
    s, t = _pair(s, t)
    if s.dim() > 2 or mask is not None:
        keep = None if mask is None else mask.reshape(-1)
        s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
        if keep is not None:
            s, t = s[keep], t[keep]
    p_s = F.softmax(s / temperature, dim=1)
    p_t = F.softmax(t / temperature, dim=1)
    inter = 1 - _mean_pearson(p_s, p_t)
    intra = 1 - _mean_pearson(p_s.T, p_t.T)
    return (beta * inter + gamma * intra) * temperature**2
