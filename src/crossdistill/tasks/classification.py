"""Classification: accuracy and cross-entropy over labelled samples (label -100 = none)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import TASKS
from .base import Task, valid_targets


@TASKS.register("classification", description="accuracy and CE; selects on val accuracy")
class Classification(Task):
    name = "classification"
    select, mode = "acc", "max"
    train_metrics = ("acc",)
    columns = (("acc", "accuracy"), ("loss", "CE"))

    def __init__(self, target: str = "y", inputs=None, views: dict | None = None):
        self.target = target
        self.inputs = inputs if inputs is not None else ["x"]
        self.views = _views(views)

    def update(self, sums, logits, batch, keep=None, out=None):
        y = batch[self.target]
        if y.device != logits.device:
            y = y.to(logits.device)
        ok = valid_targets(y, keep)
        z = logits.detach().float()
        hit = z.argmax(-1) == y  # never true where y == -100 (argmax >= 0)
        if keep is not None:
            hit = hit & ok
        self.add(sums, "correct", hit.sum(dtype=torch.float32))  # exact below 2**24
        self.add(sums, "labelled", ok.sum(dtype=torch.float32))
        if keep is not None:  # evaluation: CE too (the training loop has its own loss sums)
            ce = F.cross_entropy(
                z.reshape(-1, z.shape[-1]), y.reshape(-1).clamp_min(0), reduction="none"
            )
            self.add(sums, "ce", (ce * ok.reshape(-1)).sum())

    def compute(self, sums):
        n = max(sums.get("labelled", 0.0), 1.0)
        out = {"acc": sums.get("correct", 0.0) / n}
        if "ce" in sums:
            out["loss"] = sums["ce"] / n
        out["n"] = int(sums.get("labelled", 0.0))
        return out


def _views(views) -> dict[str, list[str]]:
    """Evaluation views: ``{name: [batch keys to zero]}`` (a missing modality at test time);
    each view's metrics are reported as ``<name>_<metric>`` beside the full-input ones."""
    from ..errors import ConfigError

    out = {}
    for name, zero in (views or {}).items():
        keys = zero.get("zero") if isinstance(zero, dict) else zero
        if isinstance(keys, str):
            keys = [keys]
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ConfigError(f"task.views.{name}", zero, "a list of batch keys to zero")
        out[str(name)] = keys
    return out
