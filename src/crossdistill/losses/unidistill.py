"""UniDistill's three terms for a CenterNet-style 2-D detector.

Paper: Zhou et al., "UniDistill: A Universal Cross-Modality Knowledge Distillation Framework
for 3D Object Detection in Bird's-Eye View", CVPR 2023 (official code:
megvii-research/CVPR2023-UniDistill, ``unidistill/exps/multisensor_fusion/nuscenes/BEVFusion/
BEVFusion_nuscenes_centerhead_camera_exp_distill_lidar.py``: ``FeatureDistillLoss``,
``BEVDistillLoss``, ``ResponseDistillLoss``; read, not run). Here the BEV plane is the image
plane and each ground-truth box is an axis-aligned ``xyxy`` box in pixels.

Per real ground-truth box ``b`` the 9 keypoints ``K_b`` are its 4 corners, its centre and
its 4 edge midpoints, in the tapped map's cell coordinates (``box / stride``, stride = input
size / map size per axis). ``f(p)`` is the map bilinearly sampled at point ``p`` (a ``C``
vector); ``N`` = the number of real boxes in the batch.

* ``unidistill_feature`` (paper eq. 1, low-level features):
  ``L_F = 1/N sum_b 1/(9 C) sum_{p in K_b} |f_s(p) - f_t(p)|_1``.
* ``unidistill_relation`` (paper eq. 2, high-level features): with ``n(p) = f(p) / |f(p)|``
  and ``R_b[i, j] = n(p_i) . n(p_j)`` (the 9 x 9 cosine matrix of box ``b``),
  ``L_R = 1/N sum_b 1/81 sum_ij |R_b^s[i, j] - R_b^t[i, j]|``. Cosines do not depend on the
  width, so student and teacher maps may differ in channels here.
* ``unidistill_heatmap`` / ``unidistill_regression`` (paper eq. 3, responses): ``G`` = the
  class-agnostic Gaussian mask of the boxes (one Gaussian per object at its centre cell with
  CenterNet's radius, max over objects: ``boxes.centernet_targets``' heatmap, max over
  classes), ``L_cls = sum_xy G |max_k sigma(h_s) - max_k sigma(h_t)| / sum G`` and
  ``L_reg = sum_xy G mean_c |r_s - r_t| / sum G`` with ``r`` = the regression maps (size and
  offset) stacked on channels.

Where this departs from the official code (bugs not copied):

* Keypoint sampling: the official code normalises ``(x - w/2) / (w/2)`` and calls
  ``grid_sample`` with its default ``align_corners=False``, which reads the map at cell index
  ``x - 1/2``; its own CenterPoint head (like ours: ``centernet_targets``,
  ``decode_centernet``) puts cell ``i`` at coordinate ``i`` (peak at ``floor(c)``, offset
  ``c - floor(c)``), so every point is read half a cell up-left of where it is. Here
  ``u = (2x + 1) / w - 1`` with ``align_corners=False``, i.e. exactly cell coordinate ``x``
  (tested by sampling a map whose value is its own coordinate). Points past the last cell
  (a box touching the right or bottom edge) read the border cell (``padding_mode="border"``;
  the official code pads with zeros: our choice).
* Heatmaps: the official code compares the student's raw heatmap with the teacher's
  ``sigmoid(hm / 2)``; both go through the same ``sigmoid`` here (the detector's score).
* Normalisers: the official ``/ (count + 1e-4)``; here an exact ``/ N`` (and ``/ sum G``,
  which is at least 1 when a box exists: every Gaussian peaks at 1), 0 for a batch without
  boxes. Relation: the official ``f / (|f| + 1e-4)``; here ``f / max(|f|, eps)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..boxes import centernet_targets, valid_boxes
from ..errors import ConfigError
from ..registry import LOSSES
from ..schema import Pos
from .features import _pair, _upcast

PAPER = ("UniDistill: A Universal Cross-Modality Knowledge Distillation Framework for 3D "
         "Object Detection in Bird's-Eye View")
YEAR = 2023
KEYPOINTS = 9


def box_keypoints(boxes: Tensor, stride: tuple[float, float] = (1.0, 1.0)) -> Tensor:
    """``(..., 9, 2)`` (x, y) keypoints of ``xyxy`` boxes ``(..., 4)`` in map cells (pixels
    divided by ``stride`` = (sy, sx)): corners (x1, y1), (x2, y1), (x2, y2), (x1, y2); the
    centre; the midpoints of the top, right, bottom and left edges."""
    sy, sx = stride
    x1, y1, x2, y2 = (boxes[..., i] for i in range(4))
    x1, x2, y1, y2 = x1 / sx, x2 / sx, y1 / sy, y2 / sy
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    xs = [x1, x2, x2, x1, cx, cx, x2, cx, x1]
    ys = [y1, y1, y2, y2, cy, y1, cy, y2, cy]
    return torch.stack([torch.stack(xs, -1), torch.stack(ys, -1)], -1)


def sample_points(feat: Tensor, points: Tensor) -> Tensor:
    """Bilinear samples of ``feat (B, C, h, w)`` at ``points (B, M, P, 2)`` (x, y in cell
    coordinates, cell ``i`` at ``i``): ``(B, M, P, C)``. ``grid_sample`` with
    ``align_corners=False`` puts cell ``i``'s centre at ``u = (2i + 1) / w - 1``; points past
    the edge read the border cells."""
    h, w = feat.shape[-2:]
    pts = points.to(feat.dtype)
    gx = (2 * pts[..., 0] + 1) / w - 1
    gy = (2 * pts[..., 1] + 1) / h - 1
    grid = torch.stack([gx, gy], -1)
    out = F.grid_sample(feat, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.permute(0, 2, 3, 1)  # (B, C, M, P) -> (B, M, P, C)


def _targets(batch, boxes: str, labels: str, image: str, field: str):
    for k in (boxes, labels, image):
        if batch is None or k not in batch:
            have = ", ".join(sorted(batch)) if batch is not None else "none"
            raise ConfigError(f"{field}.{'image' if k == image else k}", k,
                              f"a batch key (boxes, labels and an image for the stride); "
                              f"the batch has {have}")
    return batch[boxes], batch[labels], tuple(batch[image].shape[-2:])


def _map(x: Tensor, field: str, what: str) -> None:
    if not torch.is_tensor(x) or x.dim() != 4:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ConfigError(field, shape, f"{what} (B, C, h, w)")


def _box_samples(s: Tensor, t: Tensor, batch, boxes, labels, image, field):
    """Samples of both maps at each box's keypoints, ``(N, 9, C_s)``, ``(N, 9, C_t)``, over
    the ``N`` real boxes of the batch."""
    if s.shape[0] != t.shape[0] or s.shape[-2:] != t.shape[-2:]:
        raise ConfigError(f"{field}.student", tuple(s.shape),
                          f"a map of the teacher's batch and grid {tuple(t.shape)}")
    gt, lab, hw = _targets(batch, boxes, labels, image, field)
    gt = gt.to(s.device, s.dtype)
    lab = lab.to(s.device)
    if gt.shape[:2] != lab.shape or gt.shape[0] != s.shape[0]:
        raise ConfigError(f"{field}.boxes", tuple(gt.shape),
                          f"(B, M, 4) boxes for the {s.shape[0]} maps, one label each")
    h, w = s.shape[-2:]
    pts = box_keypoints(gt, (hw[0] / h, hw[1] / w))
    ok = valid_boxes(gt, lab)
    return sample_points(s, pts)[ok], sample_points(t, pts)[ok]


@LOSSES.register("unidistill_feature", paper=PAPER, year=YEAR, inputs="features",
                 default_weight=100.0)
def unidistill_feature(
    s: Tensor,
    t: Tensor,
    *,
    batch,
    boxes: str = "boxes",
    labels: str = "box_labels",
    image: str = "image",
) -> Tensor:
    """Keypoint feature L1 (module doc, ``L_F``): ``s``, ``t`` ``(B, C, h, w)`` low-level
    maps of one width (project the student first), boxes read from ``batch``."""
    _map(s, "terms.unidistill_feature.student", "a feature map")
    _map(t, "terms.unidistill_feature.teacher", "a feature map")
    s, t = _pair(s, t)
    if s.shape[1] != t.shape[1]:
        raise ConfigError("terms.unidistill_feature.student", tuple(s.shape),
                          f"the teacher's {t.shape[1]} channels (use projector: auto or "
                          "conv1x1)")
    fs, ft = _box_samples(s, t, batch, boxes, labels, image, "terms.unidistill_feature")
    if len(fs) == 0:
        return s.sum() * 0.0
    return (fs - ft).abs().mean((-1, -2)).sum() / len(fs)


def keypoint_relations(f: Tensor, eps: float = 1e-6) -> Tensor:
    """``(N, 9, 9)`` cosine matrices of per-box keypoint features ``(N, 9, C)``."""
    n = f / f.norm(dim=-1, keepdim=True).clamp_min(eps)
    return n @ n.transpose(-1, -2)


@LOSSES.register("unidistill_relation", paper=PAPER, year=YEAR, inputs="features",
                 default_weight=40.0)
def unidistill_relation(
    s: Tensor,
    t: Tensor,
    *,
    batch,
    boxes: str = "boxes",
    labels: str = "box_labels",
    image: str = "image",
    eps: Pos = 1e-6,
) -> Tensor:
    """Keypoint relation L1 (module doc, ``L_R``): ``s``, ``t`` ``(B, C, h, w)`` high-level
    maps on one grid (widths may differ)."""
    _map(s, "terms.unidistill_relation.student", "a feature map")
    _map(t, "terms.unidistill_relation.teacher", "a feature map")
    s, t = _pair(s, t)
    fs, ft = _box_samples(s, t, batch, boxes, labels, image, "terms.unidistill_relation")
    if len(fs) == 0:
        return s.sum() * 0.0
    diff = keypoint_relations(fs, eps) - keypoint_relations(ft, eps)
    return diff.abs().mean((-1, -2)).sum() / len(fs)


def gaussian_mask(boxes: Tensor, labels: Tensor, grid: tuple[int, int], stride: float) -> Tensor:
    """``(B, h, w)`` class-agnostic CenterNet Gaussians of the real boxes (max over objects):
    the training heatmap of :func:`~crossdistill.boxes.centernet_targets`, max over classes."""
    one_class = torch.where(labels >= 0, torch.zeros_like(labels), labels)
    return centernet_targets(boxes, one_class, 1, grid, stride)["heatmap"][:, 0]


def _response_mask(ref: Tensor, batch, boxes, labels, image, field) -> Tensor:
    gt, lab, hw = _targets(batch, boxes, labels, image, field)
    h, w = ref.shape[-2:]
    return gaussian_mask(gt.to(ref.device, ref.dtype), lab.to(ref.device), (h, w), hw[-1] / w)


def _masked(per: Tensor, mask: Tensor) -> Tensor:
    """``sum G * per / sum G``; ``sum G >= 1`` whenever a box exists (its peak), 0 else."""
    mask = mask.to(per.dtype)
    return (per * mask).sum() / mask.sum().clamp_min(1.0)


@LOSSES.register("unidistill_heatmap", paper=PAPER, year=YEAR, inputs="logits",
                 default_weight=10.0)
def unidistill_heatmap(
    s: Tensor,
    t: Tensor,
    *,
    batch,
    boxes: str = "boxes",
    labels: str = "box_labels",
    image: str = "image",
) -> Tensor:
    """Gaussian-weighted L1 between the max-over-class heatmap *probabilities* (sigmoid on
    both sides; module doc, ``L_cls``). ``s``, ``t``: heatmap logits ``(B, K, h, w)``."""
    field = "terms.unidistill_heatmap"
    _map(s, f"{field}.student", "heatmap logits")
    _map(t, f"{field}.teacher", "heatmap logits")
    if s.shape != t.shape:
        raise ConfigError(f"{field}.student", tuple(s.shape),
                          f"heatmap logits shaped like the teacher's {tuple(t.shape)}")
    s, t = _pair(s, t)
    mask = _response_mask(s, batch, boxes, labels, image, field)
    per = (s.sigmoid().amax(1) - t.sigmoid().amax(1)).abs()
    return _masked(per, mask)


@LOSSES.register("unidistill_regression", paper=PAPER, year=YEAR, inputs="logits",
                 default_weight=10.0)
def unidistill_regression(
    s: list[Tensor],
    t: list[Tensor],
    *,
    batch,
    boxes: str = "boxes",
    labels: str = "box_labels",
    image: str = "image",
) -> Tensor:
    """Gaussian-weighted L1 between the regression maps, mean over their channels (module
    doc, ``L_reg``). ``s``, ``t``: lists of maps ``(B, c_i, h, w)`` (CenterNet: size and
    offset), concatenated on channels."""
    field = "terms.unidistill_regression"
    s = [s] if torch.is_tensor(s) else list(s)
    t = [t] if torch.is_tensor(t) else list(t)
    for side, xs in (("student", s), ("teacher", t)):
        for x in xs:
            _map(x, f"{field}.{side}", "regression maps")
    rs = torch.cat([_upcast(x) for x in s], 1)
    rt = torch.cat([_upcast(x.detach()) for x in t], 1)
    if rs.shape != rt.shape:
        raise ConfigError(f"{field}.student", tuple(rs.shape),
                          f"regression maps shaped like the teacher's {tuple(rt.shape)}")
    rt = rt.to(rs.dtype)
    mask = _response_mask(rs, batch, boxes, labels, image, field)
    return _masked((rs - rt).abs().mean(1), mask)


__all__ = [
    "box_keypoints",
    "gaussian_mask",
    "keypoint_relations",
    "sample_points",
    "unidistill_feature",
    "unidistill_heatmap",
    "unidistill_regression",
    "unidistill_relation",
]
