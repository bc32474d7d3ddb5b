"""The loss context: what a loss may read besides its two tapped tensors.

``y`` holds the task's targets (class ids, next-token ids, label maps; ``-100`` = none),
``mask`` the positions that count (bool, the logits' leading dims; None = all), ``idx`` the
sample ids, ``batch`` the whole batch (keys a loss reads beyond its two taps, e.g. a
cross-tokenizer alignment; the loss's own parameters name which keys). A loss asks for
``y``, ``mask``, ``idx`` or ``batch`` by naming them as keyword-only parameters; nothing
else reaches it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .errors import ConfigError

FIELDS = ("y", "mask", "idx", "batch")  # what a loss may ask for by parameter name
LOSS_CONTEXT = (*FIELDS, "num_samples", "data")  # filled by the distiller, never the config


@dataclass
class Context:
    y: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    idx: torch.Tensor | None = None
    batch: Mapping | None = None
    counts: Mapping[str, torch.Tensor] | None = None  # per term: the divisor (global batch)


def at_dims(mask: torch.Tensor, shape: torch.Size, field: str = "term") -> torch.Tensor:
    """``mask`` for values of ``shape``: itself, or reduced to the values' leading dims (a
    per-token mask and per-sample values keep a sample if any of its positions counts)."""
    if mask.shape == shape:
        return mask
    if mask.shape[: len(shape)] == shape:
        return mask.flatten(len(shape)).any(-1)
    raise ConfigError(
        field,
        f"values {tuple(shape)} vs mask {tuple(mask.shape)}",
        "a loss's per-position values must have the mask's shape (or its leading dims)",
    )


def masked_mean(
    value: torch.Tensor,
    mask: torch.Tensor | None,
    field: str = "term",
    count: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of per-position ``value`` over ``mask`` (True = counts); 0 when nothing counts.

    ``count`` replaces the local number of counted positions as the divisor: the trainer
    passes the valid positions of the whole accumulation window and every process (divided
    by both), so the steps' gradients add up to the mean over the global batch's valid
    tokens (see :meth:`Distiller.token_counts`). No host sync (GPU-friendly)."""
    if mask is None:
        return value.mean() if count is None else value.sum() / count
    mask = at_dims(mask, value.shape, field)
    if mask.device != value.device:
        mask = mask.to(value.device)
    total = torch.where(mask, value, 0.0).sum()
    return total / (mask.sum().clamp_min(1) if count is None else count)
