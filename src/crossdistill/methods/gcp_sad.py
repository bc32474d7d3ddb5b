"""GCP + SAD: group channel pruning, then spatial attention distilling from the unpruned model.

Paper: Chu et al., "Group channel pruning and spatial attention distilling for object
detection", Applied Intelligence 2022 (official code chumingqian/
Model_Compression_For_YOLOV3-V4: ``train.py``, ``utils/prune_utils.py``,
``utils/utils.py``). Three stages, two runs of the ordinary trainer:

1. ``stage="sparse"``: dynamic sparse training of the full model: ``CE + s * sum |gamma|``
   over the BNs of the convs that may be pruned (``bn_l1``, the official ``updateBN`` sign
   term as a loss; ``losses/sad.py``), and from ``dynamic_start`` (40 %) of the ``epochs`` on
   the currently kept ``keep`` (65 %) of each pruning group get ``factor`` (1 %) of it. The
   gammas reach the loss through a parameter-free tap the recipe attaches to the model
   (:func:`crossdistill.prune.attach_gammas`; :func:`crossdistill.prune.release` removes it).
2. ``stage="finetune"`` at build time: the group-channel-pruning plan of the sparse-trained
   student (:func:`crossdistill.prune.plan`: per-(scale, module type) gamma thresholds for
   ``ratio`` of the channels, shortcut-linked layers merged by union), applied as logged
   structure events by the :class:`~crossdistill.prune.PruneAt` step hook at the end of the
   first optimiser step (the engine's step hooks run after a step; the student is then an
   exact copy of the teacher, so that step is plain CE on the full model, the same in every
   arm), and replayed by a resumed run.
3. the same run fine-tunes the pruned student with ``CE + sum_l b_l * sad_l`` from the
   unpruned sparse model as teacher (``distill="sad"``; optional head KD at T = 3 with
   ``head_kd`` > 0), or the baselines ``distill="none"`` (pruned + fine-tune, CE only) and
   ``distill="kd"`` (pruned + plain logit KD at ``temperature``).

SAD weights ``b``: the paper uses one weight per layer group (1e6 / 1e3 / 1e4 on YOLOv4's
[7, 16, 37, 58] / [78, 106] / [85, 92, 99]). Because the attention maps are unit vectors,
``sad = (2 - 2 cos) / (H W)``: the official weights grow with the maps. Ours (inference,
scaled for our maps): ``b_l = sad_beta * H_l * W_l`` at ``input_size`` (one weight per
feature scale, i.e. per group of same-scale taps), so every tap adds ``sad_beta * (2 - 2
cos)``; ``weights`` overrides them (one per tap). ``sad_beta = 0.1`` was chosen on the val
split of the ``prune`` benchmark block (at 1.0 the five seg-cnn taps start at about twice the
CE after a 50 % prune and the first epochs lose mIoU). Default taps: the model's ``stages``
(seg-cnn: enc1, enc2, enc3, dec1, dec2).

Official-code bugs not copied: the DDP path calls ``updateBN`` without its epoch argument
(here the penalty is a loss term: no separate call to forget); the teacher returns 2 values
under mixed precision and 3 otherwise, and runs outside ``no_grad`` in fp32 without
mixed precision (here the distiller runs every teacher frozen, in eval mode, without
gradients, through one adapter). The official ``updateBN`` is applied after every
micro-batch's backward, i.e. ``accumulate`` times per optimiser step; here once per step.
Inference: the automatic grouping (the code hard-codes YOLOv4 layer ranges), the per-group
dynamic mask, the SAD weights above, pruning inside the fine-tuning run.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .. import prune as P
from ..distiller import Term
from ..errors import ConfigError
from ..losses import sad as _sad  # noqa: F401  (registers sad, bn_l1)
from ..registry import METHODS
from ..structure import apply
from . import Recipe

STAGES = ("sparse", "finetune")
DISTILL = ("sad", "kd", "none")


def _num(field: str, v, lo: float, hi: float, lo_open: bool = False) -> float:
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and (
        lo < v if lo_open else lo <= v) and v <= hi
    if not ok:
        raise ConfigError(field, v, f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]")
    return float(v)


def _taps(model: nn.Module, taps, field: str) -> list[str]:
    if taps is None:
        taps = getattr(model, "stages", None)
        if not taps:
            raise ConfigError(field, None, f"{type(model).__name__} has no `stages`: give the "
                              "SAD taps (module paths of feature maps)")
    taps = [taps] if isinstance(taps, str) else list(taps)
    names = dict(model.named_modules())
    if not taps or not all(isinstance(t, str) for t in taps):
        raise ConfigError(field, taps, "a non-empty list of module paths")
    for t in taps:
        if t not in names:
            raise ConfigError(field, t, f"a module of the model, e.g. "
                              f"{getattr(model, 'stages', None) or sorted(names)[:12]}")
    return taps


def map_sizes(model: nn.Module, taps: Sequence[str], input_size: int) -> dict[str, tuple]:
    """Each tap's output shape for a zero image of ``input_size`` pixels (eval mode)."""
    x = P.sample_input(model, input_size)
    mods, out = dict(model.named_modules()), {}
    hooks = [mods[t].register_forward_hook(
        lambda m, a, o, t=t: out.__setitem__(t, tuple(o.shape) if torch.is_tensor(o) else None))
        for t in taps]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    for t in taps:
        if out.get(t) is None or len(out[t]) != 4:
            raise ConfigError("gcp_sad.taps", t, "a module whose output is a (B, C, H, W) map")
    return out


