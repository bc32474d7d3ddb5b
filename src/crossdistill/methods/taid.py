"""TAID recipe (classification form): CE + the adaptive interpolated-target loss.

Paper: Shing et al., "TAID: Temporally Adaptive Interpolated Distillation for Efficient
Knowledge Transfer in Language Models", ICLR 2025. The loss and its schedule (a stateful
module with buffers ``t``, ``m``, ``L_prev``, updated in ``on_step``) live in
``losses/hetero.py`` (``TAIDLoss``).
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
    classifier keeps the label term, our choice) + TAID with the paper's schedule defaults."""
    terms = [Term("taid", t_start=t_start, t_end=t_end, alpha=alpha, beta=beta, weight=weight)]
    if ce_weight:
        terms.insert(0, Term("ce", weight=ce_weight))
    return terms
