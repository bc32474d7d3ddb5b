"""ReviewKD: multi-level distillation where each student level also "reviews" deeper levels.

Stateful because the attention-based fusion (ABF) modules that combine levels are trained
together with the student. Inputs are lists of feature maps, shallow to deep.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import LOSSES
from ..schema import Width
from .features import _tokens_to_maps, _upcast

_POOL_SIZES = (4, 2, 1)


def _map_channels(shape: tuple, field: str) -> int:
    """Channel count of the map that a tap with this per-batch shape (B, ...) becomes."""
    probe = torch.empty((1, *tuple(shape)[1:]), device="meta")
    return _as_maps(probe, field).shape[1]


def _as_maps(x: Tensor, field: str) -> Tensor:
    """(B, C, H, W) as is; (B, N, D) tokens -> (B, D, h, w); (B, D) vectors -> (B, D, 1, 1)."""
    if x.dim() == 2:
        return x[:, :, None, None]
    return _tokens_to_maps(x, field)


class _ABF(nn.Module):
    """Attention-based fusion: reduce to mid channels, blend with the deeper level's output
    through a 2-channel spatial attention, resize to the teacher's grid, expand to its width."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, fuse: bool):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_ch, mid_ch, 1, bias=False), nn.BatchNorm2d(mid_ch))
        self.expand = nn.Sequential(
            nn.Conv2d(mid_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch)
        )
        self.attention = nn.Sequential(nn.Conv2d(2 * mid_ch, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)
        nn.init.kaiming_uniform_(self.expand[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None, out_size) -> tuple[Tensor, Tensor]:
        x = self.reduce(x)
        if self.attention is not None:
            residual = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            w = self.attention(torch.cat([x, residual], dim=1))
            x = x * w[:, :1] + residual * w[:, 1:]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.expand(x), x


def _hcl(fs: Tensor, ft: Tensor) -> Tensor:
    """Hierarchical context loss for one level: MSE at full size plus MSE after average
    pooling to 4x4, 2x2, 1x1 (sizes not smaller than the map are skipped), weighted 1, 1/2,
    1/4, ... over the levels used, divided by the sum of the weights used."""
    loss, weight, total = F.mse_loss(fs, ft), 1.0, 1.0
    for size in _POOL_SIZES:
        if size >= min(ft.shape[-2:]):
            continue
        weight /= 2
        pooled = F.mse_loss(F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size))
        loss, total = loss + weight * pooled, total + weight
    return loss / total


@LOSSES.register(
    "reviewkd",
    stateful=True,
    paper="Distilling Knowledge via Knowledge Review",
    year=2021,
    inputs="features",
    default_weight=1.0,
)
class ReviewKDLoss(nn.Module):
    """ReviewKD (Pengguang Chen, Shu Liu, Hengshuang Zhao, Jiaya Jia, CVPR 2021).

    Going from the deepest level to the shallowest, ABF_i turns student map ``S_i`` (fused
    with the residual ``R_{i+1}`` from the level below) into ``Y_i`` with the teacher's channels
    and grid; the loss is ``L = sum_i HCL(Y_i, T_i)``, where
    ``HCL(Y, T) = (MSE(Y, T) + sum_l w_l MSE(pool_l Y, pool_l T)) / (1 + sum_l w_l)`` over the
    pool sizes l in (4, 2, 1) smaller than the map, with ``w_l`` = 1/2, 1/4, 1/8 for the
    successive sizes used (so 1, 0.5, 0.25, 0.125 with the full size, as in the paper's code).

    Shapes: ``s`` and ``t`` are equally long lists, shallow to deep, of (B, C, H, W) maps;
    (B, N, D) tokens are reshaped to square maps (cls token dropped when N-1 is square) and
    (B, D) vectors become 1x1 maps. ``s_shapes``/``t_shapes`` are the per-batch shapes.
    ``mid_channels`` defaults to 64 (the paper's CIFAR value; 256 on ImageNet). Recommended
    term weight 1.0 (mdistiller additionally warms it up linearly over 20 epochs).
    """

    def __init__(
        self,
        s_shapes: list[tuple],
        t_shapes: list[tuple],
        *,
        num_samples: int | None = None,
        mid_channels: Width = 64,
    ):
        super().__init__()
        if not s_shapes or len(s_shapes) != len(t_shapes):
            raise ConfigError(
                "reviewkd.shapes",
                (len(s_shapes), len(t_shapes)),
                "student and teacher need the same, non-zero number of tapped levels",
            )
        if mid_channels < 1:
            raise ConfigError("reviewkd.mid_channels", mid_channels, "must be a positive integer")
        s_ch = [_map_channels(sh, f"reviewkd.s_shapes[{i}]") for i, sh in enumerate(s_shapes)]
        t_ch = [_map_channels(sh, f"reviewkd.t_shapes[{i}]") for i, sh in enumerate(t_shapes)]
        deepest = len(s_ch) - 1
        self.abfs = nn.ModuleList(
            _ABF(sc, mid_channels, tc, fuse=i != deepest)
            for i, (sc, tc) in enumerate(zip(s_ch, t_ch))
        )

    def forward(self, s: list[Tensor], t: list[Tensor], **_) -> Tensor:
        if len(s) != len(self.abfs) or len(t) != len(self.abfs):
            raise ConfigError(
                "reviewkd.inputs",
                (len(s), len(t)),
                f"expected lists of {len(self.abfs)} student and teacher feature maps",
            )
        s = [_as_maps(x, f"reviewkd.student[{i}]") for i, x in enumerate(s)]
        t = [_upcast(_as_maps(x.detach(), f"reviewkd.teacher[{i}]")) for i, x in enumerate(t)]
        outs: list[Tensor] = [None] * len(s)  # type: ignore[list-item]
        residual = None
        for i in reversed(range(len(s))):
            self._check_channels(i, s[i], t[i])
            out, residual = self.abfs[i](s[i], residual, t[i].shape[-2:])
            outs[i] = _upcast(out)
        return sum(_hcl(y, ti.to(y.dtype)) for y, ti in zip(outs, t))

    def _check_channels(self, i: int, s: Tensor, t: Tensor) -> None:
        abf = self.abfs[i]
        want_s, want_t = abf.reduce[0].in_channels, abf.expand[0].out_channels
        if s.shape[1] != want_s or t.shape[1] != want_t:
            raise ConfigError(
                f"reviewkd.inputs[{i}]",
                f"student {tuple(s.shape)} vs teacher {tuple(t.shape)}",
                f"this level was built for {want_s} student and {want_t} teacher channels",
            )