def sad_weights(student: nn.Module, taps: Sequence[str], weights, beta: float,
                input_size: int) -> list[float]:
    if weights is None:
        sizes = map_sizes(student, taps, input_size)
        return [beta * sizes[t][2] * sizes[t][3] for t in taps]
    w = [weights[t] for t in taps if t in weights] if isinstance(weights, Mapping) else (
        [weights] if isinstance(weights, (int, float)) else list(weights))
    if len(w) != len(taps):
        raise ConfigError("gcp_sad.weights", weights, f"one weight per tap ({list(taps)})")
    return [_num("gcp_sad.weights", v, 0.0, 1e9) for v in w]


def sparse_terms(student: nn.Module, sparsity: float, epochs: int | None, *, dynamic=True,
                 dynamic_start=0.4, keep=0.65, factor=0.01, layers=None,
                 grouping="scale_type", input_size: int = 32) -> list[Term]:
    """Stage 1's terms (besides CE): the plain penalty and, with ``dynamic``, the dynamic
    relief from ``dynamic_start * epochs`` on; attaches the gamma tap to ``student``."""
    if dynamic and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise ConfigError("gcp_sad.epochs", epochs, "the sparse run's epoch count (a positive "
                          "integer): dynamic sparse training starts at dynamic_start of it")
    targets = P.sparsity_targets(student, layers=layers, grouping=grouping,
                                 input_size=input_size)
    if not targets:
        raise ConfigError("gcp_sad.layers", layers, "at least one prunable conv with a "
                          "BatchNorm (the model has none that can be pruned)")
    paths = [p for _, bns in targets for p in bns]
    segments = [sum(student.get_submodule(p).num_features for p in bns) for _, bns in targets]
    tap = P.attach_gammas(student, paths)
    terms = [Term("bn_l1", student=tap, teacher=None, weight=sparsity, name="bn_l1")]
    if dynamic:
        terms.append(Term("bn_l1", student=tap, teacher=None, weight=sparsity,
                          name="bn_l1_dynamic", begin=dynamic_start * epochs,
                          segments=segments, keep=keep, kept=-(1.0 - factor), rest=0.0))
    return terms


