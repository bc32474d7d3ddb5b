"""Token-level divergences for sequence (LLM) distillation: fkl, jsd, tvd, skl, srkl, topk.

Each takes student logits ``s`` and teacher logits ``t`` of shape (..., V) (tokens on the
leading dims) and returns one value per position (...); the :class:`~crossdistill.Term`
averages them over the context's mask (the valid tokens), which is TRL's
``sum / num_valid_tokens`` reduction. ``p = softmax(t / T)`` is the teacher, ``q =
softmax(s / T)`` the student, at the *loss* temperature ``T`` (default 1, no ``T^2`` factor:
TRL's, DistiLLM's and TAID's convention) -- a loss setting, separate from any sampling
temperature used to generate continuations. The maths lives once in ``divergences.py``.
The teacher is detached; softmaxes run in at least float32.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..registry import LOSSES
from ..schema import Prob, Temperature
from ..signals import TOPK, TopK
from . import divergences as D
from .features import _pair
from .logits import _check_logits, _check_temperature


def _log_probs(name: str, s: Tensor, t: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Checked ``(log p_teacher, log q_student)`` at the loss temperature."""
    _check_temperature(name, temperature)
    _check_logits(name, s, t)
    s, t = _pair(s, t)
    return F.log_softmax(t / temperature, dim=-1), F.log_softmax(s / temperature, dim=-1)


def _check_prob(name: str, field: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name}.{field}", value, "must be in [0, 1]")


@LOSSES.register(
    "fkl",
    paper="On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes "
    "(forward KL, GKD's supervised baseline)",
    year=2024,
    inputs="logits",
    default_weight=1.0,
)
def fkl(s: Tensor, t: Tensor, *, temperature: Temperature = 1.0) -> Tensor:
    """Forward KL per token, ``KL(p || q) = sum_v p_v log(p_v / q_v)`` (Agarwal et al., GKD,
    ICLR 2024; TRL's ``beta = 0``). The unscaled form: ``kd`` is the same divergence times
    ``T^2`` with Hinton's default T=4; at T=1 the two agree. A true KL, not DistiLLM's/TAID's
    cross-entropy ``-sum p log q`` (same gradient, value lower by the teacher's entropy).
    """
    log_p, log_q = _log_probs("fkl", s, t, temperature)
    return D.kl(log_p, log_q)


@LOSSES.register(
    "jsd",
    paper="On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes",
    year=2024,
    inputs="logits",
    default_weight=1.0,
)
def jsd(s: Tensor, t: Tensor, *, beta: Prob = 0.5, temperature: Temperature = 1.0) -> Tensor:
    """Generalised JSD of GKD (Rishabh Agarwal et al., ICLR 2024, Eq. 1), TRL's convention:
    ``m = beta p + (1 - beta) q`` (beta = the teacher's share),
    ``JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m)``; ``beta = 0`` is forward KL and
    ``beta = 1`` reverse KL (special cases: the interior formula tends to 0 at both ends, see
    :func:`~crossdistill.losses.divergences.generalized_jsd`). Default beta 0.5, T 1.
    """
    _check_prob("jsd", "beta", beta)
    log_p, log_q = _log_probs("jsd", s, t, temperature)
    return D.generalized_jsd(log_p, log_q, beta)


@LOSSES.register(
    "tvd",
    paper="f-Divergence Minimization for Sequence-Level Knowledge Distillation (TVD)",
    year=2023,
    inputs="logits",
    default_weight=1.0,
)
def tvd(s: Tensor, t: Tensor, *, temperature: Temperature = 1.0) -> Tensor:
    """Total variation distance per token, ``1/2 sum_v |p_v - q_v|`` (Wen et al., f-DISTILL,
    ACL 2023; a baseline in DistiLLM and TAID). Symmetric and bounded in [0, 1].
    """
    log_p, log_q = _log_probs("tvd", s, t, temperature)
    return D.tvd(log_p, log_q)


@LOSSES.register(
    "skl",
    paper="DistiLLM: Towards Streamlined Distillation for Large Language Models (skew KL)",
    year=2024,
    inputs="logits",
    default_weight=1.0,
)
def skl(s: Tensor, t: Tensor, *, alpha: Prob = 0.1, temperature: Temperature = 1.0) -> Tensor:
    """Skew KL (Jongwoo Ko et al., DistiLLM, ICML 2024):
    ``SKL_alpha = KL(p || alpha p + (1 - alpha) q)`` -- the student gets a share alpha of the
    teacher. alpha = 0 is forward KL; default 0.1 (the paper's). A true KL (DistiLLM's code
    returns the cross-entropy), mixed in log space (no NaN at large logit spreads).
    """
    _check_prob("skl", "alpha", alpha)
    log_p, log_q = _log_probs("skl", s, t, temperature)
    return D.skew_kl(log_p, log_q, alpha)


@LOSSES.register(
    "srkl",
    paper="DistiLLM: Towards Streamlined Distillation for Large Language Models (skew reverse KL)",
    year=2024,
    inputs="logits",
    default_weight=1.0,
)
def srkl(s: Tensor, t: Tensor, *, alpha: Prob = 0.1, temperature: Temperature = 1.0) -> Tensor:
    """Skew reverse KL (Jongwoo Ko et al., DistiLLM, ICML 2024):
    ``SRKL_alpha = KL(q || (1 - alpha) p + alpha q)`` -- the teacher gets a share alpha of the
    student. alpha = 0 is reverse KL; default 0.1.
    """
    _check_prob("srkl", "alpha", alpha)
    log_p, log_q = _log_probs("srkl", s, t, temperature)
    return D.skew_rkl(log_p, log_q, alpha)


@LOSSES.register(
    "topk",
    paper="Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs (top-k "
    "teacher logits with a residual bucket)",
    year=2025,
    inputs="logits",
    default_weight=1.0,
    teacher_tap=TOPK,
)
def topk(
    s: Tensor,
    t: TopK,
    *,
    divergence: Literal["fkl", "rkl", "jsd", "tvd", "skl", "srkl"] = "fkl",
    beta: Prob = 0.5,
    alpha: Prob = 0.1,
) -> Tensor:
    """A token divergence against a *stored* top-k teacher, read as stored (tap ``topk`` of a
    store made with ``--topk K``): the teacher's k classes are compared one by one and the rest
    of the vocabulary is one tail bucket on both sides (``divergences.topk_buckets``; Anshumann
    et al. 2025 show that plain top-k KD without the residual mass is biased). ``divergence``
    picks the function of the two (k + 1)-bucket distributions, with ``beta`` (jsd) and
    ``alpha`` (skl, srkl) as in their own losses; all at T = 1, since stored logits fix the
    teacher's distribution at T = 1 only. ``fkl`` equals
    ``divergences.topk_kl``; ``rkl`` floors a teacher tail that rounds to 0 at 1e-12 (else
    any student tail mass would make it infinite)."""
    if not isinstance(t, TopK):
        raise ConfigError(
            "topk.teacher", type(t).__name__,
            "the top-k signal of a teacher store (teacher tap 'topk' of a store made with "
            "--topk K); with an online teacher use fkl / jsd on its full logits",
        )
    log_q = F.log_softmax(s.to(torch.promote_types(s.dtype, torch.float32)), dim=-1)
    log_p = t.log_probs().to(log_q.device, log_q.dtype)
    log_p, log_q = D.topk_buckets(log_p, t.indices.to(log_q.device), log_q)
    if divergence == "rkl":
        log_p = log_p.clamp_min(-27.631)  # log(1e-12)
    return D.by_name(divergence, log_p, log_q, beta=beta, alpha=alpha)
