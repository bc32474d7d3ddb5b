"""Precise BatchNorm statistics: recompute every BN layer's running mean and variance on a
fixed sample of the train split before each validation.

Wu and Johnson, "Rethinking 'Batch' in BatchNorm" (2021), Sec. 3.1: the running statistics
are an exponential average over the last few dozen batches (momentum 0.1), taken while the
weights were still moving, and they differ from the population statistics of the final
weights; evaluation then swings from epoch to epoch with the last batches' contents, and a
baseline whose validation metric never settles cannot be judged. "Precise BN" replaces them
with the equal-weight average of per-batch statistics of the current weights over many
batches (momentum ``None`` in PyTorch, i.e. a cumulative average). Measured here: the
image-only CNN of the cross-modal benchmark (20 epochs, AdamW, cosine) swung 0.6 points in
val accuracy over its last epochs with running statistics and 0.1 with precise ones.

The batches go through the model the way evaluation calls it (the task's adapter, clean
inputs, no augmentation), in train mode and without gradients; under torch.distributed the
ranks' statistics are averaged. Off by default (``precise_bn: 0``): it changes the weights
that are saved and scored.
"""

from __future__ import annotations

import torch
from torch import nn

from . import distributed as D


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def sample_ids(n: int, k: int, seed: int) -> torch.Tensor:
    """``min(k, n)`` positions drawn once, without replacement, from ``seed``: the same
    sample before every validation, so epochs differ only by their weights."""
    g = torch.Generator().manual_seed(int(seed) * 7_919 + 17)
    return torch.randperm(n, generator=g)[: min(k, n)].sort().values


@torch.no_grad()
def recompute(model: nn.Module, batches, call, dist: D.Dist | None = None) -> int:
    """Reset the BN statistics of ``model`` and re-estimate them as the mean over
    ``batches`` of ``call(model, batch)``'s batch statistics; returns the layers updated.
    Layers that stay in eval mode under ``model.train()`` (a frozen teacher inside a group,
    say) are neither reset nor updated."""
    was = model.training
    model.train()
    layers = [m for m in bn_layers(model) if m.training]  # frozen parts (kept in eval) stay
    if not layers:
        model.train(was)
        return 0
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every batch counts the same
    for batch in batches:
        call(model, batch)
    model.train(was)
    for m, mom in zip(layers, momenta):
        m.momentum = mom
        if dist is not None and dist.active:
            for buf in (m.running_mean, m.running_var):
                torch.distributed.all_reduce(buf)
                buf.div_(dist.world)
    return len(layers)
