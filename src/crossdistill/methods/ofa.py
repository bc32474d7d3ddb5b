"""OFA-KD recipe: exit branches on student stages that project features into logit space.

Paper: Hao et al., "One-for-All: Bridge the Gap Between Heterogeneous Architectures in
Knowledge Distillation", NeurIPS 2023 (code: Hao840/OFAKD). The maths is the ``ofa`` loss
(``losses/hetero.py``, Eq. 5); this file builds the branches and wires the terms.
"""

from __future__ import annotations

import math

from torch import nn

from ..distiller import Term
from ..errors import ConfigError
from ..models.vit import Block, FeedForward
from ..registry import METHODS
from ..schema import Depth, NonNeg, Temperature
from . import Recipe


class _TokenMLPBlock(nn.Module):
    """Pre-norm residual channel MLP (the Mixer-style block of an MLP student's branch)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, 2 * dim)

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class OFABranch(nn.Module):
    """Exit branch: a student stage feature -> class logits (OFA Sec. 3.2).

    * map (C, H, W): ``depth`` depth-wise separable conv blocks (3x3 depth-wise, 1x1
      point-wise, BN, ReLU; the first one strided when the map is larger than 4x4) +
      global average pool + linear, as the official CNN branches;
    * tokens (N, D): one transformer block (``kind="vit"``) or residual MLP block
      (``kind="mlp"``, for Mixer students) + LayerNorm + token mean + linear;
    * vector (D,): LayerNorm + 2-layer MLP.
    """

    def __init__(self, s_shape, t_shape, *, kind: str = "auto", depth: int = 2):
        super().__init__()
        if len(t_shape) != 1:
            raise ConfigError("ofa.branch", t_shape, "the teacher side must be logits (K,)")
        k = t_shape[0]
        if len(s_shape) == 3:
            c = s_shape[0]
            width = max(c, 32)
            layers, cin = [], c
            for i in range(depth):
                stride = 2 if (i == 0 and min(s_shape[1:]) > 4) else 1
                layers += [
                    nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False),
                    nn.BatchNorm2d(cin),
                    nn.Conv2d(cin, width, 1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
                cin = width
            self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.head = nn.Linear(width, k)
        elif len(s_shape) == 2:
            d = s_shape[1]
            block = Block(d, math.gcd(d, 4), 2.0) if kind in ("vit", "auto") else _TokenMLPBlock(d)
            self.body = nn.Sequential(block, nn.LayerNorm(d))
            self.head = nn.Linear(d, k)
        elif len(s_shape) == 1:
            d = s_shape[0]
            self.body = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU())
            self.head = nn.Linear(d, k)
        else:
            raise ConfigError("ofa.branch", s_shape, "a (C,H,W) map, (N,D) tokens or (D,) vector")
        self.tokens = len(s_shape) == 2

    def forward(self, x):
        h = self.body(x)
        if self.tokens:
            h = h.mean(1)
        return self.head(h)


@METHODS.register(
    "ofa",
    paper="One-for-All: Bridge the Gap Between Heterogeneous Architectures in Knowledge "
    "Distillation",
    year=2023,
    family="heterogeneous",
)
def ofa(
    student,
    teacher,
    *,
    gamma: NonNeg = 1.5,
    temperature: Temperature = 1.0,
    stages: list[str] | None = None,
    branch_weight: NonNeg = 1.0,
    weight: NonNeg = 1.0,
    branch_depth: Depth = 2,
) -> Recipe:
    """CE(z_s, y) + OFA(z_s, z_t) + sum over branches OFA(branch_k(F_k), z_t).

    Branches go on every student stage except the last (whose feature already feeds the
    student's own head, which the final-logit term trains), as in the official code.
    ``gamma`` is the target-enhancement exponent (official ``ofa-eps``; the paper uses 1-1.6,
    our default 1.5), T=1, every weight 1.
    """
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or gamma < 1:
        raise ConfigError("method.gamma", gamma, "a number >= 1")
    if stages is None:
        stages = list(getattr(student, "stages", []))[:-1]
    kind = "mlp" if getattr(student, "family", "") in ("mixer", "mlp") else "vit"
    terms = [Term("ce"), Term("ofa", gamma=gamma, temperature=temperature, weight=weight)]
    for i, st in enumerate(stages):
        terms.append(
            Term(
                "ofa",
                student=st,
                teacher="logits",
                projector=OFABranch,
                projector_params={"kind": kind, "depth": branch_depth},
                gamma=gamma,
                temperature=temperature,
                weight=branch_weight,
                name=f"ofa_branch{i}",
            )
        )
    return Recipe(terms, note=f"OFA exits on {stages}")
