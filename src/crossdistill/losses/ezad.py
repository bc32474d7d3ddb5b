"""EZAD's losses: region-embedding distillation, the embedding detector's label-side loss,
and the sigmoid CE that adapts the CLIP stand-in's LayerNorms.

Paper: Liu, Hu & Nevatia, "Efficient Feature Distillation for Zero-shot Annotation Object
Detection" (EZAD), WACV 2024 (arXiv 2303.12145). Official code: dragonlzm/EZAD.

* ``ezad_distill``: L_distill = L1(normalised region embedding, normalised CLIP embedding)
  with per-region weights (the paper's distillation loss). As the official RoI head
  (``standard_roi_head_distillation.py``: mmdet ``L1Loss`` averaged over regions x dims, then
  x ``clip_dim``) it is the L1 summed over the embedding dims and averaged over the regions,
  and an image's region weights are rescaled to average 1 over its regions (the code's
  ``normalize_factor``). Our CenterNet form reads a region's embedding at its centre cell
  (CenterNet reads everything there) instead of RoI-pooling it.
* ``ezad_detect``: the detector's loss on the base labels: CenterNet's focal loss on a
  class-agnostic objectness heatmap, L1 on size and offset (Zhou et al. 2019), and the
  classification by cosine to the class-name text embeddings / T (the logits the model
  outputs as ``class_logits``), CE at each labelled object's centre over the ``classes`` the
  detector is trained on (EZAD: the base categories). The learned background vector of the
  RoI head is replaced by the objectness heatmap (our dense form).
* ``ezad_sigmoid_ce``: the domain-adaptation loss (configs/cls_finetuner: mmdet
  ``CrossEntropyLoss(use_sigmoid=True)``: binary CE of each class logit against the one-hot
  label, averaged over the classes) over the base classes' text classifiers.

The distillation targets are computed offline by the adapted teacher (EZAD precomputes its
CLIP features) and reach the loss in the batch (``distill_boxes``, ``distill_embeds``,
``distill_weights``; see :func:`crossdistill.methods.ezad.distill_targets`), so both terms
are teacher-less terms of the student's taps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..boxes import centernet_targets
from ..errors import ConfigError
from ..registry import LOSSES
from ..schema import NonNeg
from .detection import _targets, focal_heatmap


# -- pieces (pure, any float dtype: gradcheck runs them in float64) -----------------------------
def centre_cells(boxes: Tensor, grid: tuple[int, int], stride: float) -> Tensor:
    """The flat index ``y * w + x`` of each box's centre cell ``(B, R)`` (floor of the centre
    in cells, clamped to the grid: the cell CenterNet's targets use)."""
    gh, gw = grid
    c = ((boxes[..., :2] + boxes[..., 2:]) / 2 / stride).floor()
    x = c[..., 0].clamp(0, gw - 1).long()
    y = c[..., 1].clamp(0, gh - 1).long()
    return y * gw + x


def at_cells(maps: Tensor, idx: Tensor) -> Tensor:
    """``maps (B, C, h, w)`` read at flat cells ``idx (B, R)`` -> ``(B, R, C)``."""
    b, c = maps.shape[:2]
    flat = maps.flatten(2)
    return flat.gather(2, idx[:, None].expand(b, c, idx.shape[1])).transpose(1, 2)


def region_l1(s: Tensor, t: Tensor) -> Tensor:
    """``||s/|s| - t/|t| ||_1`` over the last dim: EZAD's L1 between unit embeddings."""
    return (F.normalize(s, dim=-1) - F.normalize(t.detach(), dim=-1)).abs().sum(-1)


def image_weights(weights: Tensor, valid: Tensor) -> Tensor:
    """Per-region weights ``(B, R)`` rescaled so each image's valid regions average 1 (the
    official code's ``normalize_factor``); an image whose weights sum to 0 keeps them."""
    w = torch.where(valid, weights, torch.zeros_like(weights))
    n = valid.sum(-1, keepdim=True).to(w.dtype)
    total = w.sum(-1, keepdim=True)
    return w * torch.where(total > 0, n / total.clamp_min(1e-12), torch.ones_like(total))


