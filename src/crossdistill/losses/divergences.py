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


def kl_terms(log_p: Tensor, log_q: Tensor) -> Tensor:
    """The (..., V) terms ``p_v (log p_v - log q_v)`` of ``KL(p || q)``, with ``0 * log 0 = 0``.

    The difference is zeroed where ``p_v = 0`` *before* the product, so neither the value nor
    the gradient sees ``0 * inf`` (a ``where`` after the product would leak NaN gradients).
    """
    p = log_p.exp()
    return p * torch.where(p > 0, log_p - log_q, 0.0)


def kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p || q) = sum_v p_v (log p_v - log q_v)`` (see :func:`kl_terms`)."""
    return kl_terms(log_p, log_q).sum(-1)


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
    return jsd_terms(log_p_t, log_q_s, beta).sum(-1)


def jsd_terms(log_p_t: Tensor, log_q_s: Tensor, beta: float) -> Tensor:
    """The (..., V) terms of :func:`generalized_jsd` (the mixture is per class, so the
    divergence is a sum of per-class terms: vocabulary tiles can be scored separately)."""
    if beta == 0:
        return kl_terms(log_p_t, log_q_s)
    if beta == 1:
        return kl_terms(log_q_s, log_p_t)
    log_m = log_mix(log_p_t, log_q_s, beta)
    return beta * kl_terms(log_p_t, log_m) + (1 - beta) * kl_terms(log_q_s, log_m)


def tvd_terms(log_p: Tensor, log_q: Tensor) -> Tensor:
    return 0.5 * (log_p.exp() - log_q.exp()).abs()


def tvd(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Total variation distance ``1/2 sum_v |p_v - q_v|`` (symmetric, in [0, 1])."""
    return tvd_terms(log_p, log_q).sum(-1)


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


def topk_buckets(t_vals: Tensor, t_idx: Tensor, log_q_s: Tensor) -> tuple[Tensor, Tensor]:
    """Teacher and student as distributions over ``k + 1`` buckets: the teacher's top-k classes
    one by one, and one tail bucket holding everything else, on both sides.

    ``t_vals`` (..., k) are the teacher's log-probabilities of its top-k classes over the *full*
    vocabulary (a store's ``values - lse``), ``t_idx`` (..., k) their class indices (distinct),
    ``log_q_s`` (..., V) the student's log-probabilities. The teacher's tail is
    ``1 - sum_k p_t`` (clamped at 0; ``-expm1(logsumexp)`` keeps its precision when the top-k
    hold almost all mass), the student's is its mass outside the k indices, a ``logsumexp``
    over the other classes (no ``1 - sum`` cancellation). Returns ``(log_p, log_q)`` of shape
    (..., k + 1), or (..., k) when ``k = V`` (no tail). Merging classes never increases an
    f-divergence (data processing), so any divergence of the buckets is a lower bound of the
    one against any teacher with these top-k values, exact when ``k >= V - 1``.
    """
    if t_vals.shape != t_idx.shape or t_vals.shape[:-1] != log_q_s.shape[:-1]:
        raise ValueError(
            f"top-k values {tuple(t_vals.shape)}, indices {tuple(t_idx.shape)} and student "
            f"{tuple(log_q_s.shape)} must share the leading dims (values/indices (..., k))"
        )
    t_idx = t_idx.long()
    q_k = log_q_s.gather(-1, t_idx)
    if t_vals.shape[-1] >= log_q_s.shape[-1]:
        return t_vals, q_k
    p_tail = (-torch.expm1(t_vals.logsumexp(-1))).clamp_min(0)
    q_tail = log_q_s.scatter(-1, t_idx, float("-inf")).logsumexp(-1)
    return (torch.cat([t_vals, p_tail.log().unsqueeze(-1)], -1),
            torch.cat([q_k, q_tail.unsqueeze(-1)], -1))


def topk_kl(t_vals: Tensor, t_idx: Tensor, log_q_s: Tensor) -> Tensor:
    """``KL(p_t || q_s)`` from a stored top-k teacher, over the ``k + 1`` buckets of
    :func:`topk_buckets` (a zero teacher tail contributes 0). Stored top-k logits fix the
    distribution at temperature 1 only (the tail's shape is unknown), so this divergence has
    no temperature."""
    return kl(*topk_buckets(t_vals, t_idx, log_q_s))


NAMES = ("fkl", "rkl", "jsd", "tvd", "skl", "srkl")


def terms(name: str, log_p: Tensor, log_q: Tensor, *, beta: float = 0.5,
          alpha: float = 0.1) -> Tensor:
    """The (..., V) per-class terms of divergence ``name`` (one of :data:`NAMES`) of teacher
    ``p`` and student ``q``; every one of them is a sum of per-class terms."""
    if name == "fkl":
        return kl_terms(log_p, log_q)
    if name == "rkl":
        return kl_terms(log_q, log_p)
    if name == "jsd":
        return jsd_terms(log_p, log_q, beta)
    if name == "tvd":
        return tvd_terms(log_p, log_q)
    if name == "skl":
        return kl_terms(log_p, log_mix(log_p, log_q, alpha))
    if name == "srkl":
        return kl_terms(log_q, log_mix(log_q, log_p, alpha))
    raise ValueError(f"unknown divergence {name!r}; one of {', '.join(NAMES)}")


def by_name(name: str, log_p: Tensor, log_q: Tensor, *, beta: float = 0.5,
            alpha: float = 0.1) -> Tensor:
    """The divergence ``name`` (one of :data:`NAMES`) of teacher ``p`` and student ``q``."""
    return terms(name, log_p, log_q, beta=beta, alpha=alpha).sum(-1)
