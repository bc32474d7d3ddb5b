"""Distillation losses of multimodal LLMs: LLaVA-KD's MDist and RDist.

Cai et al., "LLaVA-KD: A Framework of Distilling Multimodal Large Language Models" (2024;
arXiv 2410.16236). Teacher (l-MLLM) and student (s-MLLM) share the tokenizer, so their
output distributions over the vocabulary can be compared position by position.

- ``mdist`` (Multimodal Distillation): ``L_res = sum_m KL(p_l(y_m | y_<m) || p_s(y_m | y_<m))``
  over the response tokens and ``L_vis = sum_k KL(p_l(. | v_<=k) || p_s(. | v_<=k))`` over
  the ``K`` visual tokens, the LLM's next-token distributions at those positions. Forward
  KL (teacher first) is the paper's KLD; ``divergence`` swaps in any token divergence of
  :mod:`crossdistill.losses.divergences` (the official utilities also hold reverse, skewed,
  symmetric KL, JSD and TVD). ``per="token"`` returns one value per position (for the
  response: the Term averages over the scored tokens, the code's ``sum / num_valid``);
  ``per="sample"`` the mean over each sample's positions, ``(B,)`` (for the visual tokens,
  which the response mask does not cover; every sample has ``K`` of them, so the batch mean
  is the mean over all visual tokens).
- ``rdist`` (Relation Distillation): per sample the ``K x K`` self-correlation of the visual
  tokens, ``R = norm(V) norm(V)^T`` (cosine similarities; the official model code builds
  exactly this from the projector's outputs), for teacher and student; widths may differ.
  The distance between ``R_s`` and ``R_t`` is not in the released code (no training code):
  ``"cosine"`` (default) ``1 - cos(vec R_s, vec R_t)``, our reading of the paper;
  ``"mse"`` / ``"l1"`` the mean squared / absolute difference of the entries.

Teachers are detached; softmaxes and matrices run in at least float32.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..registry import LOSSES
from ..schema import Prob, Temperature
from . import divergences as D
from .correlation import cosine_matrix
from .features import _pair
from .sequence import _check_prob, _log_probs

Divergence = Literal["fkl", "rkl", "jsd", "tvd", "skl", "srkl"]
PAPER = "LLaVA-KD: A Framework of Distilling Multimodal Large Language Models"


@LOSSES.register("mdist", paper=PAPER + " (MDist)", year=2024, inputs="logits",
                 default_weight=1.0)
def mdist(s: Tensor, t: Tensor, *, divergence: Divergence = "fkl",
          temperature: Temperature = 1.0, per: Literal["token", "sample"] = "token",
          beta: Prob = 0.5, alpha: Prob = 0.1) -> Tensor:
    """MDist of logits ``s``, ``t`` (B, L, V) (module docstring): ``D(p_t || q_s)`` per
    position (B, L), or per sample averaged over its L positions (B,). ``beta`` is jsd's
    teacher share, ``alpha`` skl's / srkl's skew (as in their own losses)."""
    if divergence not in D.NAMES:
        raise ConfigError("mdist.divergence", divergence, f"one of {', '.join(D.NAMES)}")
    if per not in ("token", "sample"):
        raise ConfigError("mdist.per", per, "token or sample")
    _check_prob("mdist", "beta", beta)
    _check_prob("mdist", "alpha", alpha)
    if s.dim() != 3:
        raise ConfigError("mdist.inputs", tuple(s.shape), "(B, L, V) logits of L positions")
    log_p, log_q = _log_probs("mdist", s, t, temperature)
    value = D.by_name(divergence, log_p, log_q, beta=beta, alpha=alpha)
    return value.mean(-1) if per == "sample" else value


def self_correlation(v: Tensor) -> Tensor:
    """(B, K, D) tokens -> (B, K, K) cosine similarities between a sample's tokens."""
    return cosine_matrix(v)


@LOSSES.register("rdist", paper=PAPER + " (RDist)", year=2024, inputs="features",
                 default_weight=1.0)
def rdist(s: Tensor, t: Tensor, *, distance: Literal["cosine", "mse", "l1"] = "cosine") -> Tensor:
    """RDist of visual tokens ``s`` (B, K, D_s) and ``t`` (B, K, D_t): one value per sample
    (B,) comparing their self-correlation matrices (module docstring)."""
    if distance not in ("cosine", "mse", "l1"):
        raise ConfigError("rdist.distance", distance, "cosine, mse or l1")
    if s.dim() != 3 or t.dim() != 3 or s.shape[:2] != t.shape[:2]:
        raise ConfigError("rdist.inputs", f"student {tuple(s.shape)} vs teacher {tuple(t.shape)}",
                          "(B, K, D) tokens with the same B and K on both sides")
    s, t = _pair(s, t)
    rs, rt = self_correlation(s).flatten(1), self_correlation(t).flatten(1)
    if distance == "cosine":
        return 1.0 - F.cosine_similarity(rs, rt, dim=-1)
    diff = rs - rt
    return (diff.square() if distance == "mse" else diff.abs()).mean(-1)
