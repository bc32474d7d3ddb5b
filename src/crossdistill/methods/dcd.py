"""DCD: dynamic contrastive distillation between cross-encoders.

Rao et al., "Dynamic Contrastive Distillation for Image-Text Retrieval" (2022; code
raojay7/DCD, read, not copied). Teacher and student are both cross-encoders (METER / ViLT
there; :class:`~crossdistill.models.pair.CrossEncoder` here, the teacher wider and deeper),
each giving the (B, B) in-batch score matrix of every ``a_i`` against every ``b_j``. Per
query: the positive and the teacher's ``n - 1 = 7`` highest-scored in-batch negatives (a
batch of 16 gives the 15 drawn negatives of the official ``draw_false_text``); ``s_i``,
``t_i`` the student's and the teacher's scores of the *same* 8 candidates, positive first:

``L = a T^2 sum_i r_i MSE(s_i / T, t_i / T) + (1 - a) sum_i w_i BCE(s_i, e_0)``

``w_i = H(softmax(t_i)) / sum_j H(softmax(t_j))``, ``r_i = softmax_i((1 - w_i)^2)``, ``a = 0.2``,
``T = 1``. What differs from the official code (see
:mod:`crossdistill.losses.ranking`): the distillation weights ``r_i`` are applied per query
(the official scalar MSE makes them inert), and the teacher's and the student's candidate
lists are aligned (the official mining misaligns them when the teacher does not rank the
positive first). Both directions are trained (the official code: image -> text only).

Baselines, from the same recipe: ``weights="uniform", mine="random"`` is plain score KD
(``w_i = r_i = 1 / B``, random in-batch negatives); no teacher is the student's BCE alone on
random in-batch candidates (no KD).
"""

from __future__ import annotations

from ..errors import ConfigError
from ..losses import ranking as _ranking  # noqa: F401  (registers dcd)
from ..registry import METHODS
from ..schema import Count, Prob, Temperature


@METHODS.register("dcd", paper="Dynamic Contrastive Distillation for Image-Text Retrieval",
                  year=2022, family="retrieval")
def dcd(student, teacher=None, *, candidates: Count = 8, alpha: Prob = 0.2,
        temperature: Temperature = 1.0, mine: str = "teacher", weights: str = "dynamic"):
    """DCD's loss (module docstring) on a cross-encoder student's in-batch score matrix."""
    from ..distiller import Term
    from ..losses.ranking import MINING, WEIGHTS
    from . import Recipe

    if mine not in MINING:
        raise ConfigError("dcd.mine", mine, f"one of {', '.join(MINING)}")
    if weights not in WEIGHTS:
        raise ConfigError("dcd.weights", weights, f"one of {', '.join(WEIGHTS)}")
    if teacher is None:
        if mine == "teacher":
            mine = "random"  # no teacher to mine with: the no-KD baseline
        term = Term("dcd", student="logits", teacher=None, candidates=candidates,
                    mine=mine, weights="uniform")
        return Recipe([term], note="dcd without a teacher: BCE on random candidates (no KD)")
    term = Term("dcd", student="logits", teacher="logits", candidates=candidates, alpha=alpha,
                temperature=temperature, mine=mine, weights=weights)
    return Recipe([term], note=f"dcd: {weights} weights, {mine}-mined candidates, a={alpha}")
