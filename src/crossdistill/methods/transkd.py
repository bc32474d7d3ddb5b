"""TransKD and its feature-map-only baseline for hierarchical (SegFormer-style) students.

Paper: Ruiping Liu, Kailun Yang et al., "TransKD: Transformer Knowledge Distillation for
Efficient Semantic Segmentation" (arXiv 2202.13393, v3 2023). The total loss implemented is
the one of the official code (RuipingL/TransKD ``train/train_TransKDBase.py``, read, not
run; the paper's text was not available to us, so no equation numbers):

    L = CE(student logits, y) + csf_weight * sum_i HCL(CSF_i(S_1..S_n), T_i)
        + pea_weight * sum_i w_i MSE(Linear_i(E^s_i), E^t_i),   w = (0.1, 0.1, 0.5, 1)

with ``S_i``/``T_i`` the stage maps and ``E_i`` the patch embeddings (tokens ``(B, N_i,
C_i)``) of stage i. CSF + HCL is the stateful multi-tap loss ``csf`` (losses/transkd.py; its
fusion modules train with the student and are never exported); PEA is one ``mse`` term per
stage whose ``linear`` projector is the paper's alignment ``Linear_i`` (student width ->
teacher width), again trained with the student and left out of the export.

Recipes:

* ``transkd``: the paper (CE + CSF/HCL + PEA); ``csf_weight=0`` or ``pea_weight=0`` give the
  two ablations (PEA only, CSF only).
* ``hcl_kd``: the claim's feature-map-only baseline: CE + HCL per stage on the student map
  projected to the teacher's width by a ``conv1x1`` projector, no cross-stage fusion and no
  patch embeddings (ReviewKD's HCL without its fusion; our reading of the paper's
  "feature-map-only" rows).

Not copied from the official code: the teacher runs under ``no_grad`` (the distiller's
frozen teacher; the code's training loop calls it outside ``no_grad``, so its features carry
a graph), and the PEA weights are a list of numbers checked here (the code's
``--embed-weights`` is ``type=tuple``, so a value given on the command line becomes a tuple
of its characters). Task loss: plain CE by default, or with ``class_weights`` the paper's
class-weighted CE (the code hard-codes Cityscapes weights;
``losses.transkd.frequency_weights`` derives weights of that kind from a split's label
frequencies). Our inference: the default taps (a model's ``encoder_stages`` and
``embed_taps``, as ``segformer-tiny`` lists them) and that a 3-stage or 5-stage model needs
explicit ``embed_weights``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..distiller import Term
from ..errors import ConfigError
from ..losses import transkd as _tk  # registers csf, hcl
from ..registry import METHODS
from . import Recipe

PEA_WEIGHTS = (0.1, 0.1, 0.5, 1.0)


def _weight(field: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
        raise ConfigError(field, v, "a number >= 0")
    return float(v)


def _paths(field: str, v) -> list[str]:
    v = [v] if isinstance(v, str) else v
    if not isinstance(v, (list, tuple)) or not v or not all(isinstance(p, str) for p in v):
        raise ConfigError(field, v, "a non-empty list of module paths")
    return list(v)


def _check_paths(field: str, model: nn.Module, paths: list[str]) -> None:
    names = dict(model.named_modules())
    for p in paths:
        if p not in names:
            stages = getattr(model, "stages", None) or sorted(names)[:12]
            raise ConfigError(field, p, f"a module of the model, e.g. {stages}")


def tap_lists(name: str, student, teacher, taps, teacher_taps, attr: str, what: str):
    """``(student taps, teacher taps)`` of one kind (``attr``: the zoo attribute giving the
    default, ``encoder_stages`` or ``embed_taps``), checked: same length, real paths. Teacher
    taps default to the student's when those are given, else to the teacher's ``attr``."""
    if teacher is None:
        raise ConfigError("method.teacher", None, f"{name} distils a teacher's {what}")
    field = f"{name}.{'embed_taps' if attr == 'embed_taps' else 'taps'}"
    t_field = f"{name}.teacher_{'embed_taps' if attr == 'embed_taps' else 'taps'}"
    given = taps is not None
    if not given:
        taps = getattr(student, attr, None)
        if not taps:
            raise ConfigError(field, None, f"the student's {what} (module paths); this model "
                              f"has no `{attr}` to default to")
    taps = _paths(field, taps)
    _check_paths(field, student, taps)
    if teacher_taps is None:  # the student's paths when given, else the teacher's own list
        teacher_taps = taps if given else (getattr(teacher, attr, None) or taps)
    teacher_taps = _paths(t_field, teacher_taps)
    if len(teacher_taps) != len(taps):
        raise ConfigError(t_field, teacher_taps, f"{len(taps)} module paths, one per student "
                          f"tap {taps}")
    _check_paths(t_field, teacher, teacher_taps)
    return taps, teacher_taps


def pea_weights(name: str, weights, n: int) -> list[float]:
    """Per-stage PEA weights: the paper's (0.1, 0.1, 0.5, 1) for 4 stages, else given."""
    if weights is None:
        if n != len(PEA_WEIGHTS):
            raise ConfigError(f"{name}.embed_weights", None,
                              f"{n} numbers >= 0, one per patch embedding (the paper's "
                              f"{PEA_WEIGHTS} are for 4 stages)")
        return list(PEA_WEIGHTS)
    if isinstance(weights, (str, bytes)) or not isinstance(weights, (list, tuple)) or (
            len(weights) != n):
        raise ConfigError(f"{name}.embed_weights", weights,
                          f"a list of {n} numbers >= 0, one per patch embedding")
    return [_weight(f"{name}.embed_weights.{i}", w) for i, w in enumerate(weights)]


