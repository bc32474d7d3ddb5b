"""TransKD's feature terms: cross-selective fusion (CSF) scored by the hierarchical context
loss (HCL), and HCL alone on one map pair (the feature-map-only baseline).

Paper: Liu et al., "TransKD: Transformer Knowledge Distillation for Efficient Semantic
Segmentation" (arXiv 2202.13393, 2023), its cross selective fusion (CSF) and the HCL it takes
from ReviewKD (Chen et al., "Distilling Knowledge via Knowledge Review", CVPR 2021); the forms
below are those of the official code (RuipingL/TransKD ``train/CSF.py``: ``SK``, ``SKF``,
``hcl``; ``train/train_TransKDBase.py``: the total loss), read at the fetched snapshot, not run.
We did not have the paper's text, so no equation numbers are given.

* ``hcl`` (:func:`hcl`): for one map pair ``(B, C, H, W)``,
  ``HCL(S, T) = [MSE(S, T) + sum_l w_l MSE(pool_l S, pool_l T)] / (1 + sum_l w_l)`` over the
  adaptive average-pool sizes l in (4, 2, 1) that are smaller than the map (``l < min(H,
  W)``, as the code's ``if l >= h: continue``); the weights halve for each size *used*:
  1/2, 1/4, 1/8 when all three are used, 1/2, 1/4 on a 4x4 map (the code's ``cnt /= 2``
  after the skip). Teacher detached.
* ``csf`` (stateful; :class:`CSFLoss`): the student's stage maps S_1..S_n (shallow to deep)
  are processed deepest first: ``X_n = conv1x1_n(S_n)`` (to ``mid_channels``, 64 in the
  paper, + BN); for i < n, ``X_i = a_0 * conv1x1_i(S_i) + a_1 * up(X_{i+1})`` with SK
  attention ``(a_0, a_1) = softmax_branch(FC_b(ReLU(FC(GAP(conv1x1_i(S_i) +
  up(X_{i+1}))))))`` per channel (``up``: nearest, to level i's grid); each level's output
  ``Y_i = conv3x3_i(X_i)`` (+ BN) has the teacher's width; ``L = sum_i HCL(Y_i, T_i)`` (an
  unweighted sum over stages, as the code). The fusion modules are parameters of the loss:
  they train with the student and are never exported.
* ``class_weighted_ce`` (:func:`class_weighted_ce`): the paper's task loss, CE weighted per
  class; :func:`frequency_weights` gives ENet/ERFNet-style weights from label frequencies.

Not copied from the official code: the teacher runs under ``no_grad`` and its features are
detached (the code's training loop calls the teacher outside ``no_grad``); the FC of the SK
attention is one BN-free ``Linear + ReLU`` (the code uses ``conv1x1 + BN + ReLU``, and for a
batch of one a *second*, otherwise untrained, BN-free FC: ours is the same function at every
batch size). Hidden width of that FC ``max(mid_channels // 16, 32)`` as the code. Our
inference: when a level's output grid differs from its teacher map (models with other
strides) it is resized to it (:func:`crossdistill.projectors.resize_map`); the code assumes
equal grids (SegFormer MiT pairs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..projectors import resize_map
from ..registry import LOSSES
from ..schema import NonNeg, Width
from .features import _no_autocast, _pair, _upcast

PAPER = "TransKD: Transformer Knowledge Distillation for Efficient Semantic Segmentation"
POOL_SIZES = (4, 2, 1)


def _check_maps(field: str, s: Tensor, t: Tensor) -> None:
    if s.dim() != 4 or s.shape != t.shape:
        raise ConfigError(field, f"student {tuple(s.shape)} vs teacher {tuple(t.shape)}",
                          "two equal (B, C, H, W) maps (give the student tap a projector, "
                          "e.g. conv1x1)")


def hcl_weights(h: int, w: int) -> list[tuple[int | None, float]]:
    """``[(pool size or None for the full map, weight)]`` HCL uses on an ``h x w`` map."""
    out, weight = [(None, 1.0)], 1.0
    for size in POOL_SIZES:
        if size >= min(h, w):
            continue
        weight /= 2
        out.append((size, weight))
    return out


def hcl_value(s: Tensor, t: Tensor) -> Tensor:
    """HCL of one pair of equal ``(B, C, H, W)`` maps (module doc); ``t`` as given (detach it
    before calling when it is a target)."""
    levels = hcl_weights(*s.shape[-2:])
    total = sum(w for _, w in levels)
    loss = s.new_zeros(())
    for size, w in levels:
        a, b = (s, t) if size is None else (F.adaptive_avg_pool2d(s, size),
                                            F.adaptive_avg_pool2d(t, size))
        loss = loss + w * F.mse_loss(a, b)
    return loss / total


@LOSSES.register("hcl", paper=PAPER + " (HCL of ReviewKD: Distilling Knowledge via Knowledge "
                 "Review)", year=2023, inputs="features", default_weight=1.0)
def hcl(s: Tensor, t: Tensor) -> Tensor:
    """Hierarchical context loss on one map pair: :func:`hcl_value` with the teacher detached
    (the feature-map-only baseline of TransKD when put on projected stage maps). Shapes:
    equal ``(B, C, H, W)`` maps (a projector on the student tap)."""
    _check_maps("hcl.inputs", s, t)
    s, t = _pair(s, t)
    with _no_autocast(s):
        return hcl_value(s, t)


def frequency_weights(labels: Tensor, num_classes: int, c: float = 1.10) -> list[float]:
    """ENet/ERFNet-style class weights ``w_k = 1 / ln(c + p_k)`` from the label frequencies
    ``p_k`` of ``labels`` (ignored pixels, -100, left out). With ``c = 1.10`` they span about
    1.4 (a dominant class) to 10.5 (a rare one): the range of the Cityscapes weights the
    official code hard-codes (2.6 road ... 10.4); the formula is our reading of them."""
    y = labels[labels != -100].long().flatten()
    p = torch.bincount(y, minlength=num_classes)[:num_classes].double() / max(1, y.numel())
    return [float(v) for v in 1.0 / torch.log(c + p)]


@LOSSES.register("class_weighted_ce", paper=PAPER + " (its task loss)", year=2023,
                 inputs="labels", default_weight=1.0)
def class_weighted_ce(s: Tensor, t: Tensor | None = None, *, y: Tensor,
                      weights: tuple[NonNeg, ...]) -> Tensor:
    """Class-weighted cross-entropy, TransKD's task loss (``CrossEntropyLoss2d(weight)`` in
    the official code): per position ``w_{y_i} * CE(s_i, y_i)``, 0 where ``y == -100``; the
    Term averages over the labelled positions (PyTorch's weighted ``mean`` divides by the sum
    of the weights instead: the same direction, rescaled per batch). ``weights``: one number
    >= 0 per class (e.g. :func:`frequency_weights`). Shapes: ``s`` (..., K), ``y`` (...)."""
    k = s.shape[-1]
    if isinstance(weights, (str, bytes)) or len(weights) != k:
        raise ConfigError("class_weighted_ce.weights", weights,
                          f"{k} numbers >= 0, one per class of the logits")
    s = _upcast(s)
    w = torch.as_tensor([float(v) for v in weights], dtype=s.dtype, device=s.device)
    y = y.long()
    per = F.cross_entropy(s.reshape(-1, k), y.reshape(-1), ignore_index=-100,
                          reduction="none").view(y.shape)
    return per * w[y.clamp_min(0)]


class SKAttention(nn.Module):
    """Selective-kernel attention over two branches (Li et al., "Selective Kernel Networks",
    CVPR 2019, as TransKD's CSF uses it): ``z = ReLU(FC(GAP(x + y)))``, per branch
    ``FC_b(z)``, softmax over the two branches per channel. :meth:`weights` returns
    ``(B, 2, C)``; ``forward(x, y) = a_0 x + a_1 y``."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU())
        self.fcs = nn.ModuleList(nn.Linear(hidden, channels) for _ in range(2))

    def weights(self, x: Tensor, y: Tensor) -> Tensor:
        z = self.fc((x + y).mean((2, 3)))
        return torch.softmax(torch.stack([fc(z) for fc in self.fcs], 1), dim=1)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        a = self.weights(x, y)[..., None, None]
        return a[:, 0] * x + a[:, 1] * y


class CSFLevel(nn.Module):
    """One CSF level (the code's ``SK``): ``conv1x1 + BN`` to ``mid``, SK fusion with the
    deeper level's fused map (``fuse=False`` for the deepest), ``conv3x3 + BN`` to the
    teacher's width. ``forward(s, deeper) -> (output Y, fused X)``."""

    def __init__(self, cin: int, mid: int, cout: int, fuse: bool, hidden: int):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid))
        self.expand = nn.Sequential(nn.Conv2d(mid, cout, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(cout))
        self.attention = SKAttention(mid, hidden) if fuse else None
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)  # as the code
        nn.init.kaiming_uniform_(self.expand[0].weight, a=1)

    def forward(self, s: Tensor, deeper: Tensor | None) -> tuple[Tensor, Tensor]:
        x = self.reduce(s)
        if self.attention is not None:
            x = self.attention(x, F.interpolate(deeper, size=x.shape[-2:], mode="nearest"))
        return self.expand(x), x


