"""CLoCKDistill's two terms and the Hungarian-matched logit KD it is compared with.

Paper: Lan et al., "CLoCKDistill: Consistent Location-and-Context-aware Knowledge
Distillation for DETRs", 2025. The official code (lanqz7766/CLoCKDistill) is cited but could
not be obtained: the forms below follow the abstract and methods/dense.md, and the weights
and the foreground boost are our inference.

* ``clock_memory``: MSE between the projected student *memory* (the DETR encoder's output,
  not the backbone) and the teacher's, per token weighted by a ground-truth location mask:
  ``w_n = 1 + fg_boost * [token n's centre lies in a box]``,
  ``L = sum_n w_n mean_d (P(m_s)_n - m_t_n)^2 / sum_n w_n``.
* ``clock_query``: both decoders run the same *target-aware queries* (built from the ground
  truth; ``models.detect.TinyDETR``'s ``target_queries``), so their outputs correspond one to
  one and need no matching: ``L = T^2 KL(p_t^T || p_s^T) + l1 |b_s - b_t|_1 + giou (1 -
  GIoU(b_s, b_t))`` per real object, mean over objects.
* ``matched_kd`` (the baseline the claim names): the same logit + box terms between the
  learned queries after a Hungarian matching of student to teacher predictions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..boxes import cxcywh_to_xyxy, pairwise_giou, valid_boxes
from ..errors import ConfigError
from ..registry import LOSSES
from ..schema import NonNeg, Temperature
from .divergences import kl_terms
from .features import _upcast


def token_grid(n: int, hw: tuple[int, int], field: str) -> tuple[int, int]:
    """The (rows, cols) grid of ``n`` tokens over an ``hw`` image (same aspect ratio)."""
    h, w = hw
    rows = max(1, round(h * math.sqrt(n / (h * w))))
    if n % rows or rows * (n // rows) != n:
        raise ConfigError(field, n, f"a token count that tiles the {h}x{w} image as a grid")
    return rows, n // rows


def box_token_mask(boxes: Tensor, labels: Tensor, grid: tuple[int, int],
                   hw: tuple[int, int]) -> Tensor:
    """``(B, N)`` True where a token's cell centre lies inside a real ground-truth box."""
    gh, gw = grid
    ys = (torch.arange(gh, device=boxes.device, dtype=boxes.dtype) + 0.5) * hw[0] / gh
    xs = (torch.arange(gw, device=boxes.device, dtype=boxes.dtype) + 0.5) * hw[1] / gw
    cy, cx = ys.view(1, 1, gh, 1), xs.view(1, 1, 1, gw)
    b = boxes[..., None, None]
    inside = (cx >= b[:, :, 0]) & (cx < b[:, :, 2]) & (cy >= b[:, :, 1]) & (cy < b[:, :, 3])
    inside = inside & valid_boxes(boxes, labels)[..., None, None]
    return inside.any(1).flatten(1)


@LOSSES.register(
    "clock_memory",
    paper="CLoCKDistill: Consistent Location-and-Context-aware Knowledge Distillation for DETRs",
    year=2025,
    inputs="features",
    default_weight=1.0,
)
def clock_memory(
    s: Tensor,
    t: Tensor,
    *,
    batch,
    boxes: str = "boxes",
    labels: str = "box_labels",
    image: str = "image",
    fg_boost: NonNeg = 4.0,
) -> Tensor:
    """Location-weighted memory MSE (module doc). ``s``, ``t``: ``(B, N, D)`` memories
    (the student's projected to ``D``)."""
    if s.shape != t.shape or s.dim() != 3:
        raise ConfigError("terms.clock_memory.student", tuple(s.shape),
                          f"memory tokens (B, N, D) matching the teacher's {tuple(t.shape)} "
                          "(use projector: linear)")
    for k in (boxes, labels, image):
        if batch is None or k not in batch:
            raise ConfigError("terms.clock_memory.boxes", k, "a batch key")
    hw = tuple(batch[image].shape[-2:])
    grid = token_grid(s.shape[1], hw, "terms.clock_memory.student")
    fg = box_token_mask(batch[boxes].to(s.device, s.dtype), batch[labels].to(s.device), grid, hw)
    w = 1.0 + fg_boost * fg.to(s.dtype)
    per = (_upcast(s) - _upcast(t.detach())).pow(2).mean(-1)
    return (w * per).sum() / w.sum()


def _pair_loss(ls: Tensor, bs: Tensor, lt: Tensor, bt: Tensor, temperature: float,
               l1_weight: float, giou_weight: float) -> Tensor:
    """Summed logit KL (x T^2) + box L1 + (1 - GIoU) over matched rows ``(R, .)``."""
    if len(ls) == 0:
        return ls.sum() * 0.0
    T = temperature
    log_q = torch.log_softmax(_upcast(ls) / T, -1)
    log_p = torch.log_softmax(_upcast(lt.detach()) / T, -1)
    klv = kl_terms(log_p, log_q).sum(-1) * T * T
    bs, bt = _upcast(bs), _upcast(bt.detach())
    l1 = (bs - bt).abs().sum(-1)
    giou = 1 - pairwise_giou(cxcywh_to_xyxy(bs), cxcywh_to_xyxy(bt)).diagonal()
    return (klv + l1_weight * l1 + giou_weight * giou).sum()


