"""The loss context: what a loss may read besides its two tapped tensors.

``y`` holds the task's targets (class ids, next-token ids, label maps; ``-100`` = none),
``mask`` the positions that count (bool, the logits' leading dims; None = all), ``idx`` the
sample ids, ``batch`` the whole batch (for a method's own stateful loss). A loss asks for
``y``, ``mask`` or ``idx`` by naming them as keyword-only parameters; nothing else reaches it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .errors import ConfigError


@dataclass
class Context:
    y: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    idx: torch.Tensor | None = None
    batch: Mapping | None = None


def masked_mean(
    value: torch.Tensor, mask: torch.Tensor | None, field: str = "term"
) -> torch.Tensor:
    """Mean of per-position ``value`` over ``mask`` (True = counts); 0 when nothing counts.

    A mask with more dims than the value (per-token mask, per-sample loss) keeps a sample
    if any of its positions counts. No host sync (GPU-friendly)."""
    if mask is None:
        return value.mean()
    if mask.shape != value.shape:
        if mask.shape[: value.dim()] == value.shape:
            mask = mask.flatten(value.dim()).any(-1)
        else:
            raise ConfigError(
                field,
                f"values {tuple(value.shape)} vs mask {tuple(mask.shape)}",
                "a loss's per-position values must have the mask's shape (or its leading dims)",
            )
    if mask.device != value.device:
        mask = mask.to(value.device)
    return torch.where(mask, value, 0.0).sum() / mask.sum().clamp_min(1)