@METHODS.register("gcp_sad", paper=P.PAPER, year=P.YEAR, family="dense")
def gcp_sad(
    student,
    teacher,
    *,
    stage: str = "finetune",
    ratio: float = 0.5,
    distill: str = "sad",
    sparsity: float = 0.001,
    epochs: int | None = None,
    dynamic: bool = True,
    dynamic_start: float = 0.4,
    keep: float = 0.65,
    factor: float = 0.01,
    taps: Sequence[str] | None = None,
    teacher_taps: Sequence[str] | None = None,
    weights=None,
    sad_beta: float = 0.1,
    head_kd: float = 0.0,
    temperature: float = 3.0,
    kd_weight: float = 0.9,
    ce_weight: float = 1.0,
    layers: Sequence[str] | None = None,
    grouping: str = "scale_type",
    min_channels: int = 1,
    input_size: int = 32,
    prune_at: int = 1,
) -> Recipe:
    """GCP + SAD (module doc). ``stage="sparse"``: ``sparsity`` s (0.001-0.005), the run's
    ``epochs`` (for the ``dynamic_start`` switch), ``keep`` / ``factor``. ``stage=
    "finetune"``: ``ratio`` of each group's channels pruned (``layers``: only these convs and
    their shortcut-linked partners; ``grouping``: ``"scale_type"`` or ``"global"``), then
    ``distill`` = ``"sad"`` (taps, ``weights`` or ``sad_beta``, ``head_kd``), ``"kd"``
    (``kd_weight`` at ``temperature``) or ``"none"``. ``input_size``: the side of the images
    the shapes are probed with (the SAD weights use it: give the training size)."""
    if stage not in STAGES:
        raise ConfigError("gcp_sad.stage", stage, f"one of {list(STAGES)}")
    if distill not in DISTILL:
        raise ConfigError("gcp_sad.distill", distill, f"one of {list(DISTILL)}")
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 4:
        raise ConfigError("gcp_sad.input_size", input_size, "an image side >= 4 pixels")
    cw = _num("gcp_sad.ce_weight", ce_weight, 0.0, 1e6)
    terms = [Term("ce", weight=cw)] if cw > 0 else []
    if stage == "sparse":
        s = _num("gcp_sad.sparsity", sparsity, 0.0, 0.1, lo_open=True)
        start = _num("gcp_sad.dynamic_start", dynamic_start, 0.0, 1.0)
        kp = _num("gcp_sad.keep", keep, 0.0, 1.0)
        fc = _num("gcp_sad.factor", factor, 0.0, 1.0)
        terms += sparse_terms(student, s, epochs, dynamic=bool(dynamic), dynamic_start=start,
                              keep=kp, factor=fc, layers=layers, grouping=grouping,
                              input_size=input_size)
        return Recipe(terms, note=f"gcp_sad sparse: ce + {s:g} * L1(BN gammas)"
                      + (f", dynamic from {start:g} of {epochs} epochs" if dynamic else ""))
    ratio = P.check_ratio(ratio, "gcp_sad.ratio")
    P.release(student)  # a sparse stage's gamma tap, if still attached
    if distill != "none" and teacher is None:
        raise ConfigError("method.teacher", None, f"gcp_sad distill={distill!r} distils the "
                          "unpruned (sparse-trained) model: give it as the teacher, or use "
                          "distill='none'")
    plan = P.plan(student, ratio, layers=layers, grouping=grouping, min_channels=min_channels,
                  input_size=input_size)
    pruned = copy.deepcopy(student)
    for e in plan.events:
        apply(pruned, e["op"], {k: v for k, v in e.items() if k != "op"})
    before, after = P.count_params(student), P.count_params(pruned)
    if distill == "sad":
        s_taps = _taps(student, taps, "gcp_sad.taps")
        t_taps = _taps(teacher, s_taps if teacher_taps is None else teacher_taps,
                       "gcp_sad.teacher_taps")
        if len(t_taps) != len(s_taps):
            raise ConfigError("gcp_sad.teacher_taps", t_taps, f"{len(s_taps)} paths, one per tap")
        beta = _num("gcp_sad.sad_beta", sad_beta, 0.0, 1e6)
        for st, tt, b in zip(s_taps, t_taps, sad_weights(student, s_taps, weights, beta,
                                                         input_size)):
            if b > 0:
                terms.append(Term("sad", student=st, teacher=tt, weight=b,
                                  name=f"sad_{st.replace('.', '_')}"))
        hk = _num("gcp_sad.head_kd", head_kd, 0.0, 1e6)
        if hk > 0:
            terms.append(Term("kd", temperature=_num("gcp_sad.temperature", temperature, 0.01,
                                                     1000.0, lo_open=True), weight=hk))
    elif distill == "kd":
        terms.append(Term("kd", temperature=_num("gcp_sad.temperature", temperature, 0.01,
                                                 1000.0, lo_open=True),
                          weight=_num("gcp_sad.kd_weight", kd_weight, 0.0, 1e6)))
    if not terms:
        raise ConfigError("gcp_sad.ce_weight", ce_weight, "ce_weight > 0 or a distillation term")
    kept, total = plan.channels
    note = (f"gcp_sad finetune ({distill}): {len(plan.events)} structure events, channels "
            f"{kept}/{total}, params {before} -> {after}")
    recipe = Recipe(terms, hooks=[P.PruneAt(plan.events, at=prune_at)], note=note)
    recipe.plan, recipe.params = plan, (before, after)  # for reports and tests
    return recipe