@LOSSES.register(
    "clock_query",
    paper="CLoCKDistill: Consistent Location-and-Context-aware Knowledge Distillation for DETRs",
    year=2025,
    inputs="logits",
    default_weight=1.0,
)
def clock_query(
    s: list[Tensor],
    t: list[Tensor],
    *,
    batch,
    boxes: str = "boxes",
    labels: str = "box_labels",
    temperature: Temperature = 1.0,
    l1_weight: NonNeg = 5.0,
    giou_weight: NonNeg = 2.0,
) -> Tensor:
    """Target-aware query KD (module doc). ``s``, ``t`` = ``[target_logits (B, M, K+1),
    target_boxes (B, M, 4)]``; row ``m`` of both answers the same ground-truth object."""
    (ls, bs), (lt, bt) = s, t
    if ls.shape != lt.shape or bs.shape != bt.shape:
        raise ConfigError("terms.clock_query.student", tuple(ls.shape),
                          f"target-query outputs shaped like the teacher's {tuple(lt.shape)}")
    if batch is None or boxes not in batch or labels not in batch:
        raise ConfigError("terms.clock_query.boxes", boxes, "batch keys of the targets")
    ok = valid_boxes(batch[boxes], batch[labels]).to(ls.device)
    if ok.shape != ls.shape[:2]:
        raise ConfigError("terms.clock_query.student", tuple(ls.shape[:2]),
                          f"one target query per padded object {tuple(ok.shape)}")
    total = _pair_loss(ls[ok], bs[ok], lt[ok], bt[ok], temperature, l1_weight, giou_weight)
    return total / ok.sum().clamp_min(1)


@LOSSES.register(
    "matched_kd",
    paper="DETR distillation with Hungarian-matched logits (the baseline CLoCKDistill names)",
    year=2025,
    inputs="logits",
    default_weight=1.0,
)
def matched_kd(
    s: list[Tensor],
    t: list[Tensor],
    *,
    temperature: Temperature = 1.0,
    l1_weight: NonNeg = 5.0,
    giou_weight: NonNeg = 2.0,
) -> Tensor:
    """Logit + box KD between learned queries: each student query is matched one to one to a
    teacher query (scipy's ``linear_sum_assignment`` on ``|p_s - p_t|_1 + l1 |b_s - b_t|_1``),
    then the ``clock_query`` terms on the pairs, mean over the teacher's queries."""
    from scipy.optimize import linear_sum_assignment

    (ls, bs), (lt, bt) = s, t
    if ls.shape[-1] != lt.shape[-1]:
        raise ConfigError("terms.matched_kd.student", tuple(ls.shape),
                          f"the teacher's class count ({lt.shape[-1]})")
    ps, pt = ls.detach().float().softmax(-1), lt.detach().float().softmax(-1)
    rows_s, rows_t = [], []
    for i in range(len(ls)):
        cost = torch.cdist(ps[i], pt[i], p=1) + l1_weight * torch.cdist(
            bs[i].detach().float(), bt[i].detach().float(), p=1
        )
        a, b = linear_sum_assignment(cost.cpu().numpy())
        rows_s += [i * ls.shape[1] + int(j) for j in a]
        rows_t += [i * lt.shape[1] + int(j) for j in b]
    si = torch.tensor(rows_s, device=ls.device)
    ti = torch.tensor(rows_t, device=ls.device)
    flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
    total = _pair_loss(flat(ls)[si], flat(bs)[si], flat(lt)[ti], flat(bt)[ti], temperature,
                       l1_weight, giou_weight)
    return total / max(1, len(ti))


@LOSSES.register(
    "query_recon",
    paper="DN-DETR: Accelerate DETR Training by Introducing Query DeNoising (target queries)",
    year=2022,
    inputs="labels",
    default_weight=1.0,
)
def query_recon(
    s: list[Tensor],
    t=None,
    *,
    batch,
    boxes: str = "boxes",
    labels: str = "box_labels",
    image: str = "image",
    l1_weight: NonNeg = 5.0,
    giou_weight: NonNeg = 2.0,
) -> Tensor:
    """Teaches a DETR's target-query branch to answer its ground-truth queries (as DN-DETR
    trains its denoising queries): CE to the object's class + L1 (normalised cxcywh) + 1 -
    GIoU to its box, mean over real objects. A teacher trained with it gives CLoCKDistill's
    target-aware queries meaningful outputs. ``s = [target_logits, target_boxes]``."""
    from ..boxes import xyxy_to_cxcywh

    ls, bs = s
    if batch is None or any(k not in batch for k in (boxes, labels, image)):
        raise ConfigError("terms.query_recon.boxes", boxes, "batch keys of the targets")
    gt, lab = batch[boxes].to(ls.device).float(), batch[labels].to(ls.device)
    ok = valid_boxes(gt, lab)
    h, w = batch[image].shape[-2:]
    tgt = xyxy_to_cxcywh(gt[ok] / gt.new_tensor([w, h, w, h]))
    if not ok.any():
        return ls.sum() * 0.0
    ce = torch.nn.functional.cross_entropy(ls[ok].float(), lab[ok], reduction="sum")
    src = bs[ok].float()
    l1 = (src - tgt).abs().sum()
    giou = (1 - pairwise_giou(cxcywh_to_xyxy(src), cxcywh_to_xyxy(tgt)).diagonal()).sum()
    return (ce + l1_weight * l1 + giou_weight * giou) / ok.sum()