def masked_ce(logits: Tensor, labels: Tensor, classes: list[int] | None) -> Tensor:
    """CE per row of ``logits (N, K)`` over the columns ``classes`` only (all if None);
    ``labels (N,)`` are column ids (each in ``classes``)."""
    if classes is not None:
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        keep[list(classes)] = True
        logits = logits.masked_fill(~keep, float("-inf"))
    return F.cross_entropy(logits, labels, reduction="none")


def _check_classes(name: str, classes, k: int | None = None) -> None:
    if classes is None:
        return
    ok = isinstance(classes, (list, tuple)) and len(classes) > 0 and all(
        isinstance(c, int) and not isinstance(c, bool) and c >= 0 and (k is None or c < k)
        for c in classes)
    if not ok or len(set(classes)) != len(classes):
        upto = f" below {k}" if k is not None else ""
        raise ConfigError(f"terms.{name}.classes", classes,
                          f"a non-empty list of distinct class ids{upto}")


def _key(batch, key: str, field: str) -> Tensor:
    if batch is None or key not in batch:
        have = ", ".join(batch) if batch is not None else "none"
        raise ConfigError(field, key, f"a batch key (EZAD's precomputed regions: "
                          f"methods.ezad.distill_targets); the batch has {have}")
    return batch[key]


# -- registered losses ---------------------------------------------------------------------------
@LOSSES.register(
    "ezad_distill",
    paper="Efficient Feature Distillation for Zero-shot Annotation Object Detection (EZAD)",
    year=2024,
    inputs="labels",
    default_weight=1.0,
)
def ezad_distill(
    s: Tensor,
    t=None,
    *,
    batch,
    boxes: str = "distill_boxes",
    targets: str = "distill_embeds",
    weights: str = "distill_weights",
    image: str = "image",
) -> Tensor:
    """``L = 1/N sum_regions w_r ||e_s(r)/|e_s(r)| - e_t(r)/|e_t(r)| ||_1`` (EZAD, the
    distillation loss): ``s`` = the student's embedding map ``(B, D, h, w)`` read at each
    region's centre cell; ``batch[targets] (B, R, D)`` the teacher's precomputed region
    embeddings, ``batch[boxes] (B, R, 4)`` the regions (xyxy pixels), ``batch[weights] (B, R)``
    their weights (0 = padding), rescaled per image to mean 1; N = valid regions in the batch.
    """
    reg = _key(batch, boxes, "terms.ezad_distill.boxes").to(s.device)
    tgt = _key(batch, targets, "terms.ezad_distill.targets").to(s.device)
    w = _key(batch, weights, "terms.ezad_distill.weights").to(s.device)
    b, d, gh, gw = s.shape
    if tgt.shape[:2] != reg.shape[:2] or tgt.shape[-1] != d or w.shape != reg.shape[:2]:
        raise ConfigError("terms.ezad_distill.targets", tuple(tgt.shape),
                          f"(B, R, {d}) teacher embeddings, one per region of "
                          f"{tuple(reg.shape)} with weights (B, R)")
    hw = batch[image].shape[-2:] if image in batch else (gh, gw)
    valid = (w > 0) & ((reg[..., 2:] - reg[..., :2]) > 0).all(-1)
    n = valid.sum()
    if int(n) == 0:
        return s.sum() * 0.0
    e = at_cells(s, centre_cells(reg.to(s.dtype), (gh, gw), hw[-1] / gw))  # (B, R, D)
    per = region_l1(e, tgt.to(s.dtype)) * image_weights(w.to(s.dtype), valid)
    return torch.where(valid, per, torch.zeros_like(per)).sum() / n


