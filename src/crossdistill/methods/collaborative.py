"""CNN-Transformer collaborative learning (HFD + BSD) and its baseline, deep mutual learning.

Paper: Zhu et al., "A Good Student is Cooperative and Reliable: CNN-Transformer
Collaborative Learning for Semantic Segmentation", ICCV 2023; baseline: Zhang et al., "Deep
Mutual Learning", CVPR 2018. Maths: ``hfd``, ``bsd`` and ``dml`` in ``losses/hetero.py``.

How the trainer "supports two trainable models" without any change to ``train/``: the two
peers are wrapped in one :class:`CollaborativePair` module that is the distiller's *student*
(and there is no teacher). The trainer optimises every parameter of the pair; taps reach into
either member by path (``"a.layer1"``, ``"b.blocks.0"``; ``"a"``/``"b"`` are the members'
logits), so each paper term is an ordinary :class:`~crossdistill.Term`. The pair's own
output (what the trainer's validation selects on) is the mean of the two members' logits
(``output="mean"``; ``"a"``/``"b"`` pick one member). After training each member is a plain
model (``pair.a``, ``pair.b``) and is evaluated or exported on its own.
"""

from __future__ import annotations

from torch import nn

from ..distiller import Term
from ..errors import ConfigError
from ..registry import METHODS
from . import Recipe


class CollaborativePair(nn.Module):
    """Two peers trained together. ``forward(x)`` runs both; returns the mean of their logits
    (``output="mean"``, the default), or one member's logits (``"a"`` / ``"b"``)."""

    def __init__(self, a: nn.Module, b: nn.Module, output: str = "mean"):
        super().__init__()
        if output not in ("mean", "a", "b"):
            raise ConfigError("collaborative.output", output, "one of mean, a, b")
        self.a, self.b = a, b
        self.output = output
        self.stages = [f"a.{s}" for s in getattr(a, "stages", [])] + [
            f"b.{s}" for s in getattr(b, "stages", [])
        ]
        self.family = "pair"

    def forward(self, x):
        za, zb = self.a(x), self.b(x)
        if self.output == "a":
            return za
        if self.output == "b":
            return zb
        return (za + zb) / 2


def _pair(student, teacher, name):
    if not isinstance(student, CollaborativePair):
        raise ConfigError(
            "method.student",
            type(student).__name__,
            f"{name} trains two peers: pass crossdistill.methods.collaborative."
            "CollaborativePair(a, b) as the student",
        )
    if teacher is not None:
        raise ConfigError(
            "method.teacher",
            type(teacher).__name__,
            f"{name} is online distillation: no teacher (teacher=None)",
        )


@METHODS.register(
    "collaborative",
    paper="A Good Student is Cooperative and Reliable: CNN-Transformer Collaborative "
    "Learning for Semantic Segmentation",
    year=2023,
    family="online",
)
def collaborative(
    student,
    teacher=None,
    *,
    hfd_weight: float = 1.0,
    bsd_weight: float = 1.0,
    temperature: float = 1.0,
    a_tap: str | None = None,
    b_tap: str | None = None,
) -> Recipe:
    """CE(a) + CE(b) + HFD(a's and b's low-layer features, both ways, detached targets) +
    BSD(per-sample selective KL both ways). ``a_tap``/``b_tap`` default to each member's
    first stage (the "low-layer" features). Weights 1 (our choice; the paper's segmentation
    weights do not transfer)."""
    _pair(student, teacher, "collaborative")
    a_tap = a_tap or "a." + getattr(student.a, "stages", ["?"])[0]
    b_tap = b_tap or "b." + getattr(student.b, "stages", ["?"])[0]
    return Recipe(
        [
            Term("ce", student="a", name="ce_a"),
            Term("ce", student="b", name="ce_b"),
            Term("hfd", student=[a_tap, b_tap], teacher=None, weight=hfd_weight),
            Term(
                "bsd", student=["a", "b"], teacher=None, temperature=temperature, weight=bsd_weight
            ),
        ],
        note=f"collaborative: HFD {a_tap} <-> {b_tap}, BSD on logits",
    )


@METHODS.register("dml", paper="Deep Mutual Learning", year=2018, family="online")
def dml(student, teacher=None, *, weight: float = 1.0, temperature: float = 1.0) -> Recipe:
    """CE(a) + CE(b) + symmetric KL between the peers (Zhang et al. 2018), the baseline the
    collaborative-learning claim names."""
    _pair(student, teacher, "dml")
    return Recipe(
        [
            Term("ce", student="a", name="ce_a"),
            Term("ce", student="b", name="ce_b"),
            Term("dml", student=["a", "b"], teacher=None, temperature=temperature, weight=weight),
        ]
    )
