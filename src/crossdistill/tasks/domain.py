"""Domain adaptation: train on the labelled source domain, judge on the target domain.

A model reading paired batches (``source``, ``target``; e.g. the ``mnist_digits`` data)
is scored twice per evaluation: on the source images with their labels (``acc``, ``loss``)
and, through a :class:`~crossdistill.tasks.classification.ReplaceView` that feeds the target
images and labels in their place, on the target domain (``target_acc``, ``target_loss``).
Validation selects on ``target_acc`` by default: labelled target validation data, the usual
(optimistic) protocol of small adaptation benchmarks; ``select="source"`` selects on the
source validation accuracy instead (no target label is read before the test).
"""

from __future__ import annotations

from ..errors import ConfigError
from ..registry import TASKS
from .classification import Classification, ReplaceView


@TASKS.register(
    "domain_adaptation",
    description="source accuracy and target accuracy (a view); selects on val target_acc",
)
class DomainAdaptation(Classification):
    name = "domain_adaptation"
    columns = (("target_acc", "target accuracy"), ("acc", "source accuracy"), ("loss", "CE"))

    def __init__(
        self,
        source: str = "source",
        target: str = "target",
        y: str = "y",
        target_y: str = "target_y",
        select: str = "target",
        inputs=None,
        views: dict | None = None,
    ):
        if select not in ("target", "source"):
            raise ConfigError("task.select", select, "target or source")
        keys = {"source": source, "target": target, "y": y, "target_y": target_y}
        for f, k in keys.items():
            if not isinstance(k, str) or not k:
                raise ConfigError(f"task.{f}", k, "a batch key")
        super().__init__(
            target=y, inputs=inputs if inputs is not None else {"source": source, "target": target},
            views=views,
        )
        self.views = {"target": ReplaceView("target", {source: target, y: target_y}), **self.views}
        self.select = "target_acc" if select == "target" else "acc"
