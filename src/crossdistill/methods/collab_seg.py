"""CNN-Transformer collaborative learning for segmentation, and its deep-mutual-learning
baseline in segmentation form.

Paper: Zhu et al., "A Good Student is Cooperative and Reliable: CNN-Transformer Collaborative
Learning for Semantic Segmentation", ICCV 2023 (no official code found); baseline: Zhang et
al., "Deep Mutual Learning", CVPR 2018. Two students trained from scratch together, a CNN
(``a``, e.g. ``seg-cnn``) and a ViT segmenter (``b``, e.g. ``vit-seg``), wrapped in one
:class:`SegPair` (the distiller's student; no teacher). The paper's objective (methods/dense.md):

``L = CE_a + CE_b + HFD + region-wise BSD + pixel-wise BSD``

with the maths in ``losses/collab_seg.py`` (``hfd_map``, ``bsd_region_map`` /
``bsd_region_feat``, ``bsd_pixel``). Weights and T are not given in what we could read: every
weight defaults to 1 and T to 1, as methods/dense.md says to start (inference); so are the
region grid (4 x 4), the HFD taps (each member's first stage: seg-cnn ``enc1``, vit-seg
``blocks.0``), region-wise BSD on logits rather than decoder features (``region_on``), and
pixel-wise BSD's confidence comparison (``compare``). ``dml_seg`` is CE_a + CE_b + the
classification ``dml`` loss (the symmetric per-position KL, both sides detached in turn)
applied per pixel; it needs no label, so it runs over every pixel.

Dense logits keep their class axis at dim 1, while the losses act on the last dim, so the
pair taps each member's logits class-last through identity modules (``class_last.a``,
``class_last.b``); they hold no weights, and the members stay plain models (``pair.a``,
``pair.b``), evaluated and exported alone. The trainer's own selection runs on the pair's
output (the mean of both logits); :class:`BestMembersByTask` keeps each member's own best
epoch on val by the task's metric (mIoU here), the segmentation counterpart of
``collaborative.BestMembers`` (which reads classification accuracy).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import tasks as _tasks
from ..data.loaders import eval_batches
from ..distiller import Term
from ..errors import ConfigError
from ..losses import collab_seg as _losses  # noqa: F401  (registers the dense losses)
from ..losses import hetero as _hetero  # noqa: F401  (registers dml)
from ..registry import METHODS
from ..train.loop import eval_io
from . import Recipe
from .collaborative import CollaborativePair, _pair

A_LOGITS, B_LOGITS = "class_last.a", "class_last.b"
REGION_ON = ("logits", "features")


class SegPair(CollaborativePair):
    """A :class:`~crossdistill.methods.collaborative.CollaborativePair` of two dense models
    (``a``: the CNN, ``b``: the transformer) whose logits are also tapped class-last: each
    forward passes every member's ``(B, K, H, W)`` logits, moved to ``(B, H, W, K)``, through
    ``class_last.<name>`` (an identity, no weights). ``forward`` returns what the pair does:
    the mean of the logits (class axis at dim 1) or one member's."""

    def __init__(self, a: nn.Module, b: nn.Module, output: str = "mean"):
        super().__init__(a, b, output=output)
        self.class_last = nn.ModuleDict({n: nn.Identity() for n in self.names})

    def logits(self, *args, **inputs) -> dict:
        z = super().logits(*args, **inputs)
        for name, v in z.items():
            # contiguous: softmaxes over a strided class axis are several times slower
            self.class_last[name](v.movedim(1, -1).contiguous() if v.dim() > 2 else v)
        return z


def _seg_pair(student, teacher, name: str) -> None:
    _pair(student, teacher, name)
    if not isinstance(student, SegPair):
        raise ConfigError("method.student", type(student).__name__,
                          f"{name} taps class-last member logits: pass crossdistill.methods."
                          "collab_seg.SegPair(cnn, vit) as the student")