def _channels(field: str, shape) -> int:
    shape = tuple(shape)
    if len(shape) != 4:
        raise ConfigError(field, shape, "a (B, C, H, W) stage map (e.g. segformer-tiny's "
                          "encoder.<i>, not the patch-embedding tokens)")
    return shape[1]


@LOSSES.register("csf", paper=PAPER, year=2023, inputs="features", default_weight=1.0,
                 stateful=True)
class CSFLoss(nn.Module):
    """Cross-selective fusion + HCL (module doc) over all student stages at once: give the
    Term ``student=[stage maps, shallow to deep]`` and ``teacher=[the teacher's, same
    order]`` and no projector (the fusion is the bridge). ``mid_channels``: the common
    width of the fusion (64, the paper's)."""

    def __init__(self, s_shapes, t_shapes, *, num_samples=None, mid_channels: Width = 64):
        super().__init__()
        if not isinstance(s_shapes, (list, tuple)) or not s_shapes or (
                len(s_shapes) != len(t_shapes)):
            raise ConfigError("csf.inputs", (len(s_shapes or ()), len(t_shapes or ())),
                              "equally long, non-empty lists of student and teacher stage "
                              "maps (a multi-tap term: student=[...], teacher=[...])")
        if isinstance(mid_channels, bool) or not isinstance(mid_channels, int) or (
                mid_channels < 1):
            raise ConfigError("csf.mid_channels", mid_channels, "an integer >= 1")
        s_ch = [_channels(f"csf.student[{i}]", sh) for i, sh in enumerate(s_shapes)]
        t_ch = [_channels(f"csf.teacher[{i}]", sh) for i, sh in enumerate(t_shapes)]
        hidden = max(mid_channels // 16, 32)
        deepest = len(s_ch) - 1
        self.levels = nn.ModuleList(
            CSFLevel(sc, mid_channels, tc, i != deepest, hidden)
            for i, (sc, tc) in enumerate(zip(s_ch, t_ch)))

    def fuse(self, s: list[Tensor], t_sizes) -> list[Tensor]:
        """The per-level outputs ``Y_i`` (shallow to deep), each on its teacher map's grid."""
        outs: list[Tensor] = [None] * len(s)  # type: ignore[list-item]
        fused = None
        for i in reversed(range(len(s))):
            want = self.levels[i].reduce[0].in_channels
            if s[i].dim() != 4 or s[i].shape[1] != want:
                raise ConfigError(f"csf.student[{i}]", tuple(s[i].shape),
                                  f"a (B, {want}, H, W) map, as at build time")
            y, fused = self.levels[i](s[i], fused)
            outs[i] = resize_map(y, tuple(t_sizes[i]))
        return outs

    def forward(self, s: list[Tensor], t: list[Tensor], **_) -> Tensor:
        if len(s) != len(self.levels) or len(t) != len(self.levels):
            raise ConfigError("csf.inputs", (len(s), len(t)),
                              f"lists of {len(self.levels)} student and teacher maps")
        t = [_upcast(x.detach()) for x in t]
        outs = self.fuse([_upcast(x) for x in s], [x.shape[-2:] for x in t])
        loss = None
        with _no_autocast(outs[0]):
            for i, (y, ti) in enumerate(zip(outs, t)):
                if y.shape != ti.shape:
                    raise ConfigError(f"csf.teacher[{i}]", tuple(ti.shape),
                                      f"a map of the width this level was built for "
                                      f"({y.shape[1]})")
                v = hcl_value(y.to(ti.dtype), ti)
                loss = v if loss is None else loss + v
        return loss
