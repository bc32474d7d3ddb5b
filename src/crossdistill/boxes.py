"""Box geometry and the two detection-head output formats (CenterNet heatmaps, DETR sets).

Conventions used everywhere in crossdistill: boxes are ``xyxy`` in input pixels with the far
edge exclusive (a digit whose ink spans columns 3..10 has ``x1 = 3, x2 = 11``); targets are
padded per image to the most objects on any canvas, a padded row has label ``-1`` (or zero
area); DETR-style heads predict ``cxcywh`` normalised to [0, 1] by the input size.

Papers: Zhou, Wang & Krähenbühl, "Objects as Points" (CenterNet, 2019; heatmap + size +
offset, Gaussian radius from CornerNet, Law & Deng 2018); Carion et al., "End-to-End Object
Detection with Transformers" (DETR, 2020; Hungarian matching, Rezatofighi et al.'s GIoU 2019).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def valid_boxes(boxes: Tensor, labels: Tensor) -> Tensor:
    """Rows that are real objects: a label >= 0 and a positive area. ``(..., M)`` bool."""
    wh = boxes[..., 2:] - boxes[..., :2]
    return (labels >= 0) & (wh > 0).all(-1)


def xyxy_to_cxcywh(b: Tensor) -> Tensor:
    return torch.cat([(b[..., :2] + b[..., 2:]) / 2, b[..., 2:] - b[..., :2]], -1)


def cxcywh_to_xyxy(b: Tensor) -> Tensor:
    return torch.cat([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)


def box_area(b: Tensor) -> Tensor:
    return (b[..., 2] - b[..., 0]).clamp_min(0) * (b[..., 3] - b[..., 1]).clamp_min(0)


def pairwise_iou(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """IoU and union of every pair, ``(N, 4) x (M, 4) -> (N, M)`` each (xyxy)."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    union = box_area(a)[:, None] + box_area(b)[None] - inter
    return inter / union.clamp_min(1e-12), union


def pairwise_giou(a: Tensor, b: Tensor) -> Tensor:
    """Generalised IoU (Rezatofighi et al. 2019): ``IoU - (|C| - |A u B|) / |C|`` with C the
    smallest enclosing box; in [-1, 1], 1 for identical boxes."""
    iou, union = pairwise_iou(a, b)
    lt = torch.minimum(a[:, None, :2], b[None, :, :2])
    rb = torch.maximum(a[:, None, 2:], b[None, :, 2:])
    hull = (rb - lt).clamp_min(0).prod(-1)
    return iou - (hull - union) / hull.clamp_min(1e-12)


