"""Projectors: trainable bridges from a student feature's shape to a teacher's.

Shapes are per-sample (no batch dim): ``(D,)`` vectors, ``(N, D)`` token sequences,
``(C, H, W)`` feature maps. ``build("auto", s_shape, t_shape)`` picks a projector from the
two shapes found in one dry run; shapes no projector can bridge fail before training.
Projectors are trained with the student and never exported with it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .registry import PROJECTORS
from .schema import Width

Shape = tuple[int, ...]


def grid_of(n_tokens: int) -> tuple[int, bool] | None:
    """Side of the square patch grid for ``n_tokens`` and whether a leading cls token exists."""
    side = math.isqrt(n_tokens)
    if side * side == n_tokens:
        return side, False
    side = math.isqrt(n_tokens - 1)
    if n_tokens > 1 and side * side == n_tokens - 1:
        return side, True
    return None


def tokens_to_map(x: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> (B, D, h, w), dropping a leading cls token when N = h*w + 1."""
    g = grid_of(x.shape[1])
    if g is None:
        raise ValueError(f"{x.shape[1]} tokens do not form a square grid")
    side, has_cls = g
    if has_cls:
        x = x[:, 1:]
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)


def resize_map(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Average-pool down, bilinear up: the conventional choice for feature hints."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@PROJECTORS.register("identity")
class Identity(nn.Module):
    def __init__(self, s_shape: Shape, t_shape: Shape):
        super().__init__()
        if tuple(s_shape) != tuple(t_shape):
            raise ConfigError("projector", "identity", f"shapes differ: {s_shape} vs {t_shape}")

    def forward(self, x):
        return x


@PROJECTORS.register("linear")
class Linear(nn.Module):
    """Linear map on the last dim: (D_s,) -> (D_t,) or tokens (N, D_s) -> (N, D_t)."""

    def __init__(self, s_shape: Shape, t_shape: Shape):
        super().__init__()
        if (
            len(s_shape) != len(t_shape)
            or len(s_shape) not in (1, 2)
            or s_shape[:-1] != t_shape[:-1]
        ):
            raise ConfigError(
                "projector",
                "linear",
                f"needs vectors or equal-length tokens, got {s_shape} -> {t_shape}",
            )
        self.proj = nn.Linear(s_shape[-1], t_shape[-1])

    def forward(self, x):
        return self.proj(x)


@PROJECTORS.register("mlp")
class MLP(nn.Module):
    """Two-layer MLP on the last dim (flattening everything else per sample)."""

    def __init__(self, s_shape: Shape, t_shape: Shape, hidden: Width | None = None):
        super().__init__()
        d_in, d_out = math.prod(s_shape), math.prod(t_shape)
        hidden = hidden or max(d_out, 64)
        self.t_shape = tuple(t_shape)
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))

    def forward(self, x):
        return self.net(x.flatten(1)).view(x.shape[0], *self.t_shape)


@PROJECTORS.register("conv1x1")
class Conv1x1(nn.Module):
    """1x1 conv + BN (as in FitNets-style hint regressors), resized to the teacher's map."""

    def __init__(self, s_shape: Shape, t_shape: Shape):
        super().__init__()
        if len(s_shape) != 3 or len(t_shape) != 3:
            raise ConfigError(
                "projector", "conv1x1", f"needs two (C,H,W) maps, got {s_shape} -> {t_shape}"
            )
        self.size = tuple(t_shape[1:])
        self.proj = nn.Sequential(
            nn.Conv2d(s_shape[0], t_shape[0], 1, bias=False), nn.BatchNorm2d(t_shape[0])
        )

    def forward(self, x):
        return self.proj(resize_map(x, self.size))


@PROJECTORS.register("tokens_to_map")
class TokensToMap(nn.Module):
    """Student tokens (N, D) -> teacher map (C, H, W): grid reshape, 1x1 conv, resize."""

    def __init__(self, s_shape: Shape, t_shape: Shape):
        super().__init__()
        if len(s_shape) != 2 or len(t_shape) != 3 or grid_of(s_shape[0]) is None:
            raise ConfigError(
                "projector",
                "tokens_to_map",
                f"needs square-grid tokens (N,D) -> (C,H,W), got {s_shape} -> {t_shape}",
            )
        self.size = tuple(t_shape[1:])
        self.proj = Conv1x1((s_shape[1], 1, 1), (t_shape[0], 1, 1)).proj

    def forward(self, x):
        return self.proj(resize_map(tokens_to_map(x), self.size))


