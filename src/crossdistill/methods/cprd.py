"""CPRD: contrastive partial ranking distillation, and the baselines it is compared with.

Chen et al., "Contrastive Partial Ranking Distillation" (CVPR 2024; no official code
found). A dual-encoder student (``forward -> (emb_a, emb_b)``, e.g.
:class:`~crossdistill.models.pair.PairDual`) learns with ITC and from a cross-encoder teacher
whose logits are the (B, B) matrix ``T_ij`` of every ``a_i`` against every ``b_j`` of the batch
(:class:`~crossdistill.models.pair.CrossEncoder` gives it for in-batch halves). With
``S_ij = sim(a_i, b_j) / tau`` (:mod:`crossdistill.losses.ranking`):

- ``itc``:      ``L = L_ITC = 1/2 [CE(S, diag) + CE(S^T, diag)]``
- ``cprd``:     ``L = L_ITC + lambda * L_PR``, ``L_PR`` the mean over queries (both ways) of
  ``1/(K-1) sum_{m<K} -log e^{S_{i j_m}} / sum_{n>=m} e^{S_{i j_n}}``, ``j_1..j_K`` the
  student's top-K hard negatives of query ``i`` in the teacher's order (K = 8, lambda = 1:
  the paper's defaults are unknown, these are ours);
- ``score-kd``: ``L = L_ITC + lambda * mean_ij (S_ij - T_ij)^2`` (point-wise score KD);
- ``rank-kd``:  ``L = L_ITC + lambda * KL(softmax(T_i) || softmax(S_i))`` over the full in-batch
  list, both ways (ListNet).

One fixed ``tau`` (0.05) serves ITC and the distillation term, so the two act on one scale
(the paper's "same temperature"; CLIP's learnable temperature is not used).
"""

from __future__ import annotations

from ..errors import ConfigError
from ..losses import ranking as _ranking  # noqa: F401  (registers itc, cprd, ...)
from ..registry import METHODS
from ..schema import Count, NonNeg, Temperature

OUT_TAPS = ["output[0]", "output[1]"]  # the pair a dual encoder returns


def pair_taps(student) -> tuple[list[str], str]:
    """(the taps of a dual encoder's two outputs, the similarity its outputs are scored
    with: ``cosine``, or ``dot`` when they carry a learned metric)."""
    return list(OUT_TAPS), getattr(student, "similarity", "cosine")


def _itc_term(student, temperature: float):
    from ..distiller import Term

    taps, sim = pair_taps(student)
    return Term("itc", student=taps, teacher=None, temperature=temperature, similarity=sim)


def _needs_teacher(name: str, teacher) -> None:
    if teacher is None:
        raise ConfigError("method.teacher", None, f"{name} distils a cross-encoder teacher "
                          "whose logits are the (B, B) in-batch score matrix")


@METHODS.register("itc", paper="Learning Transferable Visual Models From Natural Language "
                  "Supervision (CLIP)", year=2021, family="retrieval")
def itc(student, teacher=None, *, temperature: Temperature = 0.05):
    """Contrastive training alone (the ITC baseline; no teacher)."""
    from . import Recipe

    return Recipe([_itc_term(student, temperature)], note="itc: contrastive only")


def _kd(name: str, loss: str, student, teacher, temperature: float, weight: float, **params):
    from ..distiller import Term
    from . import Recipe

    _needs_teacher(name, teacher)
    taps, sim = pair_taps(student)
    terms = [_itc_term(student, temperature),
             Term(loss, student=taps, teacher="logits", weight=weight,
                  temperature=temperature, similarity=sim, **params)]
    return Recipe(terms, note=f"{name}: itc + {loss} from the teacher's in-batch scores")


@METHODS.register("cprd", paper="Contrastive Partial Ranking Distillation", year=2024,
                  family="retrieval")
def cprd(student, teacher, *, k: Count = 8, weight: NonNeg = 1.0,
         temperature: Temperature = 0.05):
    """ITC + CPRD's partial ranking loss (module docstring)."""
    return _kd("cprd", "cprd", student, teacher, temperature, weight, k=k)


@METHODS.register("score-kd", paper="point-wise score distillation (MSE to the teacher's "
                  "scores), the baseline of Contrastive Partial Ranking Distillation",
                  year=2024, family="retrieval")
def score_kd(student, teacher, *, weight: NonNeg = 1.0, temperature: Temperature = 0.05):
    """ITC + MSE between the student's and the teacher's in-batch scores."""
    return _kd("score-kd", "score_kd", student, teacher, temperature, weight)


@METHODS.register("rank-kd", paper="Learning to Rank: From Pairwise Approach to Listwise "
                  "Approach (ListNet), as full-list ranking KD", year=2007, family="retrieval")
def rank_kd(student, teacher, *, weight: NonNeg = 1.0, temperature: Temperature = 0.05,
            teacher_temperature: Temperature = 1.0):
    """ITC + ListNet KL over the full in-batch candidate list."""
    return _kd("rank-kd", "rank_kd", student, teacher, temperature, weight,
               teacher_temperature=teacher_temperature)
