"""Detection: COCO mAP (IoU 0.50:0.95) and mAP@0.5 through pycocotools' ``COCOeval``.

The model's output is one of two head formats (:mod:`crossdistill.boxes`): ``head =
"centernet"`` (a dict with ``logits`` = class heatmap ``(B, K, h, w)``, ``size`` and
``offset`` ``(B, 2, h, w)``; ``stride`` = input pixels per cell, default input / grid) or
``"set"`` (DETR: ``logits (B, Q, K+1)`` with "no object" last, ``boxes (B, Q, 4)``
normalised cxcywh). Detections and ground truth are collected over the split (``cat:``
sums, gathered under DDP) and scored once by pycocotools, the reference COCO evaluator, not a
hand-written one. Targets: ``boxes (B, M, 4)`` xyxy pixels, ``box_labels (B, M)`` (-1 =
padding), image ids from ``idx``; ``classes`` restricts the mean to some classes (the
novel ones of a zero-shot split). The default training term is the head's own loss
(``centernet`` or ``set_loss`` in :mod:`crossdistill.losses.detection`).
"""

from __future__ import annotations

import contextlib
import io as _io

import torch

from ..errors import ConfigError
from ..registry import TASKS
from .base import Task

HEADS = ("centernet", "set")


def coco_map(gt: torch.Tensor, dets: torch.Tensor, hw: tuple[int, int],
             num_classes: int, classes: list[int] | None = None) -> dict[str, float]:
    """COCO mAP and mAP@0.5 of detections ``dets (D, 7)`` = (image, x1, y1, x2, y2, score,
    class) against ``gt (G, 6)`` = (image, x1, y1, x2, y2, class), by pycocotools; averaged
    over ``classes`` only when given (e.g. the novel classes of a zero-shot split)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, dets = gt.double().cpu(), dets.double().cpu()
    ids = sorted({int(i) for i in gt[:, 0].tolist()} | {int(i) for i in dets[:, 0].tolist()})
    if len(gt) == 0:
        return {"map": 0.0, "map50": 0.0, "map75": 0.0}
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "height": hw[0], "width": hw[1]} for i in ids],
        "annotations": [
            {"id": k + 1, "image_id": int(r[0]), "category_id": int(r[5]),
             "bbox": [float(r[1]), float(r[2]), float(r[3] - r[1]), float(r[4] - r[2])],
             "area": float((r[3] - r[1]) * (r[4] - r[2])), "iscrowd": 0}
            for k, r in enumerate(gt)
        ],
        "categories": [{"id": c, "name": str(c)} for c in range(num_classes)],
    }
    quiet = contextlib.redirect_stdout(_io.StringIO())
    with quiet:
        coco.createIndex()
        if len(dets) == 0:
            return {"map": 0.0, "map50": 0.0, "map75": 0.0}
        rows = [
            [float(r[0]), float(r[1]), float(r[2]), float(r[3] - r[1]), float(r[4] - r[2]),
             float(r[5]), float(r[6])]
            for r in dets
        ]
        import numpy as np

        pred = coco.loadRes(np.asarray(rows))
        ev = COCOeval(coco, pred, "bbox")
        ev.params.maxDets = [1, 10, 100]
        if classes is not None:
            ev.params.catIds = sorted(int(c) for c in classes)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    s = [max(0.0, float(v)) for v in ev.stats[:3]]  # -1 = no such objects -> 0
    return {"map": s[0], "map50": s[1], "map75": s[2]}


@TASKS.register("detection", description="COCO mAP / mAP@0.5 by pycocotools; selects on mAP")
class Detection(Task):
    name = "detection"
    select, mode = "map", "max"
    columns = (("map", "mAP"), ("map50", "mAP@0.5"))

    def __init__(self, target: str = "boxes", labels: str = "box_labels", inputs=None,
                 head: str = "centernet", num_classes: int = 10, max_dets: int = 20,
                 stride: float | None = None, image: str = "image",
                 classes: list[int] | None = None):
        if head not in HEADS:
            raise ConfigError("task.head", head, f"one of {', '.join(HEADS)}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError("task.num_classes", num_classes, "a positive integer")
        if isinstance(max_dets, bool) or not isinstance(max_dets, int) or max_dets < 1:
            raise ConfigError("task.max_dets", max_dets, "a positive integer")
        self.target, self.labels, self.head, self.num_classes = target, labels, head, num_classes
        self.max_dets, self.stride, self.image = max_dets, stride, image
        if classes is not None and (
            not classes or any(isinstance(c, bool) or not isinstance(c, int) or not
                               0 <= c < num_classes for c in classes)
        ):
            raise ConfigError("task.classes", classes, f"a non-empty list of class ids "
                              f"0..{num_classes - 1}")
        self.classes = classes
        self.inputs = inputs if inputs is not None else [image]
        self.class_dim = 1 if head == "centernet" else None

    def default_terms(self):
        from ..distiller import Term

        if self.head == "centernet":
            taps = ["output.logits", "output.size", "output.offset"]
            return [Term("centernet", student=taps, teacher=None, boxes=self.target,
                         labels=self.labels, image=self.image)]
        return [Term("set_loss", student=["output.logits", "output.boxes"], teacher=None,
                     boxes=self.target, labels=self.labels, image=self.image)]

    def check_batch(self, batch):
        for k in (self.target, self.labels, "idx"):
            if k not in batch:
                raise ConfigError("task.target", k, f"a batch key; the batch has "
                                  f"{', '.join(batch)}")

    def check_split(self, data, name: str) -> None:
        from ..data.detection import check_boxes

        t = getattr(data, "tensors", None)
        if t is None or self.target not in t:
            return
        img = t.get(self.image)
        hw = tuple(img.shape[-2:]) if img is not None else (10**9, 10**9)
        check_boxes(t[self.target], t[self.labels], hw, self.num_classes,
                    field=f"data.{name}.{self.target}")

    def _hw(self, batch) -> tuple[int, int]:
        return tuple(batch[self.image].shape[-2:])

    def detections(self, out, batch) -> torch.Tensor:
        """``(B, D, 6)`` detections of one batch's output (x1, y1, x2, y2, score, class)."""
        from ..boxes import decode_centernet, decode_set

        hw = self._hw(batch)
        if self.head == "centernet":
            heat = out["logits"]
            stride = self.stride or hw[-1] / heat.shape[-1]
            return decode_centernet(heat.float(), out["size"].float(), out["offset"].float(),
                                    stride, self.max_dets)
        return decode_set(out["logits"].float(), out["boxes"].float(), hw)

    def update(self, sums, logits, batch, keep=None, out=None):
        from ..boxes import valid_boxes

        if out is None or not isinstance(out, dict):
            raise ConfigError("task.head", self.head, "a detector whose output is a dict "
                              "(centernet: logits/size/offset; set: logits/boxes)")
        dets = self.detections(out, batch).detach()
        b, d = dets.shape[:2]
        ids = batch["idx"].to(dets.device).to(dets.dtype)
        rows = torch.cat([ids[:, None, None].expand(b, d, 1), dets], -1)
        boxes, labels = batch[self.target].to(dets.device), batch[self.labels].to(dets.device)
        ok = valid_boxes(boxes, labels)
        if keep is not None:
            rows = rows[keep.to(rows.device)]
            ok = ok & keep.to(ok.device)[:, None]
        gt = torch.cat([ids[:, None, None].expand(*ok.shape, 1), boxes.to(dets.dtype),
                        labels[..., None].to(dets.dtype)], -1)[ok]
        for key, v in (("cat:dets", rows.reshape(-1, 7)), ("cat:gt", gt)):
            sums[key] = torch.cat([sums[key], v]) if key in sums else v
        self.add(sums, "images", torch.tensor(float(b if keep is None else keep.sum())))

    def compute(self, sums):
        if "cat:gt" not in sums:
            return {"map": 0.0, "map50": 0.0, "map75": 0.0, "n": 0}
        # COCO's bbox evaluation reads areas from the boxes; the image size is only a record
        res = coco_map(sums["cat:gt"], sums["cat:dets"], (0, 0), self.num_classes,
                       self.classes)
        return {**res, "n": int(len(sums["cat:gt"]))}
