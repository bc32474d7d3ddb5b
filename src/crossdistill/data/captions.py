"""Image-caption pairs from digit images: captions written from templates and from
attributes measured on each image itself, several per image, seeded.

Attributes (measured on the raw [0, 1] image; ink = pixels above half the image's maximum):

- ``thickness``: mean stroke width, ``2 * ink area / ink perimeter`` (perimeter = ink pixels
  with a 4-neighbour outside the ink), in pixels;
- ``slant``: the shear of the ink, ``cov(col, row) / var(row)`` (> 0: the top leans right);
- ``size``: the ink's share of the frame;
- ``position``: the ink centroid's offset from the frame centre, in frames (x, y).

Each attribute becomes a word by the tertiles (``thin / medium / thick``, ``small / medium /
large``) or thresholds of the *train* split's values, so the same image gets the same words
in every split and test statistics never shape the captions. Templates combine the digit's
name with 0-3 attribute phrases; ``captions`` per image are drawn without repetition from a
generator seeded by ``seed``, the split and the image.

Zero-shot (``zero_shot: true``): train and val keep the digits 0-4, test the unseen 5-9,
which a model meets only through their class-name captions (:func:`class_captions`).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError
from .dataset import Dataset

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SEEN, UNSEEN = tuple(range(5)), tuple(range(5, 10))
IMAGES = ("mnist", "digits")
TEMPLATES = (
    "a handwritten {digit}",
    "the digit {digit}",
    "a {thickness}-stroked {digit}",
    "a {digit} written with {thickness} strokes",
    "a {size} {digit}",
    "a {digit} {slant}",
    "a {size}, {thickness}-stroked {digit} {slant}",
    "a {digit} {position}",
    "a {thickness}-stroked handwritten {digit}, {slant}, {position}",
)
CLASS_TEMPLATE = "a handwritten {digit}"


def class_captions(classes=range(10), template: str = CLASS_TEMPLATE) -> list[str]:
    """The class-name captions of ``classes`` (zero-shot prompts)."""
    classes = list(classes)
    bad = [c for c in classes if isinstance(c, bool) or not isinstance(c, (int, np.integer))
           or not 0 <= c < len(NAMES)]
    if bad or not classes:
        raise ConfigError("zero_shot.classes", bad or classes,
                          f"digit classes with images, in 0..{len(NAMES) - 1}")
    return [template.format(digit=NAMES[c]) for c in classes]


def class_prompts(tokenizer, classes=range(10), max_tokens: int = 24,
                  template: str = CLASS_TEMPLATE) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, max_tokens) ids and mask of the class-name captions of ``classes``, for
    :class:`crossdistill.models.dual.ZeroShotClassifier`."""
    from .turns import _ids

    return _ids(tokenizer, class_captions(classes, template), max_tokens)


def measure(x: torch.Tensor) -> dict[str, np.ndarray]:
    """The attributes of images ``x`` (N, 1, H, W) or (N, H, W), raw intensities >= 0."""
    x = x.reshape(len(x), *x.shape[-2:]).float()
    ink = x > 0.5 * x.amax(dim=(1, 2), keepdim=True).clamp_min(1e-6)
    n, h, w = ink.shape
    pad = torch.nn.functional.pad(ink, (1, 1, 1, 1))
    inside = pad[:, :-2, 1:-1] & pad[:, 2:, 1:-1] & pad[:, 1:-1, :-2] & pad[:, 1:-1, 2:]
    area = ink.sum((1, 2)).float().clamp_min(1)
    perimeter = (ink & ~inside).sum((1, 2)).float().clamp_min(1)
    rows = torch.arange(h, dtype=torch.float32)[None, :, None].expand(n, h, w)
    cols = torch.arange(w, dtype=torch.float32)[None, None, :].expand(n, h, w)
    m = ink.float()
    r0 = (rows * m).sum((1, 2)) / area
    c0 = (cols * m).sum((1, 2)) / area
    var_r = (((rows - r0[:, None, None]) ** 2) * m).sum((1, 2)) / area
    cov = ((rows - r0[:, None, None]) * (cols - c0[:, None, None]) * m).sum((1, 2)) / area
    return {
        "thickness": (2 * area / perimeter).numpy(),
        "slant": (-cov / var_r.clamp_min(1e-6)).numpy(),  # rows grow downwards
        "size": (area / (h * w)).numpy(),
        "position_x": ((c0 - (w - 1) / 2) / w).numpy(),
        "position_y": ((r0 - (h - 1) / 2) / h).numpy(),
    }


