"""``l0_budget``: the Lagrangian that drives L0 gates to a target model size.

Wang et al., "Structured Pruning of Large Language Models" (EMNLP 2020), Eq. 7, as used by
CoFi and TinyCLIP's automatic inheritance: with ``g = expected size / full size - target``
(the tap of :class:`crossdistill.models.l0.L0Gates`),

``L = lambda_1 * g + lambda_2 * g^2``,

minimised over the gates and *maximised* over the multipliers ``lambda_1, lambda_2`` (init
0): while the model is too large the multipliers grow and press the gates shut. The ascent
runs through the ordinary optimiser by reversing the multipliers' gradient; each multiplier
is ``lambda_scale * p`` so that it moves at ``lambda_scale`` x the learning rate.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import LOSSES
from ..schema import Pos


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return -grad


def lagrangian(gap: Tensor, lambda_1: Tensor, lambda_2: Tensor) -> Tensor:
    """``lambda_1 * g + lambda_2 * g^2`` (summed over the gap's entries)."""
    return (lambda_1 * gap + lambda_2 * gap.pow(2)).sum()


@LOSSES.register(
    "l0_budget",
    paper="Structured Pruning of Large Language Models (the L0 Lagrangian; TinyCLIP's "
    "automatic inheritance)",
    year=2020,
    inputs="L0 gates' size gap",
    default_weight=1.0,
    stateful=True,
)
class L0Budget(nn.Module):
    """``student=<encoder>.l0`` (the gates' size gap), no teacher."""

    def __init__(self, s_shape, t_shape=None, *, num_samples=None, lambda_scale: Pos = 10.0):
        super().__init__()
        if tuple(s_shape) != (1,):
            raise ConfigError("l0_budget.student", s_shape,
                              "the (1,) size gap of L0 gates (tap <encoder>.l0)")
        self.p = nn.Parameter(torch.zeros(2))
        self.scale = float(lambda_scale)

    def multipliers(self) -> Tensor:
        return self.scale * self.p

    def forward(self, s, t=None, **_) -> Tensor:
        lam = _Reverse.apply(self.multipliers())
        return lagrangian(s.reshape(-1), lam[0], lam[1])