@PROJECTORS.register("map_to_tokens")
class MapToTokens(nn.Module):
    """Student map (C, H, W) -> teacher tokens (N, D); a teacher cls token is matched by the
    student's pooled feature, so every teacher token has a partner."""

    def __init__(self, s_shape: Shape, t_shape: Shape):
        super().__init__()
        g = grid_of(t_shape[0]) if len(t_shape) == 2 else None
        if len(s_shape) != 3 or g is None:
            raise ConfigError(
                "projector",
                "map_to_tokens",
                f"needs (C,H,W) -> square-grid tokens (N,D), got {s_shape} -> {t_shape}",
            )
        self.side, self.cls = g
        self.proj = nn.Conv2d(s_shape[0], t_shape[1], 1)
        self.norm = nn.LayerNorm(t_shape[1])

    def forward(self, x):
        y = self.proj(resize_map(x, (self.side, self.side)))
        tokens = y.flatten(2).transpose(1, 2)
        if self.cls:
            tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)
        return self.norm(tokens)


@PROJECTORS.register("tokens")
class TokensToTokens(nn.Module):
    """Tokens (N_s, D_s) -> tokens (N_t, D_t): linear on D, grid resampling when N differs."""

    def __init__(self, s_shape: Shape, t_shape: Shape):
        super().__init__()
        if len(s_shape) != 2 or len(t_shape) != 2:
            raise ConfigError(
                "projector", "tokens", f"needs (N,D) -> (N,D), got {s_shape} -> {t_shape}"
            )
        self.resample = None
        if s_shape[0] != t_shape[0]:
            gs, gt = grid_of(s_shape[0]), grid_of(t_shape[0])
            if gs is None or gt is None:
                raise ConfigError(
                    "projector",
                    "tokens",
                    f"token counts {s_shape[0]} and {t_shape[0]} are not square grids",
                )
            self.resample = (gt[0], gt[1])
        self.proj = nn.Linear(s_shape[1], t_shape[1])

    def forward(self, x):
        x = self.proj(x)
        if self.resample is not None:
            side, cls = self.resample
            pooled = x.mean(1, keepdim=True)
            x = resize_map(tokens_to_map(x), (side, side)).flatten(2).transpose(1, 2)
            if cls:
                x = torch.cat([pooled, x], dim=1)
        return x


@PROJECTORS.register("pool")
class Pool(nn.Module):
    """Any feature -> a vector: global average pool (maps) or token mean, then linear."""

    def __init__(self, s_shape: Shape, t_shape: Shape):
        super().__init__()
        if len(t_shape) != 1:
            raise ConfigError("projector", "pool", f"teacher side must be a vector, got {t_shape}")
        d_in = s_shape[0] if len(s_shape) == 3 else s_shape[-1]
        self.proj = nn.Linear(d_in, t_shape[0])

    def forward(self, x):
        if x.dim() == 4:
            x = x.mean((2, 3))
        elif x.dim() == 3:
            x = x.mean(1)
        return self.proj(x)


def choose(s_shape: Shape, t_shape: Shape) -> str:
    """The projector ``"auto"`` resolves to for these per-sample shapes."""
    s, t = tuple(s_shape), tuple(t_shape)
    if s == t:
        return "identity"
    if len(t) == 1:
        return "linear" if len(s) == 1 else "pool"
    if len(s) == 3 and len(t) == 3:
        return "conv1x1"
    if len(s) == 2 and len(t) == 3 and grid_of(s[0]):
        return "tokens_to_map"
    if len(s) == 3 and len(t) == 2 and grid_of(t[0]):
        return "map_to_tokens"
    if len(s) == 2 and len(t) == 2:
        return "linear" if s[0] == t[0] else "tokens"
    raise ConfigError(
        "projector",
        "auto",
        f"no projector can bridge student shape {s} to teacher "
        f"shape {t}; tap a feature map (C,H,W), tokens (N,D) or a vector (D,)",
    )


def build(
    name: str, s_shape: Shape, t_shape: Shape, field: str = "projector", **params
) -> nn.Module:
    if name == "auto":
        name = choose(s_shape, t_shape)
    cls = PROJECTORS.get(name, field)
    try:
        return cls(tuple(s_shape), tuple(t_shape), **params)
    except TypeError as err:
        raise ConfigError(field, params, f"bad projector parameters for {name!r}: {err}") from None
