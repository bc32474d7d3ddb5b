"""ScaleKD recipe: cross-attention projector, dual-view (spatial + DCT frequency) feature
mimicking, and teacher parameter perception.

Paper: Fan et al., "ScaleKD: Strong Vision Transformers Could Be Excellent Teachers",
NeurIPS 2024 (code: deep-optimization/ScaleKD). Maths: ``mse``, ``dct_mse`` and ``kd`` in
``losses/``; the projector is ``CrossAttentionProjector`` (registered "cross_attention").

Wiring. The student's last stage is projected once by a shared cross-attention projector
into the space of the teacher's *last-stage input* (the output of its penultimate stage).
That projected feature is (1) matched to the teacher's feature with MSE (spatial view,
weight 0.08) and DCT-MSE without DC (frequency view, 0.06), and (2) passed through the
frozen teacher's last stage and head ("teacher parameter perception"), whose logits are
matched to the teacher's own logits with KD at T=1. Plus CE 0.5 and KD(T=1) 0.5 on the
student's logits (the paper's defaults). Choices: the projector is shared by the three
feature terms (one alignment, as in the paper); the perception KD weight defaults to 0.5
(like the logit KD); the mimicking targets are the teacher's penultimate-stage features so
that the perception path is well defined for CNN and ViT teachers alike.
"""

from __future__ import annotations

import torch
from torch import nn

from ..distiller import Term
from ..errors import ConfigError
from ..losses.hetero import CrossAttentionProjector
from ..registry import METHODS
from ..schema import Depth, NonNeg, Temperature
from . import Recipe, stage_tap


def sequential_tail(model: nn.Module, path: str) -> list[nn.Module]:
    """The modules that run from ``path`` (inclusive) to the output, assuming ``model``'s
    forward composes its children in registration order (true for every zoo model: ResNet
    ``layer3 -> pool -> flatten -> fc``, ViT ``blocks[k:] -> norm -> pool -> head``). The
    recipe checks the assumption numerically in the first dry run."""
    return _ordered_tail(model, path.split("."))


def _ordered_tail(model: nn.Module, parts: list[str]) -> list[nn.Module]:
    seq: list[nn.Module] = []
    mod = model
    levels = []
    for name in parts:
        children = list(mod.named_children())
        i = [n for n, _ in children].index(name)
        levels.append(children[i + 1 :])
        mod = children[i][1]
    seq.append(mod)
    for rest in reversed(levels):  # innermost siblings first, then outer ones
        seq.extend(m for _, m in rest)
    return seq


class TeacherPerception(nn.Module):
    """Projected student feature -> frozen teacher tail -> logits. The teacher modules are
    kept in a plain list (not registered): they stay frozen, in eval mode, out of the
    optimiser, the checkpoint and the exported student. Only ``proj`` (shared with the
    mimicking terms) is trainable here."""

    def __init__(self, proj: nn.Module, tail: list[nn.Module]):
        super().__init__()
        self.proj = proj
        self._tail = list(tail)

    def forward(self, x):
        h = self.proj(x)
        for m in self._tail:
            h = m(h)
        return h


class _Shared:
    """Builds one cross-attention projector and hands it to every term that asks."""

    def __init__(self, teacher, t_tap: str, heads: int):
        self.teacher, self.t_tap, self.heads = teacher, t_tap, heads
        self.proj = None
        self.probe = None  # an input batch for the numerical check of the tail

    def projector(self, s_shape, t_shape):
        if self.proj is None:
            self.proj = CrossAttentionProjector(s_shape, t_shape, heads=self.heads)
        return self.proj

    def perception(self, s_shape, t_shape):
        if self.proj is None:
            raise ConfigError("method", "scalekd", "the feature terms must precede perception")
        tail = sequential_tail(self.teacher, self.t_tap)
        for m in tail:
            for p in m.parameters():
                if p.requires_grad:
                    raise ConfigError("method.teacher", "scalekd", "the teacher must be frozen")
        head = TeacherPerception(self.proj, tail)
        if self.probe is not None:
            self._check(tail)
        return head

    @torch.no_grad()
    def _check(self, tail):  # noqa: D401
        """The tail must reproduce the teacher: feed it the teacher's own stage input."""
        seen = {}
        mod = self.teacher.get_submodule(self.t_tap)
        h = mod.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
        try:
            device = next(self.teacher.parameters()).device
            x = self.probe.to(device)
            ref = self.teacher(x)
        finally:
            h.remove()
        out = seen["x"]
        for m in tail:
            out = m(out)
        if out.shape != ref.shape or not torch.allclose(out, ref, atol=1e-4, rtol=1e-3):
            raise ConfigError(
                "method.teacher",
                type(self.teacher).__name__,
                "scalekd's teacher parameter perception needs a teacher whose forward runs its "
                "children in order after the last stage (every zoo model does)",
            )


@METHODS.register(
    "scalekd",
    paper="ScaleKD: Strong Vision Transformers Could Be Excellent Teachers",
    year=2024,
    family="heterogeneous",
)
def scalekd(
    student,
    teacher,
    *,
    ce_weight: NonNeg = 0.5,
    kd_weight: NonNeg = 0.5,
    spatial_weight: NonNeg = 0.08,
    frequency_weight: NonNeg = 0.06,
    perception_weight: NonNeg = 0.5,
    temperature: Temperature = 1.0,
    heads: Depth = 4,
    student_tap: str | None = None,
    teacher_stage: str | None = None,
    input_shape: tuple | None = None,
) -> Recipe:
    """CE 0.5 + KD(T=1) 0.5 + spatial MSE 0.08 + DCT-MSE 0.06 + perception KD 0.5.

    ``student_tap`` defaults to the student's last stage; ``teacher_stage`` to the teacher's
    last stage, whose *input* is the mimicking target and whose modules (plus the head) form
    the perception path. ``input_shape`` (C, H, W) enables a numerical check of that path at
    build time (the benchmark passes it)."""
    if teacher is None:
        raise ConfigError("method.teacher", None, "scalekd needs a teacher")
    s_tap = student_tap or stage_tap(student, -1)
    t_stage = teacher_stage or stage_tap(teacher, -1)
    t_tap = f"{t_stage}:input"
    shared = _Shared(teacher, t_stage, heads)
    if input_shape is not None:
        shared.probe = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
    terms = [
        Term("ce", weight=ce_weight),
        Term("kd", temperature=temperature, weight=kd_weight),
        Term(
            "mse",
            student=s_tap,
            teacher=t_tap,
            projector=shared.projector,
            weight=spatial_weight,
            name="scalekd_spatial",
        ),
        Term(
            "dct_mse",
            student=s_tap,
            teacher=t_tap,
            projector=shared.projector,
            weight=frequency_weight,
            name="scalekd_frequency",
        ),
        Term(
            "kd",
            student=s_tap,
            teacher="logits",
            projector=shared.perception,
            temperature=temperature,
            weight=perception_weight,
            name="scalekd_perception",
        ),
    ]
    return Recipe(terms, note=f"ScaleKD: {s_tap} -> {t_tap}, perception through {t_stage}+head")