def _ce(name: str, ce_weight, class_weights) -> list[Term]:
    """The task term: ``ce``, or ``class_weighted_ce`` (the paper's) given ``class_weights``."""
    cw = _weight(f"{name}.ce_weight", ce_weight)
    if cw <= 0:
        return []
    if class_weights is None:
        return [Term("ce", weight=cw)]
    if isinstance(class_weights, (str, bytes)) or not isinstance(class_weights, (list, tuple)) \
            or not class_weights:
        raise ConfigError(f"{name}.class_weights", class_weights,
                          "a list of numbers >= 0, one per class")
    ws = tuple(_weight(f"{name}.class_weights.{i}", w) for i, w in enumerate(class_weights))
    return [Term("class_weighted_ce", weight=cw, name="ce", weights=ws)]


@METHODS.register("transkd", paper=_tk.PAPER, year=2023, family="dense")
def transkd(
    student,
    teacher,
    *,
    taps: Sequence[str] | None = None,
    teacher_taps: Sequence[str] | None = None,
    embed_taps: Sequence[str] | None = None,
    teacher_embed_taps: Sequence[str] | None = None,
    csf_weight: float = 1.0,
    pea_weight: float = 1.0,
    embed_weights: Sequence[float] | None = None,
    mid_channels: int = 64,
    ce_weight: float = 1.0,
    class_weights: Sequence[float] | None = None,
) -> Recipe:
    """``CE + csf_weight * csf(stage maps) + pea_weight * sum_i w_i mse(linear(E^s_i),
    E^t_i)`` (module doc). ``taps``/``teacher_taps``: stage maps shallow to deep (default
    the models' ``encoder_stages``); ``embed_taps``/``teacher_embed_taps``: patch-embedding
    tokens (default ``embed_taps``); ``embed_weights``: one per embedding (default the
    paper's (0.1, 0.1, 0.5, 1) for 4 stages); ``mid_channels``: CSF's common width (64);
    ``class_weights``: one per class makes the task term the paper's class-weighted CE
    (``class_weighted_ce``; e.g. ``losses.transkd.frequency_weights``), default plain CE."""
    cw = _weight("transkd.csf_weight", csf_weight)
    pw = _weight("transkd.pea_weight", pea_weight)
    if isinstance(mid_channels, bool) or not isinstance(mid_channels, int) or mid_channels < 1:
        raise ConfigError("transkd.mid_channels", mid_channels, "an integer >= 1")
    terms = _ce("transkd", ce_weight, class_weights)
    note = []
    if cw > 0:
        s, t = tap_lists("transkd", student, teacher, taps, teacher_taps, "encoder_stages",
                         "stage feature maps")
        terms.append(Term("csf", student=s, teacher=t, weight=cw, name="csf",
                          mid_channels=mid_channels))
        note.append(f"csf on {s}")
    if pw > 0:
        s, t = tap_lists("transkd", student, teacher, embed_taps, teacher_embed_taps,
                         "embed_taps", "patch embeddings")
        ws = pea_weights("transkd", embed_weights, len(s))
        terms += [Term("mse", student=a, teacher=b, projector="linear", weight=pw * w,
                       name=f"pea_{i}") for i, (a, b, w) in enumerate(zip(s, t, ws)) if w > 0]
        note.append(f"pea on {s} x {ws}")
    if not any(x.name != "ce" for x in terms):
        if teacher is None:
            raise ConfigError("method.teacher", None, "transkd distils a teacher's features")
        raise ConfigError("transkd.csf_weight", csf_weight,
                          "csf_weight or pea_weight (and some embed_weights) > 0")
    return Recipe(terms, note="transkd: ce + " + "; ".join(note))


@METHODS.register("hcl_kd", paper=_tk.PAPER + " (feature-map-only baseline)", year=2023,
                  family="dense")
def hcl_kd(
    student,
    teacher,
    *,
    taps: Sequence[str] | None = None,
    teacher_taps: Sequence[str] | None = None,
    feature_weight: float = 1.0,
    ce_weight: float = 1.0,
    class_weights: Sequence[float] | None = None,
) -> Recipe:
    """``CE + feature_weight * sum_i hcl(conv1x1(S_i), T_i)``: per stage, no fusion, no patch
    embeddings (module doc). Taps default to the models' ``encoder_stages``;
    ``class_weights`` as for ``transkd``."""
    fw = _weight("hcl_kd.feature_weight", feature_weight)
    s, t = tap_lists("hcl_kd", student, teacher, taps, teacher_taps, "encoder_stages",
                     "stage feature maps")
    terms = _ce("hcl_kd", ce_weight, class_weights)
    if fw > 0:
        terms += [Term("hcl", student=a, teacher=b, projector="conv1x1", weight=fw,
                       name=f"hcl_{i}") for i, (a, b) in enumerate(zip(s, t))]
    if not terms:
        raise ConfigError("hcl_kd.ce_weight", ce_weight, "ce_weight or feature_weight > 0")
    return Recipe(terms, note=f"hcl_kd: ce + hcl on {s}")
