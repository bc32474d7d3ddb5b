"""Learning-rate schedules as pure functions of the global step (so resume needs no state)."""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "step", "constant")


def lr_at(
    step: int,
    total: int,
    *,
    base: float,
    schedule: str = "cosine",
    warmup: int = 0,
    milestones: tuple[float, ...] = (0.5, 0.75),
    gamma: float = 0.1,
    min_lr: float = 0.0,
    unit: int = 1,
) -> float:
    """Learning rate at optimizer ``step`` of ``total``: linear warm-up (per step), then
    cosine, step or constant.

    ``milestones`` are fractions of training after which the step schedule multiplies by
    ``gamma``; ``min_lr`` floors the cosine and step schedules. ``unit`` > 1 (the steps of one
    epoch, for ``schedule_unit: epoch``) holds the decay at its value from the start of each
    block of ``unit`` steps, as per-epoch schedulers do; ``unit=1`` is the per-step schedule.
    """
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    at = step if unit <= 1 else step - step % unit
    progress = (at - warmup) / max(1, total - warmup)
    if unit > 1:
        progress = max(0.0, progress)
    if schedule == "cosine":
        return min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "step":
        return max(min_lr, base * gamma ** sum(progress >= m for m in milestones))
    raise ValueError(f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
