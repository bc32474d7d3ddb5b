"""Multi-digit segmentation canvases built from MNIST digits (real pixels, synthetic layout).

A canvas is a ``size x size`` black image with 1..``max_digits`` digits pasted at seeded
random places; its label map gives every pixel its class: 0 = background, ``d + 1`` where
a digit ``d`` has ink (intensity > ``threshold``). Digits may overlap: ink is combined
with a pixel-wise max (ink adds, as on paper) and the later digit owns the overlapping ink
pixels in the label map. This gives a dense-prediction task (11 classes) from the offline
MNIST copy alone, so segmentation teachers and students run on real digits.

Splits use disjoint source digits: a canvas split draws only from the MNIST split of the
same name (``crossdistill.data.load``'s fixed 6,000/2,000/2,000 split of the 10k set).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..schema import Depth, ImgSize, Prob
from .dataset import Dataset

NUM_CLASSES = 11  # background + digits 0..9
NORM_CANVASES = 1000  # train canvases the normalisation statistics come from (seed 0)


def _check_int(field: str, v, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ConfigError(field, v, f"an int >= {lo}")
    return v


def canvas_plan(n_images: int, n: int, size: int, hw: tuple[int, int], max_digits: int, seed: int):
    """The seeded layout: ``count (n,)``, ``src (n, max_digits)`` image indices, and top-left
    corners ``top, left (n, max_digits)``; only the first ``count[i]`` columns are used.
    Separate from the pasting so the source digits of a layout can be inspected."""
    h, w = hw
    g = torch.Generator().manual_seed(int(seed))
    count = torch.randint(1, max_digits + 1, (n,), generator=g)
    src = torch.randint(0, n_images, (n, max_digits), generator=g)
    top = torch.randint(0, size - h + 1, (n, max_digits), generator=g)
    left = torch.randint(0, size - w + 1, (n, max_digits), generator=g)
    return count, src, top, left


def make_canvases(
    images: torch.Tensor,
    labels: torch.Tensor,
    n: int,
    size: int = 64,
    max_digits: int = 4,
    seed: int = 0,
    threshold: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` canvases ``(n, 1, size, size)`` float in [0, 1] and label maps ``(n, size, size)``
    long from digit images ``(N, 1, h, w)`` in [0, 1] with labels ``(N,)``; a pure function
    of its arguments."""
    images, labels = torch.as_tensor(images), torch.as_tensor(labels)
    if images.dim() != 4 or images.shape[1] != 1 or not images.is_floating_point():
        raise ConfigError("data.images", tuple(images.shape), "float images (N, 1, h, w)")
    if labels.shape != (len(images),) or labels.is_floating_point() or len(labels) == 0:
        raise ConfigError("data.labels", tuple(labels.shape), f"{len(images)} integer labels")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES - 1:
        raise ConfigError("data.labels", int(labels.max()), "digit labels in 0..9")
    n, size = _check_int("data.n", n), _check_int("data.size", size)
    max_digits = _check_int("data.max_digits", max_digits)
    h, w = images.shape[-2:]
    if h > size or w > size:
        raise ConfigError("data.size", size, f"at least the digit size {h}x{w}")
    plan = canvas_plan(len(images), n, size, (h, w), max_digits, seed)
    canvas, seg, _, _ = paste(images, labels, plan, size, threshold)
    return canvas, seg


def paste(images, labels, plan, size: int, threshold: float = 0.5):
    """Canvases, label maps, and per digit its tight ink box ``(n, max_digits, 4)`` (xyxy
    pixels, far edge exclusive; the whole window if a digit has no ink above ``threshold``)
    and class ``(n, max_digits)`` (-1 for the unused columns), from a layout ``plan`` =
    ``(count, src, top, left)`` as :func:`canvas_plan` returns."""
    count, src, top, left = plan
    n, m = src.shape
    h, w = images.shape[-2:]
    canvas = torch.zeros(n, 1, size, size)
    seg = torch.zeros(n, size, size, dtype=torch.long)
    boxes = torch.zeros(n, m, 4)
    box_labels = torch.full((n, m), -1, dtype=torch.long)
    imgs = images[:, 0].float().clamp(0, 1)
    for i in range(n):
        for j in range(int(count[i])):
            k, r, c = int(src[i, j]), int(top[i, j]), int(left[i, j])
            d = imgs[k]
            win = canvas[i, 0, r : r + h, c : c + w]
            torch.maximum(win, d, out=win)
            ink = d > threshold
            seg[i, r : r + h, c : c + w][ink] = int(labels[k]) + 1
            rows, cols = ink.any(1).nonzero()[:, 0], ink.any(0).nonzero()[:, 0]
            if len(rows):
                y1, y2, x1, x2 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
            else:
                y1, y2, x1, x2 = 0, h, 0, w
            boxes[i, j] = torch.tensor([c + x1, r + y1, c + x2, r + y2], dtype=torch.float)
            box_labels[i, j] = int(labels[k])
    return canvas, seg, boxes, box_labels


def canvas_dataset(
    split: str,
    n: int,
    *,
    root: str | None = None,
    size: ImgSize = 64,
    max_digits: Depth = 4,
    seed: int = 0,
    threshold: Prob = 0.5,
    normalize: bool = True,
) -> Dataset:
    """``n`` canvases from the digits of MNIST split ``split``: keys ``image`` (kind image),
    ``seg`` (label_map, 11 classes) and ``idx`` (0..n-1, the canvas number in this split).

    The layout seed mixes ``seed`` with the split so two splits never share a layout. With
    ``normalize`` the image is standardised by the mean/std of a fixed reference set
    (1,000 train canvases, seed 0, same size and max_digits), so every split and seed shares
    one normalisation, as ``load`` does with train statistics; background is then
    ``-mean/std``, not 0.
    """
    from . import SPLITS, load

    if split not in SPLITS:
        raise ConfigError("data.split", split, f"allowed: {', '.join(SPLITS)}")
    src = load("mnist", split, root=root, normalize=False)
    split_seed = int(seed) * 1_000_003 + SPLITS.index(split)
    canvas, seg = make_canvases(src.x, src.y, n, size, max_digits, split_seed, threshold)
    info = {
        "construction": (
            f"{size}x{size} canvases with 1..{max_digits} MNIST '{split}' digits at seeded "
            f"random places (overlaps: ink max, later digit owns the label); seg 0 = "
            f"background, d+1 = ink of digit d (intensity > {threshold})"
        ),
        "source": f"mnist/{split} ({len(src)} digits, ids disjoint from the other splits)",
        "size": size,
        "max_digits": max_digits,
        "seed": seed,
        "threshold": threshold,
        "root": root,
        "img_size": size,
        "num_classes": NUM_CLASSES,
        "split_seed": src.info.get("split_seed"),
    }
    if normalize:
        ref = src if split == "train" else load("mnist", "train", root=root, normalize=False)
        ref_canvas, _ = make_canvases(ref.x, ref.y, NORM_CANVASES, size, max_digits, 0, threshold)
        mean, std = float(ref_canvas.mean()), float(ref_canvas.std())
        canvas = (canvas - mean) / std
        info.update(mean=mean, std=std)
    return Dataset(
        {"image": canvas, "seg": seg, "idx": torch.arange(n)},
        {"image": "image", "seg": "label_map", "idx": "id"},
        name="mnist-canvas",
        split=split,
        num_classes=NUM_CLASSES,
        info=info,
    )
