"""CNN-Transformer collaborative learning (HFD + BSD) and its baseline, deep mutual learning.

Paper: Zhu et al., "A Good Student is Cooperative and Reliable: CNN-Transformer
Collaborative Learning for Semantic Segmentation", ICCV 2023; baseline: Zhang et al., "Deep
Mutual Learning", CVPR 2018. Maths: ``hfd``, ``bsd``, ``bsd_region`` and ``dml`` in
``losses/hetero.py``.

BSD comes in the paper's two forms (``bsd=``): per sample on the logits (``"sample"``, the
classification recast of pixel-wise BSD), region-wise (``"region"``: each member's last
feature map is pooled to ``regions x regions`` patches, a trainable head per member predicts
every patch's class, and per patch the member with the lower CE teaches the other), or
``"both"`` (the default, as methods.md prescribes for classification: per-sample selection
plus patch regions of the last feature map). The region heads live in the loss module, so
they train with the pair but are never part of an exported member.

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
from ..schema import Depth, NonNeg, Temperature
from . import Recipe
from .members import Members

_BSD_MODES = ("sample", "region", "both")


class CollaborativePair(Members):
    """Two peers on one input (a :class:`~crossdistill.methods.members.Members` of ``a`` and
    ``b``). ``forward(x)`` runs both; returns the mean of their logits (``output="mean"``,
    the default), or one member's logits (``"a"`` / ``"b"``)."""

    def __init__(self, a: nn.Module, b: nn.Module, output: str = "mean"):
        if output not in ("mean", "a", "b"):
            raise ConfigError("collaborative.output", output, "one of mean, a, b")
        super().__init__({"a": a, "b": b}, output=output, field="collaborative")
        self.family = "pair"


class BestMembers:
    """Trainer callback: each member of a :class:`CollaborativePair` (any
    :class:`~crossdistill.methods.members.Members`) keeps its *own* best-validation weights.

    The trainer selects one checkpoint on the pair's output (the mean of both members'
    logits), which the stronger member dominates: the weaker member is then judged at an epoch
    chosen for the other one. This callback evaluates both members on ``val`` after every
    epoch and keeps each one's best state; ``restore()`` (after ``fit()``) loads them. Its
    state is not checkpointed: a resumed run tracks the best from the resume on.
    """

    def __init__(self, pair: Members, val, task=None):
        self.pair, self.val, self.task = pair, val, task
        self.best = {n: (-1.0, -1, None) for n in pair.names}

    def on_epoch_end(self, trainer, row: dict) -> None:
        from ..train import evaluate

        epoch = int(row.get("epoch", trainer.state["epoch"] - 1))
        for name in self.pair.names:
            member = self.pair[name]
            io = self.pair.member_io(name) or None
            acc = evaluate(member, self.val, device=trainer.device, task=self.task, io=io)["acc"]
            if acc > self.best[name][0]:
                state = {k: v.detach().clone() for k, v in member.state_dict().items()}
                self.best[name] = (acc, epoch, state)
        self.pair.train()

    def restore(self) -> dict:
        """Load each member's best weights; returns ``{name: (val_acc, epoch)}``."""
        for name, (_, _, state) in self.best.items():
            if state is not None:
                self.pair[name].load_state_dict(state)
        return {name: (acc, epoch) for name, (acc, epoch, _) in self.best.items()}


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
    hfd_weight: NonNeg = 1.0,
    bsd_weight: NonNeg = 1.0,
    temperature: Temperature = 1.0,
    a_tap: str | None = None,
    b_tap: str | None = None,
    bsd: str = "both",
    regions: Depth = 2,
    a_region_tap: str | None = None,
    b_region_tap: str | None = None,
) -> Recipe:
    """CE(a) + CE(b) + HFD(a's and b's low-layer features, both ways, detached targets) +
    BSD, per sample on the logits (``bsd="sample"``), region-wise (``"region"``) or both.
    ``a_tap``/``b_tap`` default to each member's first stage (the "low-layer" features);
    ``a_region_tap``/``b_region_tap`` (region-wise BSD) to each member's last stage, split
    into ``regions x regions`` patches. Weights 1 (our choice; the paper's segmentation
    weights do not transfer); both BSD forms share ``bsd_weight``."""
    _pair(student, teacher, "collaborative")
    if bsd not in _BSD_MODES:
        raise ConfigError("collaborative.bsd", bsd, f"one of {', '.join(_BSD_MODES)}")
    if isinstance(regions, bool) or not isinstance(regions, int) or regions < 1:
        raise ConfigError("collaborative.regions", regions, "a positive integer (grid side)")
    a_stages = getattr(student.a, "stages", None) or ["?"]
    b_stages = getattr(student.b, "stages", None) or ["?"]
    a_tap = a_tap or "a." + a_stages[0]
    b_tap = b_tap or "b." + b_stages[0]
    a_region_tap = a_region_tap or "a." + a_stages[-1]
    b_region_tap = b_region_tap or "b." + b_stages[-1]
    terms = [
        Term("ce", student="a", name="ce_a"),
        Term("ce", student="b", name="ce_b"),
        Term("hfd", student=[a_tap, b_tap], teacher=None, weight=hfd_weight),
    ]
    if bsd in ("sample", "both"):
        terms.append(
            Term(
                "bsd", student=["a", "b"], teacher=None, temperature=temperature, weight=bsd_weight
            )
        )
    if bsd in ("region", "both"):
        terms.append(
            Term(
                "bsd_region_heads",
                student=[a_region_tap, b_region_tap, "a", "b"],  # the logits only fix K
                teacher=None,
                grid=regions,
                temperature=temperature,
                weight=bsd_weight,
                name="bsd_region",
            )
        )
    where = ["on logits"] if bsd != "region" else []
    if bsd != "sample":
        where.append(f"on {regions}x{regions} regions of {a_region_tap} / {b_region_tap}")
    return Recipe(terms, note=f"collaborative: HFD {a_tap} <-> {b_tap}, BSD {' + '.join(where)}")


@METHODS.register("dml", paper="Deep Mutual Learning", year=2018, family="online")
def dml(student, teacher=None, *, weight: NonNeg = 1.0, temperature: Temperature = 1.0) -> Recipe:
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
