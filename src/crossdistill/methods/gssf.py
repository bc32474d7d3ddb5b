"""GSSF: the generalised structural sparse similarity as a learnable metric (retrieval KD).

Diao et al., "GSSF: Generalized Structural Sparse Function for Deep Cross-modal Metric
Learning" (IEEE TIP 2024; no code released). ``s(x, y) = sum_c w_c x_c y_c + sum_k x_(k)^T
B_k y_(k)`` over ``K`` channel groups, ``w = 1``, ``B_k = 0`` at init (the dot product; on unit
rows the cosine); see :mod:`crossdistill.losses.gssf`. Two uses, each against the cosine:

- metric learning, no teacher: a :class:`~crossdistill.models.pair.PairDual` with
  ``metric="gssf"`` outputs ``(unit a, M unit b)``, and ITC scores them by the dot product,
  ``L = 1/2 [CE(S, diag) + CE(S^T, diag)]``, ``S_ij = s(a_i, b_j) / tau``; the retrieval task
  must then use ``similarity: dot`` (the model's ``similarity`` attribute says so);
- KD relation kernel, with a dual-encoder teacher: ``L = L_ITC + lambda * L_rel``,
  ``L_rel = mean_side 1/2 [CE(R, diag) + CE(R^T, diag)]``, ``R_ij = k(s_i, t_j) / tau_r`` between
  the student's and the teacher's (unit) embeddings of each half, ``k`` = GSSF (``gssf``)
  or the cosine (``relation-kd``, the baseline). The KD form is our inference.
"""

from __future__ import annotations

from ..errors import ConfigError
from ..losses import gssf as _gssf  # noqa: F401  (registers relation_kd)
from ..losses import ranking as _ranking  # noqa: F401  (registers itc)
from ..registry import METHODS
from ..schema import NonNeg, Temperature, Width


def _relation(name, student, teacher, kernel, groups, weight, temperature, kd_temperature):
    from ..distiller import Term
    from . import Recipe
    from .cprd import _itc_term

    s_taps, t_taps = getattr(student, "taps", None), getattr(teacher, "taps", None)
    if not s_taps or not t_taps:
        raise ConfigError("method.teacher", type(teacher).__name__,
                          f"{name}: a dual-encoder student and teacher with `taps` (their two "
                          "embeddings, e.g. crossdistill.models.pair.PairDual)")
    terms = [_itc_term(student, temperature),
             Term("relation_kd", student=list(s_taps), teacher=list(t_taps), weight=weight,
                  kernel=kernel, groups=groups, temperature=kd_temperature)]
    return Recipe(terms, note=f"{name}: itc + relational KD, {kernel} kernel")


@METHODS.register("gssf", paper="GSSF: Generalized Structural Sparse Function for Deep "
                  "Cross-modal Metric Learning", year=2024, family="retrieval")
def gssf(student, teacher=None, *, groups: Width = 8, weight: NonNeg = 1.0,
         temperature: Temperature = 0.05, kd_temperature: Temperature = 0.1):
    """No teacher: ITC in the student's GSSF metric. With a dual-encoder teacher: ITC + the
    relational KD term with a GSSF kernel (module docstring)."""
    from . import Recipe
    from .cprd import _itc_term

    if teacher is None:
        if getattr(student, "metric", None) != "gssf":
            raise ConfigError("method.student", getattr(student, "metric", type(student).__name__),
                              "gssf without a teacher trains a PairDual(metric='gssf') "
                              "(or give a dual-encoder teacher for the KD kernel)")
        return Recipe([_itc_term(student, temperature)], note="gssf: itc in the GSSF metric")
    return _relation("gssf", student, teacher, "gssf", groups, weight, temperature,
                     kd_temperature)


@METHODS.register("relation-kd", paper="Tian et al., Contrastive Representation Distillation "
                  "(a cosine relation kernel between student and teacher embeddings)",
                  year=2020, family="retrieval")
def relation_kd(student, teacher, *, weight: NonNeg = 1.0, temperature: Temperature = 0.05,
                kd_temperature: Temperature = 0.1):
    """ITC + the relational KD term with the cosine kernel (GSSF's baseline)."""
    if teacher is None:
        raise ConfigError("method.teacher", None, "relation-kd distils a dual-encoder teacher")
    return _relation("relation-kd", student, teacher, "cosine", 8, weight, temperature,
                     kd_temperature)
