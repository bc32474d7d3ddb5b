"""UniDistill for 2-D CenterNet detectors: cross-modality KD at keypoints of the boxes.

Paper: Zhou et al., "UniDistill: A Universal Cross-Modality Knowledge Distillation Framework
for 3D Object Detection in Bird's-Eye View", CVPR 2023 (official code:
megvii-research/CVPR2023-UniDistill, ``.../BEVFusion_nuscenes_centerhead_camera_exp_distill
_lidar.py``). The paper's total loss (its section 3.4 and the official ``training_step``):

    L = L_det + 100 L_F + 40 L_R + 10 (L_cls + L_reg)

with ``L_F`` the keypoint feature L1 on low-level maps (eq. 1), ``L_R`` the keypoint relation
L1 on high-level maps (eq. 2) and ``L_cls`` / ``L_reg`` the Gaussian-weighted response L1s
(eq. 3); the maths is in :mod:`crossdistill.losses.unidistill`. The paper's teacher and
student see different sensors (LiDAR and camera) on one BEV grid; here they see different
views of one canvas, on one image grid: the teacher ``image_distance`` (canvas + distance
to ink, 2 channels), the student a degraded ``image_<view>`` (``blur``, ``lowres``, ``edge``,
``noisy``). Each side reads its key through its adapter: build the distiller with
``**distiller_kwargs(view)`` (``io`` / ``teacher_io``), nothing special in the distiller.

Our adaptation (inference, the paper has BEV feature maps of a 3-D detector): ``L_det`` =
the zoo's ``centernet`` loss; low-level = ``stage2`` of ``centernet-tiny`` (stride 2, an
early stage; the paper: the BEV features before the BEV encoder), high-level = ``neck`` (the
map the heads read; the paper: after the BEV encoder); the response regression maps = the
size and offset maps. A ``conv1x1`` projector bridges the student's low-level map to the
teacher's width when they differ (``projector="auto"``: identity when equal, as in the
paper, whose two BEV maps share a width); the relation term needs none (cosines). The
official code's bugs (teacher heatmap through ``sigmoid(hm / 2)`` against the student's raw
one; the teacher's weights reloaded from disk every step; a half-pixel shift in the keypoint
sampling) are not copied (see the losses' module doc).

Weights: the paper's are the defaults, every one a parameter. Our maps are not BEV maps:
``benchmarks/dense_unidistill.py`` keeps 100 and 40 but runs the two response terms at 1
(CenterNet's size / offset maps are trained only at the centre cell, so off it, where a
third of the Gaussian's weight lies, the teacher's regressions are unsupervised; its
docstring has the pilot). ``variant`` keeps one term for the ablations: ``"feature"``,
``"relation"``, ``"response"`` (heatmap + regression) or ``"unidistill"`` (all three).
"""

from __future__ import annotations

from ..data.detection import VIEWS
from ..distiller import Term
from ..errors import ConfigError
from ..losses import unidistill as _loss  # noqa: F401  (registers the four losses)
from ..registry import METHODS
from . import Recipe

VARIANTS = ("unidistill", "feature", "relation", "response")
HEAD_TAPS = ("output.logits", "output.size", "output.offset")
PAPER_WEIGHTS = {"feature": 100.0, "relation": 40.0, "heatmap": 10.0, "regression": 10.0}


def view_key(view: str, field: str) -> str:
    """The batch key of a detection-canvas view (``clean`` -> ``image``)."""
    if view not in VIEWS:
        raise ConfigError(field, view, f"a detection-canvas view: {', '.join(VIEWS)}")
    return "image" if view == "clean" else f"image_{view}"


def distiller_kwargs(view: str = "blur", teacher_view: str = "distance") -> dict:
    """The adapters of a UniDistill distiller: the student reads ``image_<view>``, the
    teacher ``image_<teacher_view>`` (``Distiller(..., **distiller_kwargs("blur"))``)."""
    return {"io": {"inputs": [view_key(view, "unidistill.view")]},
            "teacher_io": {"inputs": [view_key(teacher_view, "unidistill.teacher_view")]}}


