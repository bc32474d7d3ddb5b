"""EZAD: distil a vision-language model's region embeddings into a detector so it finds
classes nobody boxed (zero-shot annotation detection: novel objects are on the training
images, unlabelled).

Paper: Liu, Hu & Nevatia, "Efficient Feature Distillation for Zero-shot Annotation Object
Detection" (EZAD), WACV 2024 (arXiv 2303.12145). Official code: dragonlzm/EZAD (facts used:
``configs/cls_finetuner/*`` -- only the image encoder's LayerNorms trained, sigmoid CE against
"a photo of a {}" text classifiers of the base classes, AdamW lr 1e-4, wd 1e-4, grad clip 0.1,
12 epochs; ``cls_proposal_generator.py`` -- anchors over the image, each crop square-padded
and scored by CLIP's softmax over the category names, score = max confidence, NMS 0.5;
``standard_roi_head_distillation.py`` -- L1 between unit embeddings, per-box weights
rescaled per image, weight 1; ``ConvFCEmbeddingBBoxHead`` -- cosine to the text embeddings
x 100). Steps, each a function here:

1. the CLIP stand-in (``ezad-clip``, :mod:`crossdistill.models.ezad`), trained on whole MNIST
   digits of every class with CE over the MiniLM prompt embeddings (the teacher's job only);
2. :func:`adapt_ln`: EZAD's domain adaptation, LayerNorms only, on base-class canvas crops
   (:func:`gt_crops`) with ``ezad_sigmoid_ce`` over the base classes' texts;
3. :func:`propose` + :func:`distill_targets`: the distillation regions -- the labelled (base)
   boxes plus teacher proposals likely to hold novel classes: anchors (a class-agnostic
   source) that hold some ink (our objectness prior: empty crops are background), scored
   by the teacher's max softmax over all class names, kept when that class is novel (our
   reading of the code's "base filtered" proposals), NMS, top ``k``; weight 1 for a box,
   the score for a proposal; the teacher's unit embeddings of their crops precomputed;
4. the recipe ``ezad`` on the embedding detector (``ezad-centernet``): ``ezad_detect`` on the
   base labels + ``distill_weight`` x ``ezad_distill``.

Variants (:data:`VARIANTS`, for the claim): ``ezad`` (adapted teacher, boxes + proposals),
``raw-gt`` (raw teacher, boxes only: the base-biased regions), the two crossings, and
``base-only`` (no distillation: novel AP ~ 0). Novel-class AP: the detection task's
``classes`` option (:func:`novel_map`).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from ..distiller import Term
from ..errors import ConfigError
from ..registry import METHODS
from ..schema import NonNeg
from . import Recipe

BASE, NOVEL = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
REGIONS = ("gt", "gt+proposals", "proposals")
KEYS = ("distill_boxes", "distill_embeds", "distill_weights")
VARIANTS = {
    "ezad": dict(adapted=True, regions="gt+proposals", distill=True),
    "raw-gt": dict(adapted=False, regions="gt", distill=True),
    "adapted-gt": dict(adapted=True, regions="gt", distill=True),
    "raw-proposals": dict(adapted=False, regions="gt+proposals", distill=True),
    "base-only": dict(adapted=False, regions=None, distill=False),
}


def _classes(field: str, classes, k: int = 10) -> list[int]:
    c = list(classes) if isinstance(classes, (list, tuple)) else classes
    if not isinstance(c, list) or not c or len(set(c)) != len(c) or any(
            isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < k for v in c):
        raise ConfigError(field, classes, f"a non-empty list of distinct class ids 0..{k - 1}")
    return c


def raw_canvases(data, key: str = "image") -> Tensor:
    """A detection split's images back in raw [0, 1] intensities (undoing the standardisation
    recorded in ``info["views"]["clean"]``; images without it are taken as raw)."""
    x = data[key]
    view = (getattr(data, "info", None) or {}).get("views", {}).get("clean")
    if not view:
        return x
    mean = torch.tensor(view["mean"], dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(view["std"], dtype=x.dtype).view(1, -1, 1, 1)
    return x * std + mean


# -- step 2: LayerNorm adaptation -------------------------------------------------------------
def gt_crops(data, classes=BASE, size: int = 28, image: str = "image", enlarge: float = 1.0):
    """A classification dataset ``{"x": crops, "y": class}`` of the labelled boxes of
    ``classes`` (raw intensities, :func:`~crossdistill.models.ezad.crop_boxes`)."""
    from ..data.dataset import Dataset
    from ..models.ezad import crop_boxes

    classes = _classes("ezad.classes", classes)
    raw, boxes, labels = raw_canvases(data, image), data["boxes"], data["box_labels"]
    keep = torch.isin(labels, torch.tensor(classes)) & (
        (boxes[..., 2:] - boxes[..., :2]) > 0).all(-1)
    crops = crop_boxes(raw, boxes, size, enlarge=enlarge)[keep]
    if len(crops) == 0:
        raise ConfigError("ezad.classes", classes, "classes with labelled boxes in the data")
    return Dataset.classification(crops, labels[keep], name="ezad-crops", split=data.split)


def adapt_ln(encoder, crops, val=None, *, classes=BASE, epochs: int = 12, lr: float = 1e-4,
             weight_decay: float = 1e-4, grad_clip: float = 0.1, batch_size: int = 64,
             seed: int = 0, **trainer):
    """A copy of the CLIP stand-in with only its normalisation layers trained (EZAD's
    ``open_ln``) on ``crops`` with ``ezad_sigmoid_ce`` over ``classes`` (AdamW, the official
    lr / decay / clip / epochs as defaults); returned frozen, in eval mode."""
    from ..distiller import Distiller
    from ..train import Trainer

    classes = _classes("ezad.classes", classes, len(encoder.texts))
    enc = copy.deepcopy(encoder).train()
    norms = {id(p) for _, p in enc.norm_parameters()}
    if not norms:
        raise ConfigError("ezad.teacher", type(enc).__name__, "an encoder with norm layers")
    for p in enc.parameters():
        p.requires_grad_(id(p) in norms)
    d = Distiller(enc, None, [Term("ezad_sigmoid_ce", classes=classes)])
    torch.manual_seed(seed)
    Trainer(d, crops, val, epochs=epochs, optimizer="adamw", lr=lr, weight_decay=weight_decay,
            grad_clip=grad_clip, batch_size=batch_size, seed=seed,
            **{"progress": False, **trainer}).fit()
    return enc.eval().requires_grad_(False)


# -- step 3: regions and their teacher embeddings --------------------------------------------------
def anchor_boxes(hw: tuple[int, int], stride: int = 4, sizes=(12.0, 16.0, 20.0),
                 ratios=(1.0, 1.5, 2.0)) -> Tensor:
    """``(A, 4)`` xyxy anchors: centres every ``stride`` px (half a stride in), each of the
    ``sizes`` (sqrt of the area) at each ``ratios`` (height / width), clipped to the image."""
    h, w = hw
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ConfigError("ezad.stride", stride, "a positive int (pixels)")
    if not sizes or not ratios or any(not v > 0 for v in (*sizes, *ratios)):
        raise ConfigError("ezad.anchors", (sizes, ratios), "non-empty positive sizes/ratios")
    ys = torch.arange(stride / 2, h, stride, dtype=torch.float)
    xs = torch.arange(stride / 2, w, stride, dtype=torch.float)
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    shapes = torch.tensor([[s / r**0.5, s * r**0.5] for s in sizes for r in ratios])  # (w, h)
    c = torch.stack([cx, cy], -1).reshape(-1, 1, 2)
    half = shapes[None] / 2
    a = torch.cat([c - half, c + half], -1).reshape(-1, 4)
    return torch.stack([a[:, 0].clamp(0, w), a[:, 1].clamp(0, h), a[:, 2].clamp(0, w),
                        a[:, 3].clamp(0, h)], -1)


def nms(boxes: Tensor, scores: Tensor, iou: float = 0.5) -> Tensor:
    """Indices kept by greedy non-maximum suppression, best score first."""
    from ..boxes import pairwise_iou

    order = scores.argsort(descending=True)
    if len(order) == 0:
        return order
    ov, _ = pairwise_iou(boxes[order], boxes[order])
    keep, gone = [], torch.zeros(len(order), dtype=torch.bool)
    for i in range(len(order)):
        if gone[i]:
            continue
        keep.append(i)
        gone |= ov[i] > iou
    return order[torch.tensor(keep, dtype=torch.long)]


def ink_fraction(raw: Tensor, boxes: Tensor, threshold: float = 0.5) -> Tensor:
    """Share of ink pixels (``raw > threshold``, channel 0) inside each box ``(N, A, 4)`` ->
    ``(N, A)`` (box edges rounded to pixels; integral image)."""
    ink = (raw[:, 0] > threshold).to(torch.float64)
    ii = torch.nn.functional.pad(ink.cumsum(1).cumsum(2), (1, 0, 1, 0))  # (N, H+1, W+1)
    b = boxes.round().long()
    x1, y1, x2, y2 = b.unbind(-1)
    n = torch.arange(len(raw))[:, None]
    total = ii[n, y2, x2] - ii[n, y1, x2] - ii[n, y2, x1] + ii[n, y1, x1]
    area = ((x2 - x1) * (y2 - y1)).clamp_min(1)
    return (total / area).float()


@torch.no_grad()
def _probs(encoder, crops: Tensor, chunk: int) -> Tensor:
    out = [encoder(crops[i:i + chunk]).softmax(-1) for i in range(0, len(crops), chunk)]
    return torch.cat(out) if out else crops.new_zeros(0, len(encoder.texts))


@torch.no_grad()
def _embed(encoder, crops: Tensor, chunk: int) -> Tensor:
    out = [encoder.embed(crops[i:i + chunk]) for i in range(0, len(crops), chunk)]
    return torch.cat(out) if out else crops.new_zeros(0, encoder.texts.shape[1])


@torch.no_grad()
def propose(encoder, raw: Tensor, *, novel=NOVEL, k: int = 4, stride: int = 4,
            sizes=(12.0, 16.0, 20.0), ratios=(1.0, 1.5, 2.0), nms_iou: float = 0.5,
            min_ink: float = 0.05, crop: int = 28, enlarge: float = 1.0,
            chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """EZAD's CLIP proposals: per image the ``k`` best anchors whose crop the teacher
    assigns to a ``novel`` class (score = its max softmax probability over all class names),
    among those with at least ``min_ink`` ink, after NMS at ``nms_iou``. Returns boxes
    ``(N, k, 4)`` and scores ``(N, k)`` (0 where fewer were found)."""
    from ..models.ezad import crop_boxes

    novel = _classes("ezad.novel", novel, len(encoder.texts))
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError("ezad.k", k, "a positive int (proposals per image)")
    if not 0 <= nms_iou <= 1 or not 0 <= min_ink <= 1:
        raise ConfigError("ezad.nms_iou", (nms_iou, min_ink), "nms_iou and min_ink in [0, 1]")
    was = encoder.training
    encoder.eval()
    anchors = anchor_boxes(tuple(raw.shape[-2:]), stride, sizes, ratios)
    n, a = len(raw), len(anchors)
    out_boxes, out_scores = torch.zeros(n, k, 4), torch.zeros(n, k)
    per = max(1, chunk // a)
    nov = torch.tensor(novel)
    for i0 in range(0, n, per):
        imgs = raw[i0:i0 + per]
        boxes = anchors.expand(len(imgs), a, 4)
        p = _probs(encoder, crop_boxes(imgs, boxes, crop, enlarge=enlarge).flatten(0, 1), chunk)
        score, cls = p.view(len(imgs), a, -1).max(-1)
        ok = torch.isin(cls, nov) & (ink_fraction(imgs, boxes) >= min_ink)
        for j in range(len(imgs)):
            cand = ok[j].nonzero().flatten()
            keep = cand[nms(anchors[cand], score[j, cand], nms_iou)][:k]
            out_boxes[i0 + j, :len(keep)] = anchors[keep]
            out_scores[i0 + j, :len(keep)] = score[j, keep]
    encoder.train(was)
    return out_boxes, out_scores


@torch.no_grad()
def distill_targets(encoder, data, *, regions: str = "gt+proposals", novel=NOVEL, k: int = 4,
                    crop: int = 28, enlarge: float = 1.0, chunk: int = 4096,
                    image: str = "image", **proposal):
    """``data`` plus EZAD's precomputed distillation regions: ``distill_boxes (N, R, 4)``,
    ``distill_embeds (N, R, D)`` (the teacher's unit embeddings of the crops),
    ``distill_weights (N, R)`` (1 per labelled box, the score per proposal, 0 = padding).
    ``regions``: ``"gt"`` (labelled boxes only: base-biased), ``"gt+proposals"`` (EZAD),
    ``"proposals"``; ``crop`` / ``enlarge``: the teacher's crop size and context factor;
    ``proposal``: :func:`propose`'s other settings."""
    from ..data.dataset import Dataset
    from ..models.ezad import crop_boxes

    if regions not in REGIONS:
        raise ConfigError("ezad.regions", regions, f"one of {', '.join(REGIONS)}")
    was = encoder.training
    encoder.eval()
    raw = raw_canvases(data, image)
    parts_b, parts_w = [], []
    if regions != "proposals":
        gt, lab = data["boxes"].float(), data["box_labels"]
        ok = (lab >= 0) & ((gt[..., 2:] - gt[..., :2]) > 0).all(-1)
        parts_b.append(torch.where(ok[..., None], gt, torch.zeros_like(gt)))
        parts_w.append(ok.float())
    if regions != "gt":
        pb, ps = propose(encoder, raw, novel=novel, k=k, crop=crop, enlarge=enlarge, chunk=chunk,
                         **proposal)
        parts_b.append(pb)
        parts_w.append(ps)
    boxes, weights = torch.cat(parts_b, 1), torch.cat(parts_w, 1)
    n, r = weights.shape
    emb = torch.zeros(n, r, encoder.texts.shape[1])
    per = max(1, chunk // max(r, 1))
    for i0 in range(0, n, per):
        crops = crop_boxes(raw[i0:i0 + per], boxes[i0:i0 + per], crop, enlarge=enlarge)
        crops = crops.flatten(0, 1)
        emb[i0:i0 + per] = _embed(encoder, crops, chunk).view(-1, r, emb.shape[-1])
    emb = emb * (weights > 0)[..., None]
    encoder.train(was)
    tensors = {**data.tensors, "distill_boxes": boxes, "distill_embeds": emb,
               "distill_weights": weights}
    kinds = {**data.kinds, "distill_boxes": "boxes", "distill_embeds": "value",
             "distill_weights": "value"}
    info = {**data.info, "ezad": {"regions": regions, "k": k, "novel": list(novel)}}
    return Dataset(tensors, kinds, name=data.name, split=data.split,
                   num_classes=data.num_classes, info=info)


def variant_data(name: str, train, raw_teacher, adapted_teacher, **kw):
    """(training data, distill weight) of one of :data:`VARIANTS`: ``train`` with the regions
    and embeddings of the variant's teacher (``raw_teacher`` or ``adapted_teacher``)."""
    if name not in VARIANTS:
        raise ConfigError("ezad.variant", name, f"one of {', '.join(VARIANTS)}")
    v = VARIANTS[name]
    if not v["distill"]:
        return train, 0.0
    teacher = adapted_teacher if v["adapted"] else raw_teacher
    return distill_targets(teacher, train, regions=v["regions"], **kw), 1.0


def novel_map(model, data, classes=NOVEL, batch_size: int = 64) -> dict[str, float]:
    """COCO mAP of a detector on ``classes`` only (default the novel digits), through the
    detection task's ``classes`` option; ``data`` must label those classes."""
    from ..train import evaluate

    classes = _classes("ezad.classes", classes)
    return evaluate(model, data, batch_size, task={"name": "detection", "classes": classes})


# -- step 4: the recipe ----------------------------------------------------------------------------
@METHODS.register(
    "ezad",
    paper="Efficient Feature Distillation for Zero-shot Annotation Object Detection",
    year=2024,
    family="detection",
)
def ezad(
    student,
    teacher=None,
    *,
    base_classes: list[int] | None = None,
    distill_weight: NonNeg = 1.0,
    cls_weight: NonNeg = 1.0,
    size_weight: NonNeg = 0.1,
    offset_weight: NonNeg = 1.0,
) -> Recipe:
    """``ezad_detect`` on the base labels (objectness focal + size / offset L1 + cosine-to-text
    CE over ``base_classes``, default 0-4) + ``distill_weight`` x ``ezad_distill`` (EZAD's
    L1 on unit region embeddings, weight 1; 0 = the base-only detector). The teacher ran
    offline: the data carries its regions (:func:`distill_targets`), so ``teacher`` is None."""
    from ..models.ezad import EmbeddingCenterNet

    if not isinstance(student, EmbeddingCenterNet):
        raise ConfigError("method.student", type(student).__name__,
                          "ezad trains crossdistill.models.ezad.EmbeddingCenterNet "
                          "(model ezad-centernet)")
    if teacher is not None:
        raise ConfigError("method.teacher", type(teacher).__name__,
                          "None: EZAD's teacher runs offline (methods.ezad.distill_targets)")
    for f, v in (("distill_weight", distill_weight), ("cls_weight", cls_weight),
                 ("size_weight", size_weight), ("offset_weight", offset_weight)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise ConfigError(f"ezad.{f}", v, "a number >= 0")
    base = _classes("ezad.base_classes", BASE if base_classes is None else base_classes,
                    len(student.texts))
    taps = ["output.objectness", "output.class_logits", "output.size", "output.offset"]
    terms = [Term("ezad_detect", student=taps, teacher=None, classes=base,
                  cls_weight=float(cls_weight), size_weight=float(size_weight),
                  offset_weight=float(offset_weight))]
    if distill_weight > 0:
        terms.append(Term("ezad_distill", student="output.embed", teacher=None,
                          weight=float(distill_weight)))
    note = f"ezad: base classes {base}" + (", region distillation" if distill_weight else "")
    return Recipe(terms, note=note)


__all__ = [
    "BASE",
    "NOVEL",
    "VARIANTS",
    "adapt_ln",
    "anchor_boxes",
    "distill_targets",
    "ezad",
    "gt_crops",
    "ink_fraction",
    "nms",
    "novel_map",
    "propose",
    "raw_canvases",
    "variant_data",
]
