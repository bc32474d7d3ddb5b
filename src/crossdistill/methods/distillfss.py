"""DistillFSS: distil a support-using few-shot segmenter into a support-free student.

Paper: De Marinis et al., "DistillFSS: Synthesizing Few-Shot Knowledge into a Lightweight
Segmentation Model", 2025 (code: pasqualedem/DistillFSS, ``distillfss/models/loss.py``,
``distillfss/models/dcama/distillator.py``, ``refine.py``, as read). The student
(``models.fewshot.DistillFSSNet``: the teacher's encoder and decoder plus, per class and
feature group, a 3x3 conv - ReLU - 1x1 conv block predicting the coarse support-query map
from the query alone) is trained on the few-shot task's support set only: every shot in
turn is the query, the other shots its support (the official ``Substitutor``; our
``fewshot-canvas`` source with ``episodes="shots"``). Stages (``stage``):

* ``"distill"`` (Eq. of ``DistillationLoss``): ``L = 1/2 FL_2(z_s, argmax z_t) + 1/2
  mean_g MSE(M_t^g, M_s^g)``, no labels; the teacher (frozen ``proto-fss``) sees the
  support through the batch.
* ``"refine"`` (``RefineDistillationLoss``): ``L = 1/3 [FL_2(z_sup, y) + FL_2(z_s, y) +
  mean_g MSE(M_t^g, M_s^g)]`` with the shots' labels. In the official model the teacher lives
  inside the student and its decoder is shared and trained (its "hot" parameters), so
  ``FL(teacher, y)`` trains that shared decoder through the support path. Here the teacher
  stays frozen, as every crossdistill teacher: ``z_sup`` is the student network's own
  support path (prototype coarse maps from its encoder, through its decoder), which is the
  teacher's forward on the shared weights; the MSE target is the frozen teacher's coarse map
  (equal to the student's own prototype maps while its encoder is frozen).
* ``"ce"``: the claim's baseline: the same student (teacher encoder and decoder, new class
  blocks) fine-tuned on the same shots with cross-entropy alone (class-weighted with
  ``class_weights``, as the teacher's own episodic training, :func:`teacher_terms`), no
  teacher.

How the support reaches the models, with no special case in the trainer or the distiller:
every row of a ``fewshot-canvas`` split carries its support (``support_image``,
``support_mask``); the teacher's adapter reads them (:data:`TEACHER_IO`). The student's
adapter reads ``cls`` and, as *optional* inputs, ``fss_support_image`` / ``fss_support_mask``,
which only the :class:`StudentSupport` prepare stage writes, in training and in the refine
stage: evaluation never hands the student a support set. Build the distiller with
:func:`distiller_kwargs` (``io``, ``teacher_io``, ``prepare``).

Trainable parameters: the class blocks and (``train_decoder``, default True) the decoder;
the encoder is frozen (the official hot parameters: decoder convs and mixers + "student").
Inference (no official counterpart): the prototype teacher and its coarse maps (see
``models/fewshot.py``), per-query class blocks instead of an all-class argmax merge, the
``"ce"`` baseline's form. Bug of the official code not copied: the class-weighted focal loss
reads an undefined variable (``losses/distillfss.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..distiller import Term
from ..errors import ConfigError
from ..losses import distillfss as _losses  # noqa: F401  (registers fss_focal, ...)
from ..models.fewshot import DistillFSSNet, ProtoFSS
from ..prepare import Stage
from ..registry import METHODS, PREPARES
from ..schema import NonNeg
from . import Recipe

PAPER = _losses.PAPER
STAGES = ("distill", "refine", "ce")
COARSE_TAPS = ("coarse.0", "coarse.1")
TASK = {"name": "segmentation", "target": "mask", "num_classes": 2}
TEACHER_IO = {"inputs": {"x": "image", "support": "support_image",
                         "support_mask": "support_mask"}}
STUDENT_IO = {"inputs": {"x": "image", "cls": "cls", "support": "?fss_support_image",
                         "support_mask": "?fss_support_mask"}}


@PREPARES.register("fss_support",
                   description="hand the batch's support set to a DistillFSS student "
                   "(refinement; training only)")
class StudentSupport(Stage):
    """``batch["fss_support_image"] = batch["support_image"]`` (and the masks): the keys the
    student's optional support inputs read. Prepare stages run in training only, so the
    student never sees a support set in evaluation."""

    in_build = True  # the refine terms tap the support path: the dry run needs it too

    def __init__(self, image: str = "support_image", mask: str = "support_mask",
                 prefix: str = "fss_"):
        super().__init__()
        self.image, self.mask, self.prefix = image, mask, prefix

    def forward(self, batch, state):
        for k in (self.image, self.mask):
            if k not in batch:
                raise ConfigError("prepare.fss_support", k,
                                  f"a batch key; the batch has {', '.join(sorted(batch))}")
        return {**batch, self.prefix + self.image: batch[self.image],
                self.prefix + self.mask: batch[self.mask]}


def distiller_kwargs(stage: str = "distill") -> dict:
    """What a DistillFSS distiller needs beside the recipe's terms: the task, both adapters
    and (refine) the :class:`StudentSupport` stage."""
    if stage not in STAGES:
        raise ConfigError("distillfss.stage", stage, f"one of {', '.join(STAGES)}")
    kw = {"task": dict(TASK), "io": dict(STUDENT_IO), "teacher_io": dict(TEACHER_IO)}
    if stage == "refine":
        kw["prepare"] = [StudentSupport()]
    return kw


def teacher_kwargs() -> dict:
    """The base (episodic) training of a ``proto-fss`` teacher: ``Distiller(teacher, None,
    teacher_terms(), **teacher_kwargs())``."""
    return {"task": dict(TASK), "io": dict(TEACHER_IO)}


def teacher_terms(fg_weight: float = 5.0) -> list[Term]:
    """The teacher's episodic loss: cross-entropy with the target class weighted
    ``fg_weight`` (``fss_focal`` at gamma 0; ours: with about 4 % target pixels and twice as
    much distractor ink, plain CE collapsed to all-background at width 16)."""
    if isinstance(fg_weight, bool) or not isinstance(fg_weight, (int, float)) or not (
            0 < fg_weight <= 1000):
        raise ConfigError("distillfss.fg_weight", fg_weight, "a number in (0, 1000]")
    return [Term("fss_focal", gamma=0.0, weights=[1.0, float(fg_weight)], name="wce")]


def set_trainable(student: DistillFSSNet, train_decoder: bool = True) -> list[str]:
    """Class blocks train; the decoder with ``train_decoder``; the encoder stays as built
    (frozen unless the student was made with ``freeze_encoder=False``)."""
    student.blocks.requires_grad_(True)
    student.decoder.requires_grad_(bool(train_decoder))
    return [n for n, m in student.named_children()
            if any(p.requires_grad for p in m.parameters())]


def _check_taps(student: nn.Module, teacher: nn.Module | None, taps) -> list[str]:
    taps = [taps] if isinstance(taps, str) else list(taps)
    if not taps or not all(isinstance(t, str) for t in taps):
        raise ConfigError("distillfss.taps", taps, "a non-empty list of module paths")
    for side, model in (("student", student), ("teacher", teacher)):
        names = dict(model.named_modules())
        bad = [t for t in taps if t not in names]
        if bad:
            raise ConfigError("distillfss.taps", bad, f"coarse-map modules of the {side}, "
                              f"e.g. {list(COARSE_TAPS)}")
    return taps


@METHODS.register("distillfss", paper=PAPER, year=2025, family="dense")
def distillfss(
    student,
    teacher=None,
    *,
    stage: str = "distill",
    gamma: NonNeg = 2.0,
    class_weights: list[float] | None = None,
    train_decoder: bool = True,
    taps: Sequence[str] = COARSE_TAPS,
) -> Recipe:
    """The terms of one stage (module doc). ``gamma``: the focal exponent (2);
    ``class_weights``: weights per class (background, target) of the focal terms, or of the
    cross-entropy in stage ``"ce"``; ``taps``: the coarse maps, the same paths on both
    models. Sets which student parameters train."""
    if stage not in STAGES:
        raise ConfigError("distillfss.stage", stage, f"one of {', '.join(STAGES)}")
    if not isinstance(student, DistillFSSNet):
        raise ConfigError("method.student", type(student).__name__,
                          "a DistillFSS student (zoo model distillfss-student, or "
                          "models.fewshot.student_from_teacher)")
    if not isinstance(train_decoder, bool):
        raise ConfigError("distillfss.train_decoder", train_decoder, "true or false")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma <= 10:
        raise ConfigError("distillfss.gamma", gamma, "a number in [0, 10] (the paper: 2)")
    if class_weights is not None and (
            isinstance(class_weights, (str, bytes)) or len(class_weights) != 2
            or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0
                       for w in class_weights)):
        raise ConfigError("distillfss.class_weights", class_weights,
                          "two weights >= 0 (background, target) or None")
    parts = set_trainable(student, train_decoder)
    fw = {"gamma": float(gamma), "weights": None if class_weights is None
          else [float(w) for w in class_weights]}
    note = f"distillfss {stage}; trains {' + '.join(parts)}"
    if stage == "ce":  # cross-entropy (class-weighted with class_weights), no teacher
        term = Term("ce") if class_weights is None else Term(
            "fss_focal", gamma=0.0, weights=fw["weights"], name="wce")
        return Recipe([term], note=note + " (CE on the shots, no teacher)")
    if not isinstance(teacher, ProtoFSS):
        raise ConfigError("method.teacher", type(teacher).__name__ if teacher is not None
                          else None, f"a proto-fss teacher (stage {stage!r} distils it)")
    taps = _check_taps(student, teacher, taps)
    coarse = Term("fss_coarse_mse", student=taps, teacher=taps, name="coarse_mse",
                  weight=0.5 if stage == "distill" else 1 / 3)
    if stage == "distill":
        terms = [Term("fss_focal_kd", weight=0.5, name="focal_kd", **fw), coarse]
    else:
        terms = [Term("fss_focal", student="output.support_logits", class_dim=1,
                      weight=1 / 3, name="focal_support", **fw),
                 Term("fss_focal", weight=1 / 3, name="focal", **fw), coarse]
    return Recipe(terms, note=note)