def _weight(field: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
        raise ConfigError(field, v, "a number >= 0")
    return float(v)


def _path(model, path, field: str, default: str | None) -> str:
    if path is None:
        path = default
    if path is None:
        raise ConfigError(field, None, f"a module path of {type(model).__name__} (it has no "
                          "`stages` to choose from)")
    if not isinstance(path, str):
        raise ConfigError(field, path, "a module path (string)")
    names = dict(model.named_modules())
    if path not in names:
        stages = getattr(model, "stages", None) or sorted(n for n in names if n)[:12]
        raise ConfigError(field, path, f"a module of the model, e.g. {', '.join(stages)}")
    return path


def _stage(model, i: int) -> str | None:
    stages = getattr(model, "stages", None)
    return stages[i] if stages and len(stages) > abs(i) else None


@METHODS.register("unidistill", paper=_loss.PAPER, year=_loss.YEAR, family="detection")
def unidistill(
    student,
    teacher,
    *,
    variant: str = "unidistill",
    feature_tap: str | None = None,
    teacher_feature_tap: str | None = None,
    relation_tap: str | None = None,
    teacher_relation_tap: str | None = None,
    projector: str = "auto",
    detection_weight: float = 1.0,
    feature_weight: float = PAPER_WEIGHTS["feature"],
    relation_weight: float = PAPER_WEIGHTS["relation"],
    heatmap_weight: float = PAPER_WEIGHTS["heatmap"],
    regression_weight: float = PAPER_WEIGHTS["regression"],
    boxes: str = "boxes",
    labels: str = "box_labels",
    image: str = "image",
) -> Recipe:
    """``detection_weight * centernet + feature_weight * L_F + relation_weight * L_R +
    heatmap_weight * L_cls + regression_weight * L_reg`` (module doc; ``variant`` keeps a
    subset). ``feature_tap`` defaults to the model's second stage (``stage2`` of
    centernet-tiny), ``relation_tap`` to its ``feature_path`` (``neck``); the teacher taps
    default to the student's. ``projector`` bridges the feature taps (``"auto"``: identity
    when the shapes match, else ``conv1x1``). ``boxes`` / ``labels`` / ``image`` are the
    batch keys of the targets and of an image of the input size (for the strides)."""
    if variant not in VARIANTS:
        raise ConfigError("unidistill.variant", variant, f"one of {', '.join(VARIANTS)}")
    if teacher is None:
        raise ConfigError("method.teacher", None, "unidistill distils a CenterNet teacher")
    if not isinstance(projector, str):
        raise ConfigError("unidistill.projector", projector, "a projector name (e.g. auto)")
    w = {k: _weight(f"unidistill.{k}_weight", v) for k, v in (
        ("detection", detection_weight), ("feature", feature_weight),
        ("relation", relation_weight), ("heatmap", heatmap_weight),
        ("regression", regression_weight))}
    for f, v in (("boxes", boxes), ("labels", labels), ("image", image)):
        if not isinstance(v, str) or not v:
            raise ConfigError(f"unidistill.{f}", v, "a batch key")
    keys = dict(boxes=boxes, labels=labels, image=image)
    terms = []
    if w["detection"] > 0:
        terms.append(Term("centernet", student=list(HEAD_TAPS), teacher=None,
                          weight=w["detection"], **keys))
    if variant in ("unidistill", "feature") and w["feature"] > 0:
        s = _path(student, feature_tap, "unidistill.feature_tap", _stage(student, 1))
        t = _path(teacher, teacher_feature_tap, "unidistill.teacher_feature_tap",
                  s if teacher_feature_tap is None else None)
        terms.append(Term("unidistill_feature", student=s, teacher=t, projector=projector,
                          weight=w["feature"], **keys))
    if variant in ("unidistill", "relation") and w["relation"] > 0:
        s = _path(student, relation_tap, "unidistill.relation_tap",
                  getattr(student, "feature_path", None) or _stage(student, -1))
        t = _path(teacher, teacher_relation_tap, "unidistill.teacher_relation_tap",
                  s if teacher_relation_tap is None else None)
        terms.append(Term("unidistill_relation", student=s, teacher=t,
                          weight=w["relation"], **keys))
    if variant in ("unidistill", "response"):
        if w["heatmap"] > 0:
            terms.append(Term("unidistill_heatmap", student=HEAD_TAPS[0], teacher=HEAD_TAPS[0],
                              weight=w["heatmap"], **keys))
        if w["regression"] > 0:
            reg = list(HEAD_TAPS[1:])
            terms.append(Term("unidistill_regression", student=reg, teacher=reg,
                              weight=w["regression"], **keys))
    if len(terms) == (w["detection"] > 0):
        raise ConfigError("unidistill.variant", variant, "a variant with a distillation "
                          "weight > 0 (every weight of its terms is 0)")
    return Recipe(terms, note=f"unidistill ({variant}): " + ", ".join(t.name for t in terms))
