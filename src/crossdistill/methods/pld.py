"""PLD recipe: the Plackett-Luce list-wise loss alone (it replaces CE + KD).

Paper: "PLD: A Choice-Theoretic List-Wise Knowledge Distillation" (2025). Maths in
``losses/hetero.py`` (``pld``).
"""

from __future__ import annotations

from ..distiller import Term
from ..registry import METHODS
from ..schema import NonNeg, Temperature


@METHODS.register(
    "pld",
    paper="PLD: A Choice-Theoretic List-Wise Knowledge Distillation",
    year=2025,
    family="logits",
)
def pld(
    student,
    teacher,
    *,
    temperature: Temperature = 1.0,
    weight: NonNeg = 1.0,
    ce_weight: NonNeg = 0.0,
):
    """PLD on the final logits (T=1). The paper uses PLD *instead of* CE; ``ce_weight > 0``
    adds a plain CE term for ablations (off by default). Samples without a label contribute
    the pure teacher ranking."""
    terms = [Term("pld", temperature=temperature, weight=weight)]
    if ce_weight:
        terms.insert(0, Term("ce", weight=ce_weight))
    return terms
