"""Divergences between categorical distributions given as log-probabilities on the last dim.

One implementation of each, shared by the registered losses (``losses/sequence.py``, ``rkl``):
inputs are ``(..., V)`` log-probabilities (``log_softmax`` outputs, at whatever temperature
the caller chose), outputs one value per position ``(...)``; nothing is reduced, detached or
scaled here. Mixtures are formed in log space (``logsumexp`` of the shifted log-probs), never
as ``log(a*p + b*q)`` of probabilities: where both p and q underflow (logit spread > ~104 in
float32) the probability form gives ``0 * log 0 = NaN`` (DistiLLM's bug); here ``0 * log 0``
is 0 and the gradients stay finite.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p || q) = sum_v p_v (log p_v - log q_v)``, with ``0 * log 0 = 0``.

    The difference is zeroed where ``p_v = 0`` *before* the product, so neither the value nor
    the gradient sees ``0 * inf`` (a ``where`` after the product would leak NaN gradients).
    """
    p = log_p.exp()
    diff = torch.where(p > 0, log_p - log_q, 0.0)
    return (p * diff).sum(-1)


def log_mix(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """``log(w * a + (1 - w) * b)`` from log-probabilities, exact at ``w`` = 0 and 1."""
    if w == 0:
        return log_b
    if w == 1:
        return log_a
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def generalized_jsd(log_p_t: Tensor, log_q_s: Tensor, beta: float) -> Tensor:
    """Generalised JSD of GKD (Agarwal et al., ICLR 2024, Eq. 1) in TRL's convention.

    ``m = beta * p_t + (1 - beta) * q_s`` (``beta`` is the *teacher's* share) and
    ``JSD_beta = beta * KL(p_t || m) + (1 - beta) * KL(q_s || m)``. As in TRL's
    ``GKDTrainer.generalized_jsd_loss``, ``beta = 0`` returns ``KL(p_t || q_s)`` (forward KL)
    and ``beta = 1`` returns ``KL(q_s || p_t)`` (reverse KL). Those two are special cases, not
    limits: the interior formula tends to 0 at both ends (``JSD_beta / beta -> FKL`` as beta -> 0,
    ``JSD_beta / (1 - beta) -> RKL`` as beta -> 1), so a sweep of beta towards 0 or 1 also
    shrinks the loss scale roughly like ``beta`` (or ``1 - beta``), not only its shape.
    DistiLLM's ``js_distance(lam)`` makes ``lam`` the student's share: it equals ``beta = 1 - lam``.
    """
    if beta == 0:
        return kl(log_p_t, log_q_s)
    if beta == 1:
        return kl(log_q_s, log_p_t)
    log_m = log_mix(log_p_t, log_q_s, beta)
    return beta * kl(log_p_t, log_m) + (1 - beta) * kl(log_q_s, log_m)


def tvd(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Total variation distance ``1/2 sum_v |p_v - q_v|`` (symmetric, in [0, 1])."""
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def skew_kl(log_p: Tensor, log_q: Tensor, alpha: float) -> Tensor:
    """Skew KL of DistiLLM (Ko et al., ICML 2024): ``KL(p || alpha p + (1 - alpha) q)``.

    ``p`` is the teacher, ``q`` the student: the student side gets a share ``alpha`` of the
    teacher mixed in, which bounds the loss where ``q_v -> 0``. ``alpha = 0`` is forward KL.
    A true divergence: DistiLLM's code returns the cross-entropy ``-sum p log(mix)`` (the
    teacher's entropy dropped; same gradient, different value).
    """
    return kl(log_p, log_mix(log_p, log_q, alpha))


def skew_rkl(log_p: Tensor, log_q: Tensor, alpha: float) -> Tensor:
    """Skew reverse KL of DistiLLM: ``KL(q || (1 - alpha) p + alpha q)``.

    ``p`` is the teacher, ``q`` the student: the teacher side gets a share ``alpha`` of the
    student. ``alpha = 0`` is reverse KL ``KL(q || p)``.
    """
    return kl(log_q, log_mix(log_q, log_p, alpha))


def topk_kl(t_vals: Tensor, t_idx: Tensor, log_q_s: Tensor) -> Tensor:
    """``KL(p_t || q_s)`` from a stored top-k teacher, over ``k`` classes plus one tail bucket.

    ``t_vals`` (..., k) are the teacher's log-probabilities of its top-k classes over the *full*
    vocabulary (a store's ``values - lse``), ``t_idx`` (..., k) their class indices (distinct),
    ``log_q_s`` (..., V) the student's log-probabilities. The rule: the k stored classes are
    compared one by one, and everything else is merged into one bucket on both sides --
    the teacher's tail is ``1 - sum_k p_t`` (clamped at 0; ``-expm1(logsumexp)`` so it keeps
    its precision when the top-k hold almost all mass), the student's tail is its mass outside
    the k indices, a ``logsumexp`` over the other classes (no ``1 - sum`` cancellation). Merging
    classes never increases a KL, so this is a lower bound of the KL against any teacher with
    these top-k values (the store's decoded logits included), exact when ``k = V - 1``; with
    ``k = V`` there is no tail. Stored top-k logits fix the distribution at temperature 1 only
    (the tail's shape is unknown), so this divergence has no temperature.
    """
    if t_vals.shape != t_idx.shape or t_vals.shape[:-1] != log_q_s.shape[:-1]:
        raise ValueError(
            f"topk_kl: values {tuple(t_vals.shape)}, indices {tuple(t_idx.shape)} and student "
            f"{tuple(log_q_s.shape)} must share the leading dims (values/indices (..., k))"
        )
    t_idx = t_idx.long()
    q_k = log_q_s.gather(-1, t_idx)
    head = kl(t_vals, q_k)
    if t_vals.shape[-1] >= log_q_s.shape[-1]:
        return head
    p_tail = (-torch.expm1(t_vals.logsumexp(-1))).clamp_min(0)
    q_tail = log_q_s.scatter(-1, t_idx, float("-inf")).logsumexp(-1)
    tail = p_tail * torch.where(p_tail > 0, torch.log(p_tail) - q_tail, 0.0)
    return head + tail
