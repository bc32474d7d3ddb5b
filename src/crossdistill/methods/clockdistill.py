"""CLoCKDistill for DETRs, and the two baselines its claim names.

Paper: Lan et al., "CLoCKDistill: Consistent Location-and-Context-aware Knowledge
Distillation for DETRs", 2025 (official code cited, not obtainable; forms are inference from
the abstract, see ``losses/clock.py``). Claim: memory + target-aware-query KD > backbone
feature KD and > Hungarian-matched logit KD.

How the target-aware queries reach both decoders without touching the trainer: the
:class:`TargetQueries` prepare stage (training only) writes each batch's ground truth as
query descriptors ``(B, M, 4 + K)`` = normalised cxcywh + one-hot class (zeros for padding)
under ``target_queries``; both models' adapters pass that key as an *optional* keyword input
(``"?target_queries"``), so evaluation calls the detectors without it. Build the distiller
with ``io=QUERY_IO, teacher_io=QUERY_IO, prepare=[TargetQueries()]``
(:func:`distiller_kwargs` returns exactly that). The teacher learns to answer such queries
while it is trained (:func:`teacher_terms`: set loss + ``query_recon``, DN-DETR-style); a
DETR teacher trained without it has a random target-query branch, which the paper's anchor-
style decoders do not need but a tiny DETR with free learned queries does (our adaptation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..boxes import valid_boxes, xyxy_to_cxcywh
from ..distiller import Term
from ..errors import ConfigError
from ..prepare import Stage
from ..registry import METHODS, PREPARES
from ..schema import NonNeg, Temperature
from . import Recipe

QUERY_IO = {"inputs": {"x": "image", "target_queries": "?target_queries"}}
VARIANTS = ("clock", "memory", "query", "backbone", "matched")


@PREPARES.register(
    "target_queries",
    description="ground-truth boxes + classes as DETR query descriptors (CLoCKDistill)",
)
class TargetQueries(Stage):
    """``batch[out] = [cxcywh / image size, one_hot(class)]`` per padded object, zeros for
    padding rows (their outputs are never scored)."""

    in_build = True  # the detectors read its key: the build's dry run needs it too

    def __init__(self, boxes: str = "boxes", labels: str = "box_labels", image: str = "image",
                 num_classes: int = 10, out: str = "target_queries"):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError("prepare.num_classes", num_classes, "a positive integer")
        self.boxes, self.labels, self.image, self.out = boxes, labels, image, out
        self.num_classes = num_classes

    def forward(self, batch, state):
        for k in (self.boxes, self.labels, self.image):
            if k not in batch:
                raise ConfigError("prepare.target_queries", k,
                                  f"a batch key; the batch has {', '.join(sorted(batch))}")
        b, lab = batch[self.boxes].float(), batch[self.labels]
        h, w = batch[self.image].shape[-2:]
        ok = valid_boxes(b, lab)
        geo = xyxy_to_cxcywh(b) / b.new_tensor([w, h, w, h])
        cls = F.one_hot(lab.clamp(0, self.num_classes - 1), self.num_classes).to(geo.dtype)
        q = torch.cat([geo, cls], -1) * ok[..., None]
        return {**batch, self.out: q}


def teacher_terms() -> list[Term]:
    """A CLoCKDistill teacher's training terms: the set loss plus ``query_recon``, which
    teaches its target-query branch to answer ground-truth queries (so the queries carry the
    teacher's knowledge); train it with :func:`distiller_kwargs` as well."""
    return [Term("set_loss", student=["output.logits", "output.boxes"], teacher=None),
            Term("query_recon", student=["output.target_logits", "output.target_boxes"],
                 teacher=None)]


def distiller_kwargs(num_classes: int = 10) -> dict:
    """What a CLoCKDistill distiller needs beside the recipe's terms (module doc)."""
    return {"io": dict(QUERY_IO), "teacher_io": dict(QUERY_IO),
            "prepare": [TargetQueries(num_classes=num_classes)]}


@METHODS.register(
    "clockdistill",
    paper="CLoCKDistill: Consistent Location-and-Context-aware Knowledge Distillation for DETRs",
    year=2025,
    family="detection",
)
def clockdistill(
    student,
    teacher,
    *,
    variant: str = "clock",
    memory_weight: NonNeg = 1.0,
    query_weight: NonNeg = 1.0,
    feature_weight: NonNeg = 1.0,
    fg_boost: NonNeg = 4.0,
    temperature: Temperature = 1.0,
) -> Recipe:
    """DETR set loss + (``variant``) ``"clock"``: location-weighted memory MSE + target-aware
    query KD (the paper); ``"memory"`` / ``"query"``: one of the two (ablations);
    ``"backbone"``: MSE on projected backbone maps (the feature-KD baseline); ``"matched"``:
    Hungarian-matched logit + box KD between learned queries (the logit-KD baseline). Weights
    1 and ``fg_boost`` 4 are ours (the paper's are not public)."""
    if variant not in VARIANTS:
        raise ConfigError("clockdistill.variant", variant, f"one of {', '.join(VARIANTS)}")
    if teacher is None:
        raise ConfigError("method.teacher", None, "clockdistill distils a DETR teacher")
    for role, m in (("student", student), ("teacher", teacher)):
        if not hasattr(m, "target_embed"):
            raise ConfigError(f"method.{role}", type(m).__name__,
                              "a DETR with target queries (zoo model detr-tiny)")
    terms = [Term("set_loss", student=["output.logits", "output.boxes"], teacher=None)]
    if variant in ("clock", "memory"):
        terms.append(Term("clock_memory", student="encoder", teacher="encoder",
                          projector="linear", weight=memory_weight, fg_boost=fg_boost))
    if variant in ("clock", "query"):
        taps = ["output.target_logits", "output.target_boxes"]
        terms.append(Term("clock_query", student=taps, teacher=taps, weight=query_weight,
                          temperature=temperature))
    if variant == "backbone":
        terms.append(Term("mse", student="backbone", teacher="backbone", projector="conv1x1",
                          weight=feature_weight, name="backbone_kd"))
    if variant == "matched":
        taps = ["output.logits", "output.boxes"]
        terms.append(Term("matched_kd", student=taps, teacher=taps, weight=query_weight,
                          temperature=temperature))
    return Recipe(terms, note=f"clockdistill ({variant})")
