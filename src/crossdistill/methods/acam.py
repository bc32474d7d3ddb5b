"""ACAM-KD and its static-mask baseline for segmentation students.

Paper: Lan and Tian, "ACAM-KD: Adaptive and Cooperative Attention Masking for Knowledge
Distillation", ICCV 2025 (no official code found; every form detail is inference, see
``losses/acam.py``). Claim: adaptive cooperative masks (STCA-FF + ASCM, trained with the
student) beat static teacher-derived masks (FGD/MasKD-style) for the same student.

Both recipes are ``CE + feature_weight * L`` on each tapped map pair (default the deepest
encoder map, seg-cnn's ``enc3``), the student map bridged to the teacher's width by a
``conv1x1`` projector (the paper's ``phi``): ``acam_kd`` scores it with ``acam`` (the fusion
and mask generators live in that stateful loss, so they train with the student and are never
exported), ``static_mask_kd`` with ``static_mask`` (FGD's teacher attention masks). Only the
masks differ between the two, so the comparison isolates the claim. Weights 1 are ours.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..distiller import Term
from ..errors import ConfigError
from ..losses import acam as _acam  # noqa: F401  (registers acam, static_mask)
from ..registry import METHODS
from . import Recipe

DEFAULT_TAPS = ("enc3",)


def _weight(field: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
        raise ConfigError(field, v, "a number >= 0")
    return float(v)


def map_taps(student: nn.Module, teacher, taps, teacher_taps, name: str) -> list[tuple]:
    """``[(student tap, teacher tap)]``, checked now: a teacher exists, the lists pair up and
    every path is a module of its model (errors list the model's ``stages``)."""
    if teacher is None:
        raise ConfigError("method.teacher", None, f"{name} distils a teacher's feature maps")
    taps = list(DEFAULT_TAPS if taps is None else ([taps] if isinstance(taps, str) else taps))
    t_taps = list(taps if teacher_taps is None else (
        [teacher_taps] if isinstance(teacher_taps, str) else teacher_taps))
    if not taps or not all(isinstance(t, str) for t in taps):
        raise ConfigError(f"{name}.taps", taps, "a non-empty list of module paths")
    if len(t_taps) != len(taps) or not all(isinstance(t, str) for t in t_taps):
        raise ConfigError(f"{name}.teacher_taps", t_taps, f"{len(taps)} module paths, one per tap")
    for side, model, paths in (("taps", student, taps), ("teacher_taps", teacher, t_taps)):
        names = dict(model.named_modules())
        for p in paths:
            if p not in names:
                stages = getattr(model, "stages", None) or sorted(names)[:12]
                raise ConfigError(f"{name}.{side}", p, f"a module of the model, e.g. {stages}")
    return list(zip(taps, t_taps))


def _recipe(name, loss, student, teacher, taps, teacher_taps, feature_weight, ce_weight,
            **params) -> Recipe:
    pairs = map_taps(student, teacher, taps, teacher_taps, name)
    fw = _weight(f"{name}.feature_weight", feature_weight)
    cw = _weight(f"{name}.ce_weight", ce_weight)
    terms = [Term("ce", weight=cw)] if cw > 0 else []
    if fw > 0:
        terms += [
            Term(loss, student=s, teacher=t, projector="conv1x1", weight=fw,
                 name=f"{loss}_{s.replace('.', '_')}", **params)
            for s, t in pairs
        ]
    if not terms:
        raise ConfigError(f"{name}.ce_weight", ce_weight, "ce_weight or feature_weight > 0")
    return Recipe(terms, note=f"{name}: ce + {loss} on {[s for s, _ in pairs]}")


@METHODS.register("acam_kd", paper=_acam.PAPER, year=2025, family="dense")
def acam_kd(
    student,
    teacher,
    *,
    taps: Sequence[str] | None = None,
    teacher_taps: Sequence[str] | None = None,
    feature_weight: float = 1.0,
    ce_weight: float = 1.0,
    masks: int = 4,
    dim: int = 32,
    kv_grid: int = 8,
    diversity_weight: float = 1.0,
) -> Recipe:
    """``CE + feature_weight * acam`` per tap pair (module doc). ``masks`` M, ``dim`` (the
    STCA-FF width), ``kv_grid`` (keys/values pooled to at most that grid), ``diversity_weight``
    (lambda of the mask-diversity term) go to the ``acam`` loss; ``teacher_taps`` default to
    ``taps``."""
    _weight("acam_kd.diversity_weight", diversity_weight)
    for field, v in (("masks", masks), ("dim", dim), ("kv_grid", kv_grid)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"acam_kd.{field}", v, "an integer >= 1")
    return _recipe("acam_kd", "acam", student, teacher, taps, teacher_taps, feature_weight,
                   ce_weight, masks=masks, dim=dim, kv_grid=kv_grid,
                   diversity_weight=float(diversity_weight))


@METHODS.register("static_mask_kd", paper=_acam.FGD, year=2022, family="dense")
def static_mask_kd(
    student,
    teacher,
    *,
    taps: Sequence[str] | None = None,
    teacher_taps: Sequence[str] | None = None,
    feature_weight: float = 1.0,
    ce_weight: float = 1.0,
    temperature: float = 0.5,
) -> Recipe:
    """The claim's baseline: ``CE + feature_weight * static_mask`` per tap pair, masks fixed by
    the teacher's attention at ``temperature`` (FGD's 0.5)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            0.01 < temperature <= 1000):
        raise ConfigError("static_mask_kd.temperature", temperature, "a number in (0.01, 1000]")
    return _recipe("static_mask_kd", "static_mask", student, teacher, taps, teacher_taps,
                   feature_weight, ce_weight, temperature=float(temperature))
