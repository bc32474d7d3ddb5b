"""Segmentation: a confusion matrix over pixels, mean IoU and pixel accuracy.

Models return ``(B, K, H, W)`` logits (``class_dim=1``, moved last by the adapter); label
maps are ``(B, H, W)`` with -100 for void pixels. mIoU averages IoU over the classes that
occur in the targets or predictions (a class absent from both is not counted).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..registry import TASKS
from .base import Task, valid_targets


@TASKS.register("segmentation", description="confusion matrix, mIoU, pixel accuracy")
class Segmentation(Task):
    name = "segmentation"
    select, mode = "miou", "max"
    train_metrics = ("pixel_acc",)
    columns = (("miou", "mIoU"), ("pixel_acc", "pixel accuracy"))
    class_dim = 1

    def __init__(self, target: str = "seg", inputs=None, num_classes: int | None = None):
        self.target, self.num_classes = target, num_classes
        self.inputs = inputs if inputs is not None else ["image"]

    def check_split(self, data, name: str) -> None:
        """Label maps hold only class ids below the task's class count (or the one a data
        source declares in its ``info``, as the digit canvases do)."""
        k = self.num_classes or getattr(data, "info", {}).get("num_classes")
        y = getattr(data, "tensors", {}).get(self.target)
        if not k or y is None:
            return
        ids = y[y != -100]
        if not ids.numel():
            return
        top, low = int(ids.max()), int(ids.min())
        if top >= k or low < 0:
            bad = top if top >= k else low
            raise ConfigError(f"data.{name}.{self.target}", bad,
                              f"class ids 0..{k - 1} (or -100 for void pixels)")

    def update(self, sums, logits, batch, keep=None, out=None):
        y = batch[self.target].to(logits.device)
        k = logits.shape[-1]
        ok = valid_targets(y, keep)
        pred = logits.detach().argmax(-1)
        cell = (y.clamp_min(0) * k + pred)[ok]
        self.add(sums, "confusion", torch.bincount(cell, minlength=k * k).double().view(k, k))

    def compute(self, sums):
        cm = sums["confusion"]
        cm = cm if torch.is_tensor(cm) else torch.tensor(cm)
        cm = cm.double().cpu()
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        present = union > 0
        iou = tp[present] / union[present]
        return {
            "miou": float(iou.mean()) if present.any() else 0.0,
            "pixel_acc": float(tp.sum() / cm.sum().clamp_min(1)),
            "iou": [float(v) for v in torch.where(present, tp / union.clamp_min(1), 0.0)],
            "n": int(cm.sum()),
        }
