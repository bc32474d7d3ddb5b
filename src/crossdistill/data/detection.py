"""Detection canvases: MNIST digits at seeded places with one box and class per digit, the
per-pixel label map of the same canvas, and degraded "second sensor" views.

Keys: ``image`` (the clean view, kind image), one ``image_<view>`` per extra view, ``seg``
(label map, 11 classes as in :mod:`~crossdistill.data.canvas`), ``boxes`` ``(M, 4)`` xyxy
pixels (far edge exclusive; kind boxes), ``box_labels`` ``(M,)`` digit class 0..9 or -1
(padding; kind label), ``idx``. ``M`` = ``max_digits``, the most objects on any canvas.

Digits do not overlap by default (``overlap=False``: windows placed by seeded rejection
sampling), so every box holds one digit's ink. Each digit is the central ``crop`` x ``crop``
(default 24) of its 28x28 MNIST frame: 99.8 % of the ink, and 1.7 digits per 56x56 canvas on
average at ``max_digits=3`` (whole frames fit two on a canvas too rarely: 1.09).
Views (computed on the raw [0, 1] canvas, then standardised by the statistics of a fixed
reference set, as ``canvas_dataset`` does):

* ``clean``: the canvas; ``blur``: a Gaussian blur (sigma 1.5); ``lowres``: 4x average-pooled
  and upsampled back (nearest); ``edge``: Sobel gradient magnitude; ``noisy``: blur plus
  Gaussian noise (sigma 0.3, seeded per canvas); ``distance``: two channels, the canvas and
  the Euclidean distance to the nearest ink pixel (scaled to [0, 1]; a richer teacher input).

``labelled_classes`` keeps boxes only for those digits (the others stay on the canvas, their
``box_labels`` -1: present but unlabelled, as a zero-shot detection split needs).
:func:`coco_records` turns the boxes into COCO-style records (images, annotations,
categories) for pycocotools or any COCO tool.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..schema import Depth, ImgSize, Prob
from .canvas import NORM_CANVASES, _check_int, paste
from .dataset import Dataset

VIEWS = ("clean", "blur", "lowres", "edge", "noisy", "distance")


def separated_plan(
    n_images: int, n: int, size: int, hw: tuple[int, int], max_digits: int, seed: int,
    tries: int = 200,
):
    """A seeded layout whose digit windows never overlap: each digit's corner is redrawn until
    its window is clear of the ones already placed (a canvas keeps fewer digits if ``tries``
    run out). Same return as :func:`~crossdistill.data.canvas.canvas_plan`."""
    h, w = hw
    if max_digits * h * w > size * size:
        raise ConfigError(
            "data.max_digits", max_digits, f"at most {size * size // (h * w)} digits of {h}x{w} "
            f"fit on a {size}x{size} canvas without overlap"
        )
    g = torch.Generator().manual_seed(int(seed))
    want = torch.randint(1, max_digits + 1, (n,), generator=g)
    src = torch.randint(0, n_images, (n, max_digits), generator=g)
    top = torch.zeros(n, max_digits, dtype=torch.long)
    left = torch.zeros(n, max_digits, dtype=torch.long)
    count = torch.zeros(n, dtype=torch.long)
    rs = torch.randint(0, size - h + 1, (n, max_digits, tries), generator=g)
    cs = torch.randint(0, size - w + 1, (n, max_digits, tries), generator=g)
    rs, cs, want = rs.tolist(), cs.tolist(), want.tolist()  # Python ints: 15x faster loop
    for i in range(n):
        placed: list[tuple[int, int]] = []
        for j in range(want[i]):
            for t in range(tries):
                r, c = rs[i][j][t], cs[i][j][t]
                if all(abs(r - r2) >= h or abs(c - c2) >= w for r2, c2 in placed):
                    placed.append((r, c))
                    break
        count[i] = len(placed)
        for j, (r, c) in enumerate(placed):
            top[i, j], left[i, j] = r, c
    return count, src, top, left


def _gauss_kernel(sigma: float) -> torch.Tensor:
    r = max(1, int(round(3 * sigma)))
    x = torch.arange(-r, r + 1, dtype=torch.float)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def _blur(x: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    k = _gauss_kernel(sigma)
    r = len(k) // 2
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))


def _distance(x: torch.Tensor, threshold: float) -> torch.Tensor:
    from scipy.ndimage import distance_transform_edt

    ink = (x[:, 0] > threshold).numpy()
    d = torch.stack([torch.from_numpy(distance_transform_edt(~m)).float() for m in ink])
    return (d / max(x.shape[-2:]))[:, None].clamp(0, 1)


def degrade(x: torch.Tensor, view: str, *, seed: int = 0, threshold: float = 0.5) -> torch.Tensor:
    """View ``view`` of raw canvases ``x`` ``(n, 1, H, W)`` in [0, 1] (see the module doc)."""
    if view not in VIEWS:
        raise ConfigError("data.views", view, f"allowed: {', '.join(VIEWS)}")
    if view == "clean":
        return x
    if view == "blur":
        return _blur(x)
    if view == "lowres":
        h, w = x.shape[-2:]
        small = F.avg_pool2d(x, 4, ceil_mode=True)
        return F.interpolate(small, scale_factor=4, mode="nearest")[..., :h, :w]
    if view == "edge":
        kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]).view(1, 1, 3, 3)
        p = F.pad(x, (1, 1, 1, 1), mode="replicate")
        return torch.sqrt(F.conv2d(p, kx) ** 2 + F.conv2d(p, kx.transpose(-1, -2)) ** 2) / 4
    if view == "noisy":
        g = torch.Generator().manual_seed(int(seed))
        return _blur(x) + 0.3 * torch.randn(x.shape, generator=g)
    return torch.cat([x, _distance(x, threshold)], 1)  # distance


def check_boxes(boxes: torch.Tensor, labels: torch.Tensor, hw: tuple[int, int],
                num_classes: int, field: str = "data.boxes") -> None:
    """Boxes inside the image and classes in range (padding rows, label -1, are skipped)."""
    if boxes.dim() != 3 or boxes.shape[-1] != 4:
        raise ConfigError(field, tuple(boxes.shape), "boxes (N, M, 4) xyxy pixels")
    if labels.shape != boxes.shape[:2]:
        raise ConfigError(field.rsplit(".", 1)[0] + ".box_labels", tuple(labels.shape),
                          f"one class per box, {tuple(boxes.shape[:2])}")
    real = labels >= 0
    if not real.any():
        return
    b = boxes[real]
    h, w = hw
    bad = (b[:, 0] < 0) | (b[:, 1] < 0) | (b[:, 2] > w) | (b[:, 3] > h) | (b[:, 2] <= b[:, 0]) | (
        b[:, 3] <= b[:, 1]
    )
    if bad.any():
        first = [round(float(v), 2) for v in b[bad][0]]
        raise ConfigError(
            field, first, f"xyxy boxes inside the {w}x{h} image with x1 < x2 and y1 < y2 "
            f"({int(bad.sum())} box(es) outside)"
        )
    top = int(labels[real].max())
    if top >= num_classes:
        raise ConfigError(field.rsplit(".", 1)[0] + ".box_labels", top,
                          f"classes 0..{num_classes - 1} (or -1 for padding)")


def detection_canvases(
    images, labels, n: int, size: int = 56, max_digits: int = 3, seed: int = 0,
    threshold: float = 0.5, overlap: bool = False,
):
    """Raw canvases ``(n, 1, S, S)`` in [0, 1], label maps, boxes and box classes; a pure
    function of its arguments."""
    from .canvas import canvas_plan

    images, labels = torch.as_tensor(images), torch.as_tensor(labels)
    n, size = _check_int("data.n", n), _check_int("data.size", size)
    max_digits = _check_int("data.max_digits", max_digits)
    hw = tuple(images.shape[-2:])
    if hw[0] > size or hw[1] > size:
        raise ConfigError("data.size", size, f"at least the digit size {hw[0]}x{hw[1]}")
    plan_fn = canvas_plan if overlap else separated_plan
    plan = plan_fn(len(images), n, size, hw, max_digits, seed)
    return paste(images, labels, plan, size, threshold)


def _check_crop(crop, side: int) -> int:
    if isinstance(crop, bool) or not isinstance(crop, int) or not 8 <= crop <= side:
        raise ConfigError("data.crop", crop, f"an int in 8..{side} (the digit window's side)")
    return crop


def _central(x: torch.Tensor, crop: int) -> torch.Tensor:
    """The central ``crop`` x ``crop`` window of each digit. MNIST centres each digit's mass
    in a 28x28 frame with empty margins; 24x24 keeps 99.8 % of the ink (threshold 0.5) and
    lets 2-3 digits share a 56x56 canvas without overlap (whole frames rarely fit two)."""
    m = (x.shape[-1] - crop) // 2
    return x[..., m:m + crop, m:m + crop]


def detection_dataset(
    split: str,
    n: int,
    *,
    root: str | None = None,
    size: ImgSize = 56,
    max_digits: Depth = 3,
    seed: int = 0,
    threshold: Prob = 0.5,
    views: list[str] | tuple[str, ...] = ("clean",),
    overlap: bool = False,
    labelled_classes: list[int] | None = None,
    normalize: bool = True,
    crop: ImgSize = 24,
) -> Dataset:
    """``n`` detection canvases from the digits of MNIST split ``split`` (module doc)."""
    from . import SPLITS, load

    if split not in SPLITS:
        raise ConfigError("data.split", split, f"allowed: {', '.join(SPLITS)}")
    views = [views] if isinstance(views, str) else list(views)
    for v in views:
        if v not in VIEWS:
            raise ConfigError("data.views", v, f"allowed: {', '.join(VIEWS)}")
    if labelled_classes is not None:
        bad = [c for c in labelled_classes if not (isinstance(c, int) and 0 <= c <= 9)]
        if bad or not labelled_classes:
            raise ConfigError("data.labelled_classes", bad or labelled_classes,
                              "a non-empty list of digits 0..9")
    src = load("mnist", split, root=root, normalize=False)
    crop = _check_crop(crop, src.x.shape[-1])
    split_seed = int(seed) * 1_000_003 + SPLITS.index(split)
    canvas, seg, boxes, box_labels = detection_canvases(
        _central(src.x, crop), src.y, n, size, max_digits, split_seed, threshold, overlap
    )
    if labelled_classes is not None:
        keep = torch.isin(box_labels, torch.tensor(labelled_classes))
        box_labels = torch.where(keep, box_labels, torch.full_like(box_labels, -1))
    ref = None
    if normalize:
        train = src if split == "train" else load("mnist", "train", root=root, normalize=False)
        ref, *_ = detection_canvases(_central(train.x, crop), train.y, NORM_CANVASES, size,
                                     max_digits, 0,
                                     threshold, overlap)
    tensors, kinds, info = {}, {}, {"views": {}}
    for v in ["clean", *[v for v in views if v != "clean"]]:
        x = degrade(canvas, v, seed=split_seed, threshold=threshold)
        if ref is not None:
            r = degrade(ref, v, seed=0, threshold=threshold)
            mean, std = r.mean((0, 2, 3), keepdim=True), r.std((0, 2, 3), keepdim=True)
            x = (x - mean) / std.clamp_min(1e-6)
            info["views"][v] = {"mean": mean.flatten().tolist(), "std": std.flatten().tolist()}
        key = "image" if v == "clean" else f"image_{v}"
        tensors[key], kinds[key] = x, "image"
    tensors.update(seg=seg, boxes=boxes, box_labels=box_labels, idx=torch.arange(n))
    kinds.update(seg="label_map", boxes="boxes", box_labels="label", idx="id")
    info.update(
        construction=f"{size}x{size} canvases with 1..{max_digits} MNIST '{split}' digits "
        f"({'overlapping' if overlap else 'non-overlapping'}), one tight ink box per digit",
        size=size, max_digits=max_digits, seed=seed, threshold=threshold, root=root, crop=crop,
        img_size=size, max_objects=max_digits, labelled_classes=labelled_classes,
        num_classes=10,
    )
    return Dataset(tensors, kinds, name="mnist-detection", split=split, num_classes=10,
                   info=info)


def coco_records(boxes: torch.Tensor, labels: torch.Tensor, hw: tuple[int, int],
                 ids: torch.Tensor | None = None, num_classes: int = 10) -> dict:
    """COCO-style ground truth (``images``, ``annotations`` with ``bbox`` = [x, y, w, h],
    ``area``, ``iscrowd`` 0, ``categories``) for padded ``boxes (N, M, 4)`` / ``labels``."""
    from ..boxes import valid_boxes

    n = len(boxes)
    ids = torch.arange(n) if ids is None else ids
    ok = valid_boxes(boxes, labels)
    images = [{"id": int(i), "height": hw[0], "width": hw[1]} for i in ids]
    anns = []
    for i, j in ok.nonzero().tolist():
        x1, y1, x2, y2 = (float(v) for v in boxes[i, j])
        anns.append({
            "id": len(anns) + 1, "image_id": int(ids[i]), "category_id": int(labels[i, j]),
            "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
        })
    cats = [{"id": c, "name": str(c)} for c in range(num_classes)]
    return {"images": images, "annotations": anns, "categories": cats}
