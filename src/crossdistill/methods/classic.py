"""Classic recipes used as baselines everywhere: scratch, kd, rkl, dkd, dist, fitnet, crd, at, rkd.

Each wires registered losses with their papers' default weights; see ``losses/`` for the
maths and the citations.
"""

from __future__ import annotations

from ..distiller import Term
from ..registry import METHODS
from ..schema import Count, NonNeg, Temperature
from . import embedding_tap, stage_tap


@METHODS.register("scratch", paper="supervised baseline (no teacher)", year=None, family="baseline")
def scratch(student, teacher):
    return [Term("ce")]


@METHODS.register(
    "kd", paper="Distilling the Knowledge in a Neural Network", year=2015, family="logits"
)
def kd(student, teacher, *, temperature: Temperature = 4.0, weight: NonNeg = 0.9):
    """``1.0 * CE + weight * T^2 * KL`` (additive weights, CE kept at 1.0: see the ``kd``
    loss's docstring for the convention and why)."""
    return [Term("ce"), Term("kd", temperature=temperature, weight=weight)]


@METHODS.register(
    "rkl",
    paper="TAID: Temporally Adaptive Interpolated Distillation (reverse-KL baseline)",
    year=2025,
    family="logits",
)
def rkl(student, teacher, *, temperature: Temperature = 1.0, weight: NonNeg = 1.0):
    """CE + reverse KL(p_s || p_t) at T=1: TAID's mode-seeking baseline (same CE + weight-1
    shape as our ``taid`` recipe; ``kd`` with ``temperature=1, weight=1`` is its forward twin)."""
    return [Term("ce"), Term("rkl", temperature=temperature, weight=weight)]


@METHODS.register("dkd", paper="Decoupled Knowledge Distillation", year=2022, family="logits")
def dkd(
    student,
    teacher,
    *,
    alpha: NonNeg = 1.0,
    beta: NonNeg = 8.0,
    temperature: Temperature = 4.0,
    warmup: NonNeg = 20.0,
):
    return [Term("ce"), Term("dkd", alpha=alpha, beta=beta, temperature=temperature, warmup=warmup)]


@METHODS.register(
    "dist", paper="Knowledge Distillation from A Stronger Teacher", year=2022, family="logits"
)
def dist(
    student, teacher, *, beta: NonNeg = 1.0, gamma: NonNeg = 1.0, temperature: Temperature = 4.0
):
    return [Term("ce"), Term("dist", beta=beta, gamma=gamma, temperature=temperature)]


@METHODS.register("fitnet", paper="FitNets: Hints for Thin Deep Nets", year=2015, family="features")
def fitnet(
    student,
    teacher,
    *,
    student_tap: str | None = None,
    teacher_tap: str | None = None,
    weight: NonNeg = 100.0,
    projector: str = "auto",
):
    """CE + a hint (MSE) between a student stage and a teacher stage through a projector."""
    s = student_tap or stage_tap(student, -1)
    t = teacher_tap or stage_tap(teacher, -1)
    return [Term("ce"), Term("mse", student=s, teacher=t, projector=projector, weight=weight)]


@METHODS.register(
    "crd", paper="Contrastive Representation Distillation", year=2020, family="contrastive"
)
def crd(
    student,
    teacher,
    *,
    weight: NonNeg = 0.8,
    kd_weight: NonNeg = 0.0,
    num_negatives: Count = 16384,
    temperature: Temperature = 0.07,
):
    """CE + CRD on the penultimate embeddings (+ optional KD, as in the paper's CRD+KD)."""
    terms = [
        Term("ce"),
        Term(
            "crd",
            student=embedding_tap(student),
            teacher=embedding_tap(teacher),
            weight=weight,
            num_negatives=num_negatives,
            temperature=temperature,
        ),
    ]
    if kd_weight:
        terms.append(Term("kd", weight=kd_weight))
    return terms


@METHODS.register("at", paper="Paying More Attention to Attention", year=2017, family="features")
def at(student, teacher, *, weight: NonNeg = 1000.0):
    """CE + attention transfer on every pair of matching stages (last k of each)."""
    ss, ts = getattr(student, "stages", []), getattr(teacher, "stages", [])
    k = min(len(ss), len(ts))
    return [Term("ce")] + [
        Term("at", student=s, teacher=t, weight=weight, name=f"at{i}")
        for i, (s, t) in enumerate(zip(ss[-k:], ts[-k:]))
    ]


@METHODS.register("rkd", paper="Relational Knowledge Distillation", year=2019, family="relations")
def rkd(student, teacher, *, weight: NonNeg = 1.0):
    return [
        Term("ce"),
        Term("rkd", student=embedding_tap(student), teacher=embedding_tap(teacher), weight=weight),
    ]
