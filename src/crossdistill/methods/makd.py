"""MaKD: multi-aspect knowledge distillation.

Lee et al., "Multi-aspect Knowledge Distillation with Large Language Model" (2025). A
multimodal LLM answers A yes/no questions ("aspects") about each training image; the soft
answer ``a_k = softmax([z_Yes, z_No])_Yes`` of its first answer token is an offline target.
The student has ``C + A`` outputs and is trained with

``L = CE(z[:C], y) + 4 * BCE_with_logits(z[C:C+A], a)``

(``configs/fine_grained/makd.yaml``: aspect weight 4; the config's ``TEMPERATURE`` is read
and never used, so there is none here).

Offline there is no MLLM: the aspects are measurable yes/no properties of digit images
(:mod:`crossdistill.data.digit_aspects`: closed loops, bars, strokes, width, thickness,
slant...), and the "MLLM" is a teacher CNN trained with BCE on those measurements; its
``sigmoid`` outputs are the soft answers (``sigmoid(z) = softmax([z, 0])_0``, the two-way
softmax of the paper with ``z = z_Yes - z_No``). The student reads them through the teacher
tap ``logits`` (an online frozen teacher, or a store of its logits: the same numbers).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import ConfigError
from ..losses import vl_classify as _vl_losses  # noqa: F401  (registers the losses)
from ..models.mlp import replace_head
from ..registry import METHODS
from ..schema import Count, NonNeg


class AspectHead(nn.Module):
    """A zoo classifier whose head is widened to ``C + A`` outputs (one Linear, as MaKD's
    student): ``forward`` returns the class logits ``z[:, :C]``; tap ``aspect_out`` holds the
    aspect logits ``z[:, C:]``."""

    def __init__(self, model: nn.Module, num_aspects: int):
        super().__init__()
        if isinstance(num_aspects, bool) or not isinstance(num_aspects, int) or num_aspects < 1:
            raise ConfigError("method.num_aspects", num_aspects, "an integer >= 1")
        head = replace_head(model, lambda h: nn.Linear(h.in_features, h.out_features
                                                       + num_aspects), "method.student")
        self.model, self.num_classes, self.num_aspects = model, head.out_features, num_aspects
        self.aspect_out = nn.Identity()
        self.feature_path = f"model.{model.feature_path}"
        self.stages = [f"model.{s}" for s in getattr(model, "stages", [])]

    def forward(self, x: Tensor) -> Tensor:
        z = self.model(x)
        self.aspect_out(z[:, self.num_classes:])
        return z[:, :self.num_classes]


@METHODS.register(
    "makd",
    paper="Multi-aspect Knowledge Distillation with Large Language Model",
    year=2025,
    family="vision-language",
)
def makd(student, teacher, *, aspect_weight: NonNeg = 4.0, num_aspects: Count | None = None):
    """CE on the class logits + ``aspect_weight`` x BCE of the aspect logits to the teacher's
    soft answers (module docstring). ``teacher``: a model whose logits are the A aspect
    logits; ``num_aspects`` (optional) must then equal the student's A."""
    from ..distiller import Term
    from . import Recipe

    if not isinstance(student, AspectHead):
        raise ConfigError("method.student", type(student).__name__,
                          "an AspectHead(model, num_aspects) student (crossdistill.methods.makd)")
    if teacher is None:
        raise ConfigError("method.teacher", None, "makd distils a teacher's aspect answers")
    if isinstance(aspect_weight, bool) or not isinstance(aspect_weight, (int, float)) or not (
            aspect_weight >= 0):
        raise ConfigError("method.aspect_weight", aspect_weight, "a number >= 0 (0: CE alone)")
    if num_aspects is not None and num_aspects != student.num_aspects:
        raise ConfigError("method.num_aspects", num_aspects,
                          f"the student's aspect outputs ({student.num_aspects})")
    terms = [Term("ce")]
    if aspect_weight:
        terms.append(Term("aspect_bce", student="aspect_out", teacher="logits",
                          weight=aspect_weight))
    return Recipe(terms, note=f"makd: CE + {aspect_weight:g} x aspect BCE")