@LOSSES.register(
    "ezad_detect",
    paper="Efficient Feature Distillation for Zero-shot Annotation Object Detection (EZAD), "
    "dense CenterNet form",
    year=2024,
    inputs="labels",
    default_weight=1.0,
)
def ezad_detect(
    s: list[Tensor],
    t=None,
    *,
    batch,
    boxes: str = "boxes",
    labels: str = "box_labels",
    image: str = "image",
    classes: list[int] | None = None,
    cls_weight: NonNeg = 1.0,
    size_weight: NonNeg = 0.1,
    offset_weight: NonNeg = 1.0,
) -> Tensor:
    """``(L_obj + size_weight L_size + offset_weight L_off) / n + cls_weight * mean CE``:
    CenterNet's focal loss on the class-agnostic objectness ``s[0] (B, 1, h, w)`` and L1 on
    ``s[2]`` size / ``s[3]`` offset at the labelled objects' centres (n objects), plus CE of
    ``s[1]`` = cosine-to-text logits ``(B, K, h, w)`` at those centres over ``classes``
    (default all K; EZAD trains on the base ones). Unlabelled objects (label -1) are
    background, as in zero-shot annotation detection."""
    obj, cls, size, offset = s
    gt_boxes, gt_labels = _targets(batch, boxes, labels, "terms.ezad_detect")
    b, k, gh, gw = cls.shape
    _check_classes("ezad_detect", classes, k)
    gt_boxes, gt_labels = gt_boxes.to(obj.device), gt_labels.to(obj.device)
    if gt_labels.numel() and int(gt_labels.max()) >= k:
        raise ConfigError("terms.ezad_detect.labels", int(gt_labels.max()),
                          f"classes below the {k} text embeddings")
    if classes is not None:
        bad = [c for c in gt_labels[gt_labels >= 0].unique().tolist() if c not in classes]
        if bad:
            raise ConfigError("terms.ezad_detect.classes", classes,
                              f"every labelled class (the batch also labels {bad})")
    hw = batch[image].shape[-2:] if image in batch else (gh, gw)
    stride = hw[-1] / gw
    agnostic = torch.where(gt_labels >= 0, torch.zeros_like(gt_labels), gt_labels)
    tg = centernet_targets(gt_boxes.float(), agnostic, 1, (gh, gw), stride)
    ok = tg["valid"]
    n = ok.sum().clamp_min(1)
    idx = (tg["cell"][..., 1] * gw + tg["cell"][..., 0]).clamp(0, gh * gw - 1)
    l_size = (at_cells(size.float(), idx) - tg["size"]).abs().sum(-1)
    l_off = (at_cells(offset.float(), idx) - tg["offset"]).abs().sum(-1)
    zero = torch.zeros_like(l_size)
    reg = size_weight * torch.where(ok, l_size, zero) + offset_weight * torch.where(ok, l_off,
                                                                                      zero)
    total = (focal_heatmap(obj, tg["heatmap"]) + reg.sum()) / n
    if cls_weight > 0 and bool(ok.any()):
        logits = at_cells(cls.float(), idx)[ok]  # (n, K)
        total = total + cls_weight * masked_ce(logits, gt_labels[ok], classes).mean()
    return total


@LOSSES.register(
    "ezad_sigmoid_ce",
    paper="Efficient Feature Distillation for Zero-shot Annotation Object Detection (EZAD), "
    "CLIP domain adaptation",
    year=2024,
    inputs="labels",
    default_weight=1.0,
)
def ezad_sigmoid_ce(s: Tensor, t=None, *, y: Tensor, classes: list[int] | None = None) -> Tensor:
    """Per sample ``mean_c BCE(s_c, 1[y = c])`` over the columns ``classes`` of the logits
    ``s (..., K)`` (default all); ``y`` holds class ids (column ids), -100 = none. What EZAD
    tunes the CLIP LayerNorms with, on base-category crops."""
    _check_classes("ezad_sigmoid_ce", classes, s.shape[-1])
    cols = list(range(s.shape[-1])) if classes is None else list(classes)
    y = y.to(s.device).long()
    lab = y >= 0
    if bool(lab.any()) and not torch.isin(y[lab], torch.tensor(cols, device=y.device)).all():
        raise ConfigError("terms.ezad_sigmoid_ce.classes", classes,
                          "every labelled class among the trained columns")
    logits = s[..., cols]
    target = (y.clamp_min(0)[..., None] == torch.tensor(cols, device=s.device)).to(s.dtype)
    out = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(-1)
    return torch.where(lab, out, torch.zeros_like(out))


__all__ = [
    "at_cells",
    "centre_cells",
    "ezad_detect",
    "ezad_distill",
    "ezad_sigmoid_ce",
    "image_weights",
    "masked_ce",
    "region_l1",
]
