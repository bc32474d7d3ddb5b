"""TAID recipe: the adaptive interpolated-target loss, plus CE for a classifier.

Paper: Shing et al., "TAID: Temporally Adaptive Interpolated Distillation for Efficient
Knowledge Transfer in Language Models", ICLR 2025. The loss and its schedule (a stateful
module with buffers ``t``, ``m``, ``L_prev``, updated once per optimiser step in
``on_step``) live in ``losses/hetero.py`` (``TAIDLoss``); the same module is the
classification form (per sample) and the language-model form (per token, averaged over the
lm task's valid tokens). The paper's LM form has no next-token CE: ``ce_weight: 0``
(``configs/lm_taid.yaml``).
"""

from __future__ import annotations

from ..distiller import Term
from ..registry import METHODS
from ..schema import NonNeg, Prob


@METHODS.register(
    "taid",
    paper="TAID: Temporally Adaptive Interpolated Distillation for Efficient Knowledge "
    "Transfer in Language Models",
    year=2025,
    family="logits",
)
def taid(
    student,
    teacher,
    *,
    t_start: Prob = 0.4,
    t_end: Prob = 1.0,
    alpha: NonNeg = 5e-4,
    beta: NonNeg = 0.99,
    weight: NonNeg = 1.0,
    ce_weight: NonNeg = 1.0,
):
    """CE (weight ``ce_weight``; the language-model paper trains on the TAID loss alone, a
    classifier keeps the label term, our choice) + TAID with the paper's schedule defaults.
    ``ce_weight: 0`` gives the paper's LM form (TAID alone, distil_ratio 1); ``alpha: 0``
    the linear schedule."""
    terms = [Term("taid", t_start=t_start, t_end=t_end, alpha=alpha, beta=beta, weight=weight)]
    if ce_weight:
        terms.insert(0, Term("ce", weight=ce_weight))
    return terms