# -- CenterNet ---------------------------------------------------------------------------------
def gaussian_radius(h: Tensor, w: Tensor, min_overlap: float = 0.7) -> Tensor:
    """CornerNet's radius: the largest corner shift keeping IoU >= ``min_overlap``, the
    smallest of its three quadratic cases (Law & Deng 2018, as CenterNet uses it). Like
    CenterNet's code, every root is halved rather than divided by ``2a``: the radii its
    heatmap loss was tuned with, kept on purpose."""
    a1, b1 = 1.0, h + w
    c1 = w * h * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + torch.sqrt(b1**2 - 4 * a1 * c1)) / 2
    a2, b2, c2 = 4.0, 2 * (h + w), (1 - min_overlap) * w * h
    r2 = (b2 + torch.sqrt(b2**2 - 4 * a2 * c2)) / 2
    a3, b3, c3 = 4 * min_overlap, -2 * min_overlap * (h + w), (min_overlap - 1) * w * h
    r3 = (b3 + torch.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


def centernet_targets(
    boxes: Tensor, labels: Tensor, num_classes: int, grid: tuple[int, int], stride: float
) -> dict[str, Tensor]:
    """Training targets on a ``grid`` of cells ``stride`` pixels wide: the class heatmap
    ``(B, K, h, w)`` (a Gaussian of sigma = (2r+1)/6 at each object's centre cell, max over
    overlapping objects), and per object its centre cell ``(B, M, 2)`` (x, y), the sub-cell
    offset ``(B, M, 2)`` and size in cells ``(B, M, 2)`` (w, h; CenterNet regresses sizes at
    the output resolution), with ``valid (B, M)``."""
    b, m = labels.shape
    gh, gw = grid
    ok = valid_boxes(boxes, labels)
    cxcy = (boxes[..., :2] + boxes[..., 2:]) / 2 / stride  # in cells
    wh = boxes[..., 2:] - boxes[..., :2]
    cell = cxcy.floor().clamp_min(0)
    cell = torch.stack([cell[..., 0].clamp_max(gw - 1), cell[..., 1].clamp_max(gh - 1)], -1)
    radius = gaussian_radius(wh[..., 1] / stride, wh[..., 0] / stride).floor().clamp_min(0)
    sigma = (2 * radius + 1) / 6
    ys = torch.arange(gh, dtype=boxes.dtype, device=boxes.device)
    xs = torch.arange(gw, dtype=boxes.dtype, device=boxes.device)
    dy = ys.view(1, 1, gh, 1) - cell[..., 1, None, None]
    dx = xs.view(1, 1, 1, gw) - cell[..., 0, None, None]
    g = torch.exp(-(dx**2 + dy**2) / (2 * sigma[..., None, None] ** 2))  # (B, M, h, w)
    inside = (dx.abs() <= radius[..., None, None]) & (dy.abs() <= radius[..., None, None])
    g = torch.where(inside & ok[..., None, None], g, torch.zeros_like(g))
    onehot = F.one_hot(labels.clamp_min(0), num_classes).to(g.dtype) * ok[..., None]
    heat = (g[:, :, None] * onehot[..., None, None]).amax(1) if m else g.new_zeros(
        b, num_classes, gh, gw
    )
    return {"heatmap": heat, "cell": cell.long(), "offset": cxcy - cell, "size": wh / stride,
            "valid": ok}


def decode_centernet(
    heat_logits: Tensor, size: Tensor, offset: Tensor, stride: float, max_dets: int = 20
) -> Tensor:
    """Detections ``(B, D, 6)`` = (x1, y1, x2, y2, score, class) from a CenterNet output:
    sigmoid heatmap, 3x3 max-pool peaks (CenterNet's NMS), top ``max_dets`` over classes and
    cells, boxes from the peak cell + offset +- size / 2 (sizes in cells, boxes in pixels)."""
    b, k, h, w = heat_logits.shape
    heat = heat_logits.sigmoid()
    peak = heat == F.max_pool2d(heat, 3, stride=1, padding=1)
    heat = heat * peak
    d = min(max_dets, k * h * w)
    score, flat = heat.view(b, -1).topk(d)
    cls = flat // (h * w)
    pos = flat % (h * w)
    ys, xs = (pos // w).to(heat.dtype), (pos % w).to(heat.dtype)
    gather = lambda t: t.reshape(b, 2, h * w).gather(2, pos[:, None].expand(b, 2, d))  # noqa: E731
    off, wh = gather(offset), gather(size) * stride
    cx, cy = (xs + off[:, 0]) * stride, (ys + off[:, 1]) * stride
    boxes = torch.stack([cx - wh[:, 0] / 2, cy - wh[:, 1] / 2, cx + wh[:, 0] / 2,
                         cy + wh[:, 1] / 2], -1)
    return torch.cat([boxes, score[..., None], cls[..., None].to(boxes.dtype)], -1)


# -- DETR ----------------------------------------------------------------------------------------
def hungarian_match(
    logits: Tensor,
    boxes: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    image_size: tuple[int, int],
    cost_class: float = 1.0,
    cost_l1: float = 5.0,
    cost_giou: float = 2.0,
) -> list[tuple[Tensor, Tensor]]:
    """Per image the (query, object) pairs of the least-cost one-to-one assignment (DETR's
    matcher: ``-p(class) * cost_class + L1(cxcywh) * cost_l1 - GIoU * cost_giou``), solved by
    scipy's ``linear_sum_assignment``. ``logits (B, Q, K+1)``, ``boxes (B, Q, 4)`` normalised
    cxcywh; ``gt_boxes (B, M, 4)`` xyxy pixels, ``gt_labels (B, M)`` (-1 = padding)."""
    from scipy.optimize import linear_sum_assignment

    scale = gt_boxes.new_tensor([image_size[1], image_size[0]] * 2)
    ok = valid_boxes(gt_boxes, gt_labels)
    prob = logits.detach().float().softmax(-1)
    out = []
    for i in range(len(logits)):
        tgt = gt_boxes[i][ok[i]].float() / scale
        lab = gt_labels[i][ok[i]]
        if len(lab) == 0:
            empty = torch.zeros(0, dtype=torch.long, device=logits.device)
            out.append((empty, empty))
            continue
        pred = boxes[i].detach().float()
        cost = (
            -prob[i][:, lab] * cost_class
            + torch.cdist(pred, xyxy_to_cxcywh(tgt), p=1) * cost_l1
            - pairwise_giou(cxcywh_to_xyxy(pred), tgt) * cost_giou
        )
        q, j = linear_sum_assignment(cost.cpu().numpy())
        keep = np.flatnonzero(ok[i].cpu().numpy())  # object j -> its row in the padded targets
        dev = logits.device
        out.append((torch.as_tensor(q, device=dev), torch.as_tensor(keep[j], device=dev)))
    return out


def decode_set(logits: Tensor, boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Detections ``(B, Q, 6)`` from a set prediction: every query, scored by its most likely
    real class (the last logit is "no object"), boxes scaled to pixels."""
    prob = logits.softmax(-1)[..., :-1]
    score, cls = prob.max(-1)
    scale = boxes.new_tensor([image_size[1], image_size[0]] * 2)
    xyxy = cxcywh_to_xyxy(boxes) * scale
    return torch.cat([xyxy, score[..., None], cls[..., None].to(xyxy.dtype)], -1)


def clip_boxes(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    h, w = size
    return torch.stack(
        [boxes[..., 0].clamp(0, w), boxes[..., 1].clamp(0, h), boxes[..., 2].clamp(0, w),
         boxes[..., 3].clamp(0, h)], -1
    )


__all__ = [
    "box_area",
    "centernet_targets",
    "clip_boxes",
    "cxcywh_to_xyxy",
    "decode_centernet",
    "decode_set",
    "gaussian_radius",
    "hungarian_match",
    "pairwise_giou",
    "pairwise_iou",
    "valid_boxes",
    "xyxy_to_cxcywh",
]
