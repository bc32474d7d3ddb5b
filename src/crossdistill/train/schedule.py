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
) -> float:
    """Learning rate at ``step`` of ``total``: linear warm-up, then cosine, step or constant.

    ``milestones`` are fractions of training after which the step schedule multiplies by
    ``gamma``.
    """
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "step":
        return base * gamma ** sum(progress >= m for m in milestones)
    raise ValueError(f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
