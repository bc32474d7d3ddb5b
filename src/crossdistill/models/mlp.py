"""Multi-layer perceptron, plus the small helpers every model module in this package shares.

The MLP is the weakest, most architecture-agnostic student: it sees the image as a flat
vector, so it is the natural extreme for cross-architecture distillation. Paper: Rumelhart,
Hinton & Williams, "Learning representations by back-propagating errors" (1986).

The helpers live here because this is the base module the others already depend on; they
normalise ``img_size`` and validate shared arguments so every factory fails the same way.
"""

from __future__ import annotations

import inspect
import math

from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import MODELS
from ..schema import Count, ImgSize, Prob, Width


def to_hw(img_size, field: str = "img_size") -> tuple[int, int]:
    """``img_size`` as ``(H, W)``; accepts an int (square) or a pair of positive ints."""
    if isinstance(img_size, bool):
        raise ConfigError(field, img_size, "an int or an (H, W) pair of positive ints")
    if isinstance(img_size, int):
        hw = (img_size, img_size)
    elif isinstance(img_size, (tuple, list)) and len(img_size) == 2:
        hw = tuple(img_size)
    else:
        raise ConfigError(field, img_size, "an int or an (H, W) pair of positive ints")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in hw):
        raise ConfigError(field, img_size, "an int or an (H, W) pair of positive ints")
    return hw  # type: ignore[return-value]


def check_positive(field: str, value, what: str = "a positive int") -> int:
    """Reject zero, negative and non-integer sizes before they become shape errors."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(field, value, what)
    return value


def check_common(num_classes, in_channels) -> None:
    check_positive("num_classes", num_classes)
    check_positive("in_channels", in_channels)


def spaced_indices(n: int, k: int = 3) -> list[int]:
    """About ``k`` evenly spaced indices into ``range(n)``, always including the last one."""
    k = min(k, n)
    return sorted({math.ceil((i + 1) * n / k) - 1 for i in range(k)})


def tag(model: nn.Module, *, family: str, stages: list[str], feature_path: str) -> nn.Module:
    """Attach the attributes the rest of the package relies on (taps, exits, features)."""
    model.family = family
    model.stages = list(stages)
    model.feature_path = feature_path
    return model


def replace_head(model: nn.Module, make, field: str) -> nn.Linear:
    """Put ``make(head)`` in place of a zoo classifier's ``feature_path`` Linear and return
    the old head (a projection, an identity for a shared trunk, an anchored head...)."""
    path = getattr(model, "feature_path", None)
    head = model.get_submodule(path) if path else None
    if not isinstance(head, nn.Linear):
        raise ConfigError(field, type(model).__name__,
                          "a zoo model whose feature_path is a Linear classifier")
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, make(head))
    return head


def variant(name: str, base, description: str, **fixed):
    """Register ``base`` under ``name`` with some arguments fixed (and no longer accepted)."""
    sig = inspect.signature(base)
    params = [p for p in sig.parameters.values() if p.name not in fixed]

    def factory(**kwargs):
        return base(**kwargs, **fixed)

    factory.__name__ = factory.__qualname__ = name.replace("-", "_")
    fixed_doc = ", ".join(f"{k}={v!r}" for k, v in fixed.items())
    factory.__doc__ = (
        f"``{base.__name__}`` with {fixed_doc}." if fixed else f"Alias of ``{base.__name__}``."
    )
    factory.__signature__ = sig.replace(parameters=params)
    meta = {k: v for k, v in base.__registry_meta__.items() if k != "name"}
    meta["description"] = description
    return MODELS.register(name, **meta)(factory)


class MLP(nn.Module):
    """Flatten -> hidden blocks (Linear, ReLU, Dropout) -> ``fc``."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], num_classes: int, dropout: float):
        super().__init__()
        self.flatten = nn.Flatten()
        blocks, prev = [], in_features
        for h in hidden:
            blocks.append(
                nn.Sequential(nn.Linear(prev, h), nn.ReLU(inplace=True), nn.Dropout(dropout))
            )
            prev = h
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(prev, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.layers(self.flatten(x)))


@MODELS.register(
    "mlp",
    family="mlp",
    description="flatten + ReLU MLP (hidden=(256, 128))",
    paper="Rumelhart et al., Learning representations by back-propagating errors, 1986",
)
def mlp(
    *,
    num_classes: Count = 10,
    in_channels: Width = 3,
    img_size: ImgSize | tuple[ImgSize, ImgSize] = 32,
    hidden: Width | tuple[Width, ...] = (256, 128),
    dropout: Prob = 0.0,
) -> nn.Module:
    """A flat-vector student; ``hidden`` lists the widths of the hidden layers."""
    check_common(num_classes, in_channels)
    h, w = to_hw(img_size)
    if isinstance(hidden, int):
        hidden = (hidden,)
    if not isinstance(hidden, (tuple, list)) or not hidden:
        raise ConfigError("hidden", hidden, "a non-empty list of positive ints")
    for v in hidden:
        check_positive("hidden", v, "a non-empty list of positive ints")
    if (
        isinstance(dropout, bool)
        or not isinstance(dropout, (int, float))
        or not 0.0 <= dropout < 1.0
    ):
        raise ConfigError("dropout", dropout, "a float in [0, 1)")
    model = MLP(in_channels * h * w, tuple(hidden), num_classes, float(dropout))
    stages = [f"layers.{i}" for i in spaced_indices(len(hidden))]
    return tag(model, family="mlp", stages=stages, feature_path="fc")
