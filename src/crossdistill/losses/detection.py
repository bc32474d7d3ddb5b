"""The detection task's own losses: CenterNet's and DETR's set loss (label-side terms).

Both read the targets from the batch (``boxes (B, M, 4)`` xyxy pixels, ``box_labels (B, M)``,
-1 = padding; the keys are parameters) and return a scalar normalised by the number of
objects in the batch, as the papers do (DETR averages that count over processes; here each
process keeps its own, the usual single-process convention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..boxes import (
    centernet_targets,
    cxcywh_to_xyxy,
    hungarian_match,
    pairwise_giou,
    valid_boxes,
    xyxy_to_cxcywh,
)
from ..errors import ConfigError
from ..registry import LOSSES
from ..schema import NonNeg


def _targets(batch, boxes: str, labels: str, field: str) -> tuple[Tensor, Tensor]:
    for k in (boxes, labels):
        if batch is None or k not in batch:
            have = ", ".join(batch) if batch is not None else "none"
            raise ConfigError(f"{field}.{'boxes' if k == boxes else 'labels'}", k,
                              f"a batch key holding the targets; the batch has {have}")
    return batch[boxes], batch[labels]


def focal_heatmap(logits: Tensor, target: Tensor, alpha: float = 2.0, beta: float = 4.0):
    """CenterNet's penalty-reduced pixel-wise focal loss (Zhou et al. 2019, eq. 1), summed:
    ``-(1 - p)^a log p`` at centre cells (target 1) and ``-(1 - y)^b p^a log(1 - p)``
    elsewhere, ``p = sigmoid(logits)``; divide by the number of objects."""
    logits = logits.float()
    p = logits.sigmoid()
    pos = target >= 1.0
    log_p, log_1p = F.logsigmoid(logits), F.logsigmoid(-logits)
    pos_term = (1 - p) ** alpha * log_p
    neg_term = (1 - target) ** beta * p**alpha * log_1p
    return -torch.where(pos, pos_term, neg_term).sum()


@LOSSES.register(
    "centernet",
    paper="Objects as Points (CenterNet)",
    year=2019,
    inputs="labels",
    default_weight=1.0,
)
def centernet(
    s: list[Tensor],
    t=None,
    *,
    batch,
    boxes: str = "boxes",
    labels: str = "box_labels",
    image: str = "image",
    size_weight: NonNeg = 0.1,
    offset_weight: NonNeg = 1.0,
) -> Tensor:
    """``L = L_k + size_weight L_size + offset_weight L_off`` (Zhou et al. 2019, eqs. 1-3):
    the focal heatmap loss plus L1 on the size (in cells) and the sub-cell centre offset read
    at each object's centre cell, all divided by the number of objects. Taps: ``s = [heatmap
    logits (B, K, h, w), size (B, 2, h, w), offset (B, 2, h, w)]``; stride = input / grid."""
    heat, size, offset = s
    gt_boxes, gt_labels = _targets(batch, boxes, labels, "terms.centernet")
    b, k, gh, gw = heat.shape
    hw = batch[image].shape[-2:] if image in batch else (gh, gw)
    stride = hw[-1] / gw
    if gt_labels.numel() and int(gt_labels.max()) >= k:
        raise ConfigError("terms.centernet.labels", int(gt_labels.max()),
                          f"classes below the heatmap's {k} channels")
    tg = centernet_targets(gt_boxes.to(heat.device).float(), gt_labels.to(heat.device), k,
                           (gh, gw), stride)
    ok = tg["valid"]
    n = ok.sum().clamp_min(1)
    focal = focal_heatmap(heat, tg["heatmap"])
    idx = (tg["cell"][..., 1] * gw + tg["cell"][..., 0]).clamp(0, gh * gw - 1)  # (B, M)

    def at_centres(m):
        return m.float().flatten(2).gather(2, idx[:, None].expand(b, 2, idx.shape[1]))

    l_size = (at_centres(size) - tg["size"].transpose(1, 2)).abs().sum(1)
    l_off = (at_centres(offset) - tg["offset"].transpose(1, 2)).abs().sum(1)
    zero = torch.zeros_like(l_size)
    reg = size_weight * torch.where(ok, l_size, zero) + offset_weight * torch.where(ok, l_off, zero)
    return (focal + reg.sum()) / n


@LOSSES.register(
    "set_loss",
    paper="End-to-End Object Detection with Transformers (DETR)",
    year=2020,
    inputs="labels",
    default_weight=1.0,
)
def set_loss(
    s: list[Tensor],
    t=None,
    *,
    batch,
    boxes: str = "boxes",
    labels: str = "box_labels",
    image: str = "image",
    ce_weight: NonNeg = 1.0,
    l1_weight: NonNeg = 5.0,
    giou_weight: NonNeg = 2.0,
    eos_coef: NonNeg = 0.1,
) -> Tensor:
    """DETR's Hungarian loss (Carion et al. 2020, eqs. 1-2): match queries to objects one to
    one (``boxes.hungarian_match``, the same costs as the weights), then CE over all queries
    (unmatched ones to "no object", the last class, weighted ``eos_coef``) plus L1 on
    normalised cxcywh and 1 - GIoU on the matched pairs, divided by the number of objects.
    Taps: ``s = [logits (B, Q, K+1), boxes (B, Q, 4)]`` (sigmoid cxcywh)."""
    logits, pred = s
    gt_boxes, gt_labels = _targets(batch, boxes, labels, "terms.set_loss")
    b, q, k1 = logits.shape
    if gt_labels.shape[1] > q:
        raise ConfigError(
            "terms.set_loss.queries", q, f"at least the most objects on a canvas "
            f"({gt_labels.shape[1]}): a set detector needs one query per object"
        )
    if gt_labels.numel() and int(gt_labels.max()) >= k1 - 1:
        raise ConfigError("terms.set_loss.labels", int(gt_labels.max()),
                          f"classes below the head's {k1 - 1} (+ no-object)")
    hw = tuple(batch[image].shape[-2:]) if image in batch else (1, 1)
    gt_boxes, gt_labels = gt_boxes.to(logits.device).float(), gt_labels.to(logits.device)
    match = hungarian_match(logits, pred, gt_boxes, gt_labels, hw, ce_weight, l1_weight,
                            giou_weight)
    bi = torch.cat([torch.full_like(qi, i) for i, (qi, _) in enumerate(match)])
    qi = torch.cat([m[0] for m in match])
    oi = torch.cat([m[1] for m in match])
    cls_target = torch.full((b, q), k1 - 1, dtype=torch.long, device=logits.device)
    cls_target[bi, qi] = gt_labels[bi, oi]
    w = torch.ones(k1, device=logits.device)
    w[-1] = eos_coef
    n = valid_boxes(gt_boxes, gt_labels).sum().clamp_min(1)
    ce = F.cross_entropy(logits.float().reshape(-1, k1), cls_target.view(-1), weight=w)
    scale = gt_boxes.new_tensor([hw[1], hw[0]] * 2)
    src = pred[bi, qi].float()
    tgt = gt_boxes[bi, oi] / scale
    l1 = (src - xyxy_to_cxcywh(tgt)).abs().sum() / n
    giou = (1 - pairwise_giou(cxcywh_to_xyxy(src), tgt).diagonal()).sum() / n
    return ce_weight * ce + l1_weight * l1 + giou_weight * giou
