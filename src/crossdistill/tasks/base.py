"""The Task interface (see the package docstring)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..data.dataset import IGNORE_INDEX
from ..errors import ConfigError
from ..registry import TASKS


class Task:
    """Base task. Subclasses set the class attributes and implement ``update``/``compute``."""

    name = "task"
    target = "y"  # the batch key of the targets
    inputs: list | dict = ["x"]  # default model inputs (a ModelIO's ``inputs``)
    class_dim: int | None = None  # where models keep the class axis (None: last)
    select = "loss"  # the validation metric that picks the best epoch
    mode = "min"  # "max" or "min"
    train_metrics: tuple[str, ...] = ()  # metrics also reported on the training batches
    columns: tuple[tuple[str, str], ...] = ()  # (metric, label) shown in reports
    views: dict = {}  # evaluation views: name -> callable(batch) -> batch (classification.View)

    def default_terms(self) -> list:
        from ..distiller import Term

        return [Term("ce")]

    def for_io(self, io) -> Task:
        """The task for a model called through adapter ``io`` (this one, unless a task scores
        models that read their own keys differently, e.g. a teacher with its own tokens)."""
        return self

    def check_batch(self, batch: Mapping) -> None:
        """Raise a ConfigError if ``batch`` lacks a key the task reads (first batch)."""

    def check_split(self, data, name: str) -> None:
        """Raise a ConfigError if split ``name`` (train, val or test) cannot be used or
        scored, before training (a retrieval gallery smaller than k, boxes off the image)."""

    def targets(self, batch: Mapping) -> torch.Tensor | None:
        return batch.get(self.target)

    def loss_mask(self, batch: Mapping) -> torch.Tensor | None:
        """Positions distillation terms average over (None: all)."""
        return None

    def update(self, sums: dict, logits: torch.Tensor, batch: Mapping, keep=None, out=None) -> None:
        raise NotImplementedError

    def compute(self, sums: Mapping[str, float]) -> dict[str, float]:
        raise NotImplementedError

    def better(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value > best if self.mode == "max" else value < best

    @staticmethod
    def add(sums: dict, key: str, value: torch.Tensor) -> None:
        sums[key] = sums[key] + value if key in sums else value

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target={self.target!r}, select={self.select}/{self.mode})"


def valid_targets(y: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Positions with a target (not ``-100``), restricted to ``keep`` (rows) if given."""
    ok = y != IGNORE_INDEX
    if keep is not None:
        ok = ok & keep.view(-1, *[1] * (ok.dim() - 1)).to(ok.device)
    return ok


def build(spec, field: str = "task") -> Task:
    """A Task from an instance, a registered name, or ``{"name": ..., **params}``."""
    if isinstance(spec, Task):
        return spec
    if spec is None:
        spec = "classification"
    params = {}
    if isinstance(spec, Mapping):
        params = {k: v for k, v in spec.items() if k != "name"}
        spec = spec.get("name", "classification")
    cls = TASKS.get(spec, f"{field}.name")
    try:
        return cls(**params)
    except TypeError as err:
        raise ConfigError(field, params, f"bad parameters for task {spec!r} ({err})") from None
