"""A selective state-space (Mamba-style) scan in plain PyTorch, and a cross-modal fusion
model built on it.

Selective scan (Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State
Spaces", 2023, Algorithm 2 and Eqs. 2a-2b, 4): per channel ``d`` a diagonal state of size
``N`` evolves over the tokens ``t`` as

    h_t = exp(Delta_t A) * h_{t-1} + (Delta_t B_t) x_t,        y_t = C_t . h_t + D x_t,

with ``A = -exp(A_log)`` (diagonal, negative: a stable decay), and ``Delta`` (softplus of a
low-rank projection), ``B`` and ``C`` functions of the input token: the "selection" that
lets the state keep or forget per token. ``A_bar = exp(Delta A)`` is the zero-order-hold
discretisation of A; ``B_bar = Delta B`` is Mamba's simplified (Euler) one for B. The scan
here is the sequential recurrence (O(L) steps, no fused kernel), exact and differentiable,
fine for the tens of tokens of the toy models.

A Mamba block (Fig. 3 of the paper): ``in_proj`` to two branches; the main one passes a
causal depthwise conv and SiLU into the selective SSM, the other is the gate: ``y *
SiLU(z)``; ``out_proj`` back to the model width; pre-norm residual around it.

``fusion-ssm`` is in the spirit of CSFMamba ("CSFMamba: Cross State Fusion Mamba Operator
for Multimodal Remote Sensing Image Classification", 2025): CNN stems turn
the image and the log-mel into token grids, the tokens of the two modalities are
interleaved (or concatenated) into one sequence, so one scan state carries both
modalities, and selective-scan blocks fuse them before pooling and the head. Ours, not the
paper's: the stems, the interleaving and a single shared state (CSFMamba's cross-state
module mixes two modality streams inside the operator on HSI + LiDAR).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import MODELS
from ..schema import Count, Depth, ImgSize, Width
from .cnn import conv_bn_relu
from .fusion import present_mask
from .mlp import check_common, check_positive, spaced_indices, tag, to_hw


def selective_scan(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None
) -> Tensor:
    """The selective scan: ``u``, ``delta`` ``(batch, L, d)``; ``A`` ``(d, N)``; ``B``, ``C``
    ``(batch, L, N)``; ``D`` ``(d,)`` or None. Returns ``y`` ``(batch, L, d)`` with
    ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t`` (``h_0 = 0``) and
    ``y_t = <C_t, h_t> + D u_t``, computed sequentially over ``L``."""
    dA = torch.exp(delta[..., None] * A)  # (b, L, d, N): A_bar
    dBu = delta[..., None] * B[:, :, None, :] * u[..., None]  # (b, L, d, N): B_bar x
    h = u.new_zeros(u.shape[0], u.shape[2], A.shape[1])
    ys = []
    for t in range(u.shape[1]):
        h = dA[:, t] * h + dBu[:, t]
        ys.append((h * C[:, t, None, :]).sum(-1))
    y = torch.stack(ys, 1)
    return y if D is None else y + u * D


class SelectiveSSM(nn.Module):
    """The input-dependent SSM of one Mamba block on ``(batch, L, d)``: ``x_proj`` gives the
    low-rank ``Delta`` input, ``B`` and ``C`` per token; ``dt_proj`` + softplus gives
    ``Delta`` per channel. Initialisation as in Mamba: ``A_log = log(1..N)`` per channel
    (S4D-real), ``D = 1``, ``dt_proj`` bias = softplus^-1 of ``Delta`` drawn log-uniformly
    in [0.001, 0.1]."""

    def __init__(self, d: int, state: int, dt_rank: int):
        super().__init__()
        self.state, self.dt_rank = state, dt_rank
        self.x_proj = nn.Linear(d, dt_rank + 2 * state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d)
        nn.init.uniform_(self.dt_proj.weight, -(dt_rank**-0.5), dt_rank**-0.5)
        dt = torch.exp(torch.rand(d) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, state + 1).float()).repeat(d, 1))
        self.D = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.state, self.state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))
        return selective_scan(x, delta, -torch.exp(self.A_log), B, C, self.D)


class MambaBlock(nn.Module):
    """``x + out_proj(SSM(SiLU(conv(in_x))) * SiLU(z))`` with ``(in_x, z) = in_proj(norm(x))``;
    the conv is causal and depthwise (kernel ``conv``)."""

    def __init__(self, dim: int, state: int = 8, expand: int = 2, conv: int = 4):
        super().__init__()
        inner = expand * dim
        self.norm = nn.LayerNorm(dim)
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.conv = nn.Conv1d(inner, inner, conv, groups=inner, padding=conv - 1)
        self.ssm = SelectiveSSM(inner, state, max(1, math.ceil(dim / 16)))
        self.out_proj = nn.Linear(inner, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        L = x.shape[1]
        u, z = self.in_proj(self.norm(x)).chunk(2, dim=-1)
        u = self.conv(u.transpose(1, 2))[..., :L].transpose(1, 2)  # causal: drop the tail
        y = self.ssm(F.silu(u)) * F.silu(z)
        return x + self.out_proj(y)


class TokenStem(nn.Module):
    """One modality into ``grid`` tokens of size ``dim``: conv-BN-ReLU with a 2x2 max pool,
    conv-BN-ReLU, adaptive average pool to ``grid``, a 1x1 conv to ``dim``, flattened to
    ``(batch, gh * gw, dim)``, plus a learned position embedding and modality embedding."""

    def __init__(self, in_channels: int, width: int, dim: int, grid: tuple[int, int]):
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn_relu(in_channels, width),
            nn.MaxPool2d(2),
            *conv_bn_relu(width, 2 * width),
            nn.AdaptiveAvgPool2d(grid),
            nn.Conv2d(2 * width, dim, 1),
        )
        self.pos = nn.Parameter(torch.randn(grid[0] * grid[1], dim) * 0.02)
        self.modality = nn.Parameter(torch.randn(dim) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x).flatten(2).transpose(1, 2) + self.pos + self.modality


class SSMFusion(nn.Module):
    """image_stem, audio_stem -> tokens interleaved (i1, a1, i2, a2, ...) or concatenated ->
    blocks (Mamba) -> norm -> mean over the present modalities' tokens -> fc.

    A modality whose input is all zeros (or None) for a sample is missing: its tokens enter
    the scan as zeros and are left out of the pooled mean."""

    def __init__(self, num_classes, in_channels, width, dim, depth, state, grid, order):
        super().__init__()
        self.grid, self.dim, self.order = grid, dim, order
        self.image_stem = TokenStem(in_channels, width, dim, grid)
        self.audio_stem = TokenStem(1, width, dim, grid)
        self.blocks = nn.Sequential(*[MambaBlock(dim, state) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def _tokens(self, x: Tensor | None, stem: nn.Module, n: int, ref: Tensor):
        if x is None:
            b = ref.shape[0]
            none = torch.zeros(b, dtype=torch.bool, device=ref.device)
            return ref.new_zeros(b, n, self.dim), none
        present = present_mask(x)
        return stem(x) * present.to(x.dtype)[:, None, None], present

    def forward(self, image: Tensor | None = None, audio: Tensor | None = None) -> Tensor:
        if image is None and audio is None:
            raise ConfigError("inputs", None, "give an image, an audio input or both")
        ref = image if image is not None else audio
        n = self.grid[0] * self.grid[1]
        ti, pi = self._tokens(image, self.image_stem, n, ref)
        ta, pa = self._tokens(audio, self.audio_stem, n, ref)
        if self.order == "interleave":
            tokens = torch.stack([ti, ta], 2).flatten(1, 2)  # (B, 2n, dim): i1 a1 i2 a2 ...
            weight = torch.stack([pi, pa], 1)[:, None, :].expand(-1, n, -1)  # (B, n, 2)
            weight = weight.reshape(ref.shape[0], 2 * n)
        else:
            tokens = torch.cat([ti, ta], 1)  # (B, 2n, dim): all image tokens, then audio
            weight = torch.cat([pi[:, None].expand(-1, n), pa[:, None].expand(-1, n)], 1)
        h = self.norm(self.blocks(tokens))
        w = weight.to(h.dtype)[..., None]
        pooled = (h * w).sum(1) / w.sum(1).clamp_min(1.0)
        return self.fc(pooled)


ORDERS = ("interleave", "concat")


@MODELS.register(
    "fusion-ssm",
    family="fusion",
    description="image+audio CNN stems -> interleaved tokens -> Mamba selective-scan blocks "
    "(width=8, dim=32, depth=2, state=8, grid=(4, 4))",
    paper="CSFMamba: Cross State Fusion Mamba Operator for Multimodal Remote Sensing Image "
    "Classification, 2025 (scan: Gu & Dao, Mamba: Linear-Time Sequence Modeling with "
    "Selective State Spaces, 2023)",
)
def fusion_ssm(
    *,
    num_classes: Count = 10,
    in_channels: Width = 1,
    img_size: ImgSize | tuple[ImgSize, ImgSize] | None = None,
    width: Width = 8,
    dim: Width = 32,
    depth: Depth = 2,
    state: Width = 8,
    grid: ImgSize | tuple[ImgSize, ImgSize] = (4, 4),
    order: str = "interleave",
) -> nn.Module:
    """Selective-scan fusion of an image ``(B, in_channels, H, W)`` and a log-mel
    ``(B, 1, n_mels, frames)`` of any sizes: each becomes ``grid`` tokens of size ``dim``,
    ``order`` = ``interleave`` (default: the scan alternates modalities, so each state update
    sees both) or ``concat`` (image tokens, then audio). ``img_size`` is accepted (and only
    checked) for the builder."""
    check_common(num_classes, in_channels)
    if img_size is not None:
        to_hw(img_size)
    for name, v in (("width", width), ("dim", dim), ("depth", depth), ("state", state)):
        check_positive(name, v)
    hw = to_hw(grid, "grid")
    if order not in ORDERS:
        raise ConfigError("order", order, f"allowed: {', '.join(ORDERS)}")
    model = SSMFusion(num_classes, in_channels, width, dim, depth, state, hw, order)
    stages = [f"blocks.{i}" for i in spaced_indices(depth)]
    return tag(model, family="fusion", stages=stages, feature_path="fc")
