"""Similarity-matrix losses of dual encoders, with the batch gathered across ranks.

A dual encoder embeds both sides of each pair (image and caption, a line and its answer);
its losses compare every query with every key of the *global* batch. Under torch.distributed
each rank holds ``B`` local rows; :func:`gather` all-gathers the keys with their gradients
(the backward sums the ranks' gradients and keeps each rank's own rows), and every loss
scores the local rows against the gathered keys, so that the mean over ranks of the local
losses is the single-process loss of the global batch and DDP's gradient averaging gives its
gradient (tested with 2 gloo processes).

- ``clip``: the symmetric InfoNCE of CLIP (Radford et al., "Learning Transferable Visual
  Models From Natural Language Supervision", ICML 2021, Fig. 3):
  ``L = 1/2 [CE(s * a b^T, diag) + CE(s * b a^T, diag)]`` over unit rows, with a learnable
  ``s = exp(log_scale)`` (init ``1/0.07``, clamped at 100 as in CLIP).
- ``affinity``: TinyCLIP's affinity mimicking (Wu et al., "TinyCLIP: CLIP Distillation via
  Affinity Mimicking and Weight Inheritance", ICCV 2023, Eq. 2-3):
  ``A = s * a b^T`` for student and teacher (each its own scale; the teacher's is fixed),
  ``L = 1/2 [CE_rows(A_s, softmax(A_t)) + CE_rows(A_s^T, softmax(A_t^T))]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import LOSSES
from ..schema import Pos


def _world() -> tuple[int, int]:
    d = torch.distributed
    if d.is_available() and d.is_initialized() and d.get_world_size() > 1:
        return d.get_rank(), d.get_world_size()
    return 0, 1


class _AllGather(torch.autograd.Function):
    """All-gather with a gradient: the backward sums every rank's gradient of the gathered
    tensor and keeps this rank's rows (each rank's loss reads every rank's rows)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        d = torch.distributed
        parts = [torch.empty_like(x) for _ in range(d.get_world_size())]
        d.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = d.get_rank(), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather(x: Tensor) -> tuple[Tensor, int]:
    """``(rows of every rank in rank order, index of this rank's first row)``; the identity
    in one process. Every rank must hold the same number of rows."""
    rank, world = _world()
    if world == 1:
        return x, 0
    return _AllGather.apply(x), rank * x.shape[0]


def _logits(q: Tensor, k: Tensor, scale: Tensor | float) -> Tensor:
    """``scale * cos(q_i, k_j)``, in float32 at least (half-precision inputs under AMP)."""
    dt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), torch.float32)
    return scale * F.normalize(q.to(dt), dim=-1) @ F.normalize(k.to(dt), dim=-1).T


def clip_loss(a: Tensor, b: Tensor, scale: Tensor | float) -> Tensor:
    """CLIP's symmetric InfoNCE of local rows ``a[i] <-> b[i]`` against the gathered batch."""
    ga, start = gather(a)
    gb, _ = gather(b)
    target = torch.arange(a.shape[0], device=a.device) + start
    return 0.5 * (F.cross_entropy(_logits(a, gb, scale), target)
                  + F.cross_entropy(_logits(b, ga, scale), target))


def affinity_loss(s_a: Tensor, s_b: Tensor, t_a: Tensor, t_b: Tensor,
                  s_scale: Tensor | float, t_scale: Tensor | float) -> Tensor:
    """TinyCLIP's affinity mimicking: soft CE of the student's affinities (both directions)
    to the teacher's, local rows against the gathered batch."""
    gs_a, _ = gather(s_a)
    gs_b, _ = gather(s_b)
    gt_a, _ = gather(t_a.detach())
    gt_b, _ = gather(t_b.detach())

    def soft_ce(s: Tensor, t: Tensor) -> Tensor:
        return -(F.softmax(t, -1) * F.log_softmax(s, -1)).sum(-1).mean()

    a2b = soft_ce(_logits(s_a, gs_b, s_scale), _logits(t_a.detach(), gt_b, t_scale))
    b2a = soft_ce(_logits(s_b, gs_a, s_scale), _logits(t_b.detach(), gt_a, t_scale))
    return 0.5 * (a2b + b2a)


def _pair(shapes, field: str) -> tuple[int, int]:
    ok = isinstance(shapes, (list, tuple)) and len(shapes) == 2 and all(
        isinstance(s, (list, tuple)) and len(s) >= 2 for s in shapes)
    if not ok:
        raise ConfigError(field, shapes, "two taps: the query side's and the key side's "
                          "embeddings, (B, D) each")
    return int(shapes[0][-1]), int(shapes[1][-1])


class _Scale(nn.Module):
    """A learnable logit scale ``exp(log_scale)``, clamped at ``max_scale`` (CLIP: 100)."""

    def __init__(self, temperature: float, max_scale: float = 100.0):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        self.max_log = math.log(max_scale)

    def forward(self) -> Tensor:
        return self.log_scale.clamp(max=self.max_log).exp()


def _embed_dims_match(d_a: int, d_b: int, field: str) -> None:
    if d_a != d_b:
        raise ConfigError(field, (d_a, d_b), "both sides in one embedding size: give a "
                          "projector, or taps of the same width")


@LOSSES.register(
    "clip",
    paper="Learning Transferable Visual Models From Natural Language Supervision (CLIP)",
    year=2021,
    inputs="embeddings",
    default_weight=1.0,
    stateful=True,
)
class CLIPLoss(nn.Module):
    """``student=[query_tap, key_tap]`` (e.g. an image tower's and a text tower's
    embedding), no teacher: CLIP's symmetric InfoNCE (module docstring) with a learnable
    temperature (init ``temperature``)."""

    def __init__(self, s_shapes, t_shapes=None, *, num_samples=None,
                 temperature: Pos = 0.07, learn_temperature: bool = True):
        super().__init__()
        _embed_dims_match(*_pair(s_shapes, "clip.student"), "clip.student")
        self.scale = _Scale(temperature)
        self.scale.log_scale.requires_grad_(bool(learn_temperature))

    def forward(self, s, t=None, **_) -> Tensor:
        a, b = s
        return clip_loss(a, b, self.scale())


@LOSSES.register(
    "affinity",
    paper="TinyCLIP: CLIP Distillation via Affinity Mimicking and Weight Inheritance",
    year=2023,
    inputs="embeddings",
    default_weight=1.0,
    stateful=True,
)
class AffinityLoss(nn.Module):
    """``student=[query_tap, key_tap]``, ``teacher=[query_tap, key_tap]``: TinyCLIP's
    affinity mimicking (module docstring). The student's scale is learnable (init
    ``temperature``); the teacher's is ``1 / teacher_temperature`` (CLIP's trained scale is
    100: ``teacher_temperature=0.01``)."""

    def __init__(self, s_shapes, t_shapes, *, num_samples=None,
                 temperature: Pos = 0.07, teacher_temperature: Pos = 0.01):
        super().__init__()
        _embed_dims_match(*_pair(s_shapes, "affinity.student"), "affinity.student")
        _embed_dims_match(*_pair(t_shapes, "affinity.teacher"), "affinity.teacher")
        self.scale = _Scale(temperature)
        self.t_scale = 1.0 / float(teacher_temperature)

    def forward(self, s, t, **_) -> Tensor:
        (s_a, s_b), (t_a, t_b) = s, t
        return affinity_loss(s_a, s_b, t_a, t_b, self.scale(), self.t_scale)