def cut_points(train: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """Per attribute, the two thresholds that turn values into words (from the train split)."""
    t = lambda v: tuple(np.quantile(v, [1 / 3, 2 / 3]).tolist())  # noqa: E731
    s = np.quantile(train["slant"], [0.2, 0.8]).tolist()
    px = np.quantile(np.abs(train["position_x"]), 0.8)
    py = np.quantile(np.abs(train["position_y"]), 0.8)
    return {"thickness": t(train["thickness"]), "size": t(train["size"]),
            "slant": tuple(s), "position": (float(px), float(py))}


def words(a: dict[str, np.ndarray], cuts: dict) -> list[dict[str, str]]:
    """The attribute words of each image."""
    def tert(key, i, names):
        lo, hi = cuts[key]
        v = a[key][i]
        return names[0] if v < lo else names[2] if v > hi else names[1]

    out = []
    for i in range(len(a["size"])):
        lo, hi = cuts["slant"]
        slant = a["slant"][i]
        px, py = cuts["position"]
        x, y = a["position_x"][i], a["position_y"][i]
        where = [w for w, on in (("to the left", x < -px), ("to the right", x > px),
                                 ("high in the frame", y < -py), ("low in the frame", y > py))
                 if on]
        out.append({
            "thickness": tert("thickness", i, ("thin", "medium", "thick")),
            "size": tert("size", i, ("small", "medium-sized", "large")),
            "slant": ("leaning left" if slant < lo else "leaning right" if slant > hi
                      else "upright"),
            "position": " and ".join(where) if where else "in the centre",
        })
    return out


def _images(name: str, split: str, root, split_seed: int, limit):
    from . import load

    if name not in IMAGES:
        raise ConfigError("data.images", name, f"one of {', '.join(IMAGES)}")
    kw = {"root": root} if name == "mnist" else {}
    return load(name, split, split_seed=split_seed, limit=limit, normalize=False, **kw)


def caption_pairs(split: str, *, images: str = "mnist", root=None, split_seed: int = 0,
                  captions: int = 3, seed: int = 0, zero_shot: bool = False, limit=None):
    """(raw image dataset, captions per image (list of lists), words, attributes). The word
    cut points come from the train split (as ``limit`` keeps it, for the train split itself),
    the dataset's ``info["train_mean"]`` / ``["train_std"]`` from the whole train split."""
    from . import SPLITS

    if split not in SPLITS:
        raise ConfigError("data.split", split, f"allowed: {', '.join(SPLITS)}")
    if isinstance(captions, bool) or not isinstance(captions, int) or not (
            1 <= captions <= len(TEMPLATES)):
        raise ConfigError("data.captions", captions, f"an integer in 1..{len(TEMPLATES)}")
    if not isinstance(zero_shot, bool):
        raise ConfigError("data.zero_shot", zero_shot, "true or false")
    train = _images(images, "train", root, split_seed, None)
    data = train if split == "train" and limit is None else _images(
        images, split, root, split_seed, limit)
    cuts = cut_points(measure((data if split == "train" else train).x))
    data.info.update(train_mean=float(train.x.mean()), train_std=float(train.x.std()))
    if zero_shot:
        keep = UNSEEN if split == "test" else SEEN
        sel = torch.isin(data.y, torch.tensor(keep)).nonzero().flatten()
        missing = sorted(set(keep) - set(data.y[sel].tolist()))
        if missing:
            raise ConfigError("data.zero_shot", missing,
                              f"classes with images in the {split} split (captions for a class "
                              "need its images)")
        data = data.subset(sel)
    attrs = measure(data.x)
    ws = words(attrs, cuts)
    texts = []
    for w, yi, idx in zip(ws, data.y.tolist(), data.idx.tolist()):
        g = np.random.default_rng([seed, SPLITS.index(split), int(idx)])
        picks = g.choice(len(TEMPLATES), size=captions, replace=False)
        texts.append([TEMPLATES[k].format(digit=NAMES[yi], **w) for k in sorted(picks)])
    return data, texts, ws, attrs


def digit_captions(split: str, *, images: str = "mnist", root=None, split_seed: int = 0,
                   captions: int = 3, seed: int = 0, zero_shot: bool = False, limit=None,
                   tokenizer: str = "minilm", max_tokens: int = 24,
                   cache_dir: str = "runs/cache/tokenizers") -> Dataset:
    """Keys ``x`` (standardised with the train split's mean / std), ``y``, ``idx``,
    ``caption_ids`` / ``caption_mask`` (N, captions, max_tokens) and the measured attributes
    (``thickness``, ``slant``, ``size``, ``position_x``, ``position_y``); the strings on
    ``data.texts``, the attribute words on ``data.words``."""
    from .turns import _ids, _tokenizer

    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not (
            4 <= max_tokens <= 512):
        raise ConfigError("data.max_tokens", max_tokens, "an integer in 4..512")
    data, texts, ws, attrs = caption_pairs(split, images=images, root=root,
                                           split_seed=split_seed, captions=captions,
                                           seed=seed, zero_shot=zero_shot, limit=limit)
    train_text = ""
    if tokenizer in ("bpe", "char"):  # trained on every caption a template can write
        train_text = "\n".join(t.format(digit=d, thickness=k, size=s, slant=sl, position=p)
                               for t in TEMPLATES for d in NAMES
                               for k in ("thin", "medium", "thick")
                               for s in ("small", "medium-sized", "large")
                               for sl in ("leaning left", "upright", "leaning right")
                               for p in ("in the centre", "to the left", "high in the frame"))
    tok = _tokenizer(tokenizer, train_text, 512, cache_dir)
    flat = [t for ts in texts for t in ts]
    ids, mask = _ids(tok, flat, max_tokens)
    n, c = len(texts), captions
    mean, std = data.info["train_mean"], data.info["train_std"]
    out = Dataset(
        {"x": (data.x - mean) / std, "y": data.y, "idx": data.idx,
         "caption_ids": ids.view(n, c, -1), "caption_mask": mask.view(n, c, -1),
         **{k: torch.as_tensor(v).float() for k, v in attrs.items()}},
        {"x": "image", "y": "label", "idx": "id", "caption_ids": "tokens",
         "caption_mask": "value", **{k: "value" for k in attrs}},
        name=f"{images}-captions", split=split, num_classes=10,
        info={"construction": f"{images} {split} images, {captions} captions each from "
              f"templates and measured attributes (seed {seed})" + (
                  ", zero-shot: train/val digits 0-4, test 5-9" if zero_shot else ""),
              "mean": mean, "std": std, "zero_shot": zero_shot, "tokenizer": tokenizer},
    )
    out.texts, out.words, out.tokenizer = texts, ws, tok
    return out