def _weight(field: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
        raise ConfigError(field, v, "a number >= 0")
    return float(v)


def _temperature(field: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
        raise ConfigError(field, v, "a positive number")
    return float(v)


def _tap(pair: SegPair, member: str, tap: str | None, which: int, field: str) -> str:
    """``"<member>.<path>"``: the given path, or the member's ``stages[which]``; checked."""
    model = pair[member]
    if tap is None:
        stages = getattr(model, "stages", None)
        if not stages:
            raise ConfigError(field, None, f"member {member} has no `stages`: give the tap")
        tap = stages[which]
    if not isinstance(tap, str) or tap.removeprefix(f"{member}.") not in dict(
            model.named_modules()):
        raise ConfigError(field, tap, f"a module path of member {member}, e.g. "
                          f"{getattr(model, 'stages', None)}")
    return f"{member}.{tap.removeprefix(f'{member}.')}"


def _ce_terms() -> list:
    return [Term("ce", student=A_LOGITS, name="ce_a"), Term("ce", student=B_LOGITS, name="ce_b")]


@METHODS.register("collaborative_seg", paper=_losses.PAPER, year=2023, family="online")
def collaborative_seg(
    student,
    teacher=None,
    *,
    hfd_weight: float = 1.0,
    region_weight: float = 1.0,
    pixel_weight: float = 1.0,
    temperature: float = 1.0,
    regions: int = 4,
    region_on: str = "logits",
    compare: bool = True,
    a_tap: str | None = None,
    b_tap: str | None = None,
    a_region_tap: str | None = None,
    b_region_tap: str | None = None,
) -> Recipe:
    """``CE_a + CE_b + hfd_weight * HFD + region_weight * region BSD + pixel_weight * pixel
    BSD`` (module doc). HFD taps ``a_tap``/``b_tap`` default to each member's first stage;
    region-wise BSD splits the maps into ``regions x regions`` and acts on the logits
    (``region_on="logits"``: KL) or on decoder features (``"features"``: MSE through 1x1-conv
    projectors; ``a_region_tap``/``b_region_tap`` default to each member's last stage).
    ``compare``: pixel-wise BSD also requires the teacher's true-class probability to beat
    the pupil's. A term with weight 0 is left out."""
    _seg_pair(student, teacher, "collaborative_seg")
    w_hfd = _weight("collaborative_seg.hfd_weight", hfd_weight)
    w_reg = _weight("collaborative_seg.region_weight", region_weight)
    w_pix = _weight("collaborative_seg.pixel_weight", pixel_weight)
    T = _temperature("collaborative_seg.temperature", temperature)
    if isinstance(regions, bool) or not isinstance(regions, int) or regions < 1:
        raise ConfigError("collaborative_seg.regions", regions, "a positive integer (regions "
                          "per side)")
    if region_on not in REGION_ON:
        raise ConfigError("collaborative_seg.region_on", region_on,
                          f"one of {', '.join(REGION_ON)}")
    if not isinstance(compare, bool):
        raise ConfigError("collaborative_seg.compare", compare, "true or false")
    terms = _ce_terms()
    note = []
    if w_hfd > 0:
        ta = _tap(student, "a", a_tap, 0, "collaborative_seg.a_tap")
        tb = _tap(student, "b", b_tap, 0, "collaborative_seg.b_tap")
        terms.append(Term("hfd_map", student=[ta, tb], teacher=None, weight=w_hfd, name="hfd"))
        note.append(f"HFD {ta} <-> {tb}")
    if w_reg > 0:
        if region_on == "logits":
            terms.append(Term("bsd_region_map", student=[A_LOGITS, B_LOGITS], teacher=None,
                              grid=regions, temperature=T, weight=w_reg, name="bsd_region"))
            note.append(f"region BSD ({regions}x{regions}, logits)")
        else:
            ra = _tap(student, "a", a_region_tap, -1, "collaborative_seg.a_region_tap")
            rb = _tap(student, "b", b_region_tap, -1, "collaborative_seg.b_region_tap")
            terms.append(Term("bsd_region_feat", student=[ra, rb, A_LOGITS, B_LOGITS],
                              teacher=None, grid=regions, weight=w_reg, name="bsd_region"))
            note.append(f"region BSD ({regions}x{regions}, features {ra} / {rb})")
    if w_pix > 0:
        terms.append(Term("bsd_pixel", student=[A_LOGITS, B_LOGITS], teacher=None,
                          temperature=T, compare=compare, weight=w_pix, name="bsd_pixel"))
        note.append("pixel BSD" + (" (correct and more confident)" if compare else
                                   " (correct)"))
    return Recipe(terms, note="collaborative_seg: CE_a + CE_b + " + " + ".join(note))


@METHODS.register("dml_seg", paper="Deep Mutual Learning", year=2018, family="online")
def dml_seg(student, teacher=None, *, weight: float = 1.0, temperature: float = 1.0) -> Recipe:
    """``CE_a + CE_b + weight * DML`` per pixel (Zhang et al. 2018, Eqs. 2 and 4 on every
    pixel's class distribution): the collaborative-learning claim's online-KD baseline."""
    _seg_pair(student, teacher, "dml_seg")
    w = _weight("dml_seg.weight", weight)
    T = _temperature("dml_seg.temperature", temperature)
    terms = _ce_terms()
    if w > 0:
        terms.append(Term("dml", student=[A_LOGITS, B_LOGITS], teacher=None, temperature=T,
                          weight=w))
    return Recipe(terms, note="dml_seg: CE_a + CE_b + per-pixel mutual KL")


@torch.no_grad()
def evaluate_members(pair, data, task, *, device="cpu", batch_size: int = 256,
                     mean: bool = True) -> dict:
    """Every member's task metrics on ``data`` (and, ``mean=True``, the mean of their logits
    as ``"mean"``) in one pass: ``{name: metrics}``."""
    task = _tasks.build(task)
    ios = {n: eval_io(task, pair.member_io(n) or None)[1] for n in pair.names}
    names = [*pair.names, *(["mean"] if mean else [])]
    sums: dict = {n: {} for n in names}
    was = pair.training
    pair.eval()
    try:
        for batch, keep in eval_batches(data, batch_size):
            batch = {k: v.to(device) for k, v in batch.items()}
            z = {n: ios[n].logits(ios[n].call(pair[n], batch)) for n in pair.names}
            if mean:
                z["mean"] = sum(z[n] for n in pair.names) / len(pair.names)
            for n in names:
                task.update(sums[n], z[n], batch, keep=keep)
    finally:
        pair.train(was)
    return {n: task.compute(sums[n]) for n in names}


class BestMembersByTask:
    """Trainer callback: after every epoch, each member of a pair (any
    :class:`~crossdistill.methods.members.Members`) and their logit mean are scored on
    ``val`` in one pass by the task's selection metric (``task.select``, e.g. mIoU); each
    member keeps its own best-on-val weights. ``curves[name]`` holds the per-epoch values
    (``"mean"``: the ensemble); ``restore()`` (after ``fit()``) loads each member's best and
    returns ``{name: (best value, epoch)}``. Its state is not checkpointed."""

    def __init__(self, pair, val, task, batch_size: int = 256):
        self.pair, self.val, self.batch_size = pair, val, batch_size
        self.task = _tasks.build(task)
        self.curves: dict = {n: [] for n in [*pair.names, "mean"]}
        self.best = {n: (None, -1, None) for n in pair.names}

    def on_epoch_end(self, trainer, row: dict) -> None:
        epoch = int(row.get("epoch", trainer.state["epoch"] - 1))
        res = evaluate_members(self.pair, self.val, self.task, device=trainer.device,
                               batch_size=self.batch_size)
        for name, m in res.items():
            self.curves[name].append(float(m[self.task.select]))
        for name in self.pair.names:
            value = float(res[name][self.task.select])
            if self.task.better(value, self.best[name][0]):
                state = {k: v.detach().clone() for k, v in self.pair[name].state_dict().items()}
                self.best[name] = (value, epoch, state)

    def restore(self) -> dict:
        for name, (_, _, state) in self.best.items():
            if state is not None:
                self.pair[name].load_state_dict(state)
        return {name: (value, epoch) for name, (value, epoch, _) in self.best.items()}
