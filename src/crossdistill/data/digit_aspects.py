"""Yes/no shape aspects of digit images, measured on the image itself, and the texts built
from them: per-image shape captions and hand-written per-class attribute descriptions.

MaKD (Lee et al., 2025) asks an MLLM yes/no questions about each image; VLM-OOD (Li et al.,
ICCV 2023) enriches class names with LLM-written attribute descriptions. Neither an MLLM nor an
LLM is available offline, so here the aspects are *measured* (ink = pixels above half the
image's maximum, as :mod:`crossdistill.data.captions` does):

- ``loop``: a closed loop (a background region of >= ``MIN_HOLE`` pixels, 4-connected, that
  does not reach the frame's border); ``two_loops``: two or more;
- ``loop_top`` / ``loop_bottom``: a loop whose centre lies in the top 42 % / bottom 42 % of
  the ink's bounding box (a loop around the middle, a 0's, is neither);
- ``top_bar`` / ``bottom_bar``: a horizontal run of ink in the top / bottom quarter of the box
  at least ``0.6`` of the box's width and ``0.3`` of its height (a 1's narrow box has none);
- ``vertical``: a column with a vertical run of ink at least ``0.7`` of the box's height,
  after the box is deskewed by its slant;
- ``wide``, ``thick``, ``slanted``: the box's width / height ratio, the stroke thickness and the
  slant (``captions.measure``) above a cut point taken from the train split (median for wide
  and thick, the 75th percentile of the slant);
- ``top_heavy``: the ink's centroid above the box's centre.

:data:`CLASS_ATTRIBUTES` are one-line descriptions per digit written by hand in the aspects'
vocabulary, from general knowledge of how each digit is drawn (what an LLM would write), not
measured on any split.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError

ASPECTS = ("loop", "two_loops", "loop_top", "loop_bottom", "top_bar", "bottom_bar",
           "vertical", "wide", "thick", "slanted", "top_heavy")
MIN_HOLE = 2  # pixels (28 x 28); 1 on 8 x 8 images
PHRASES = {  # what a shape caption says for an aspect that holds (None: nothing)
    "loop": "a closed loop",
    "two_loops": "two closed loops",
    "loop_top": "a loop at the top",
    "loop_bottom": "a loop at the bottom",
    "top_bar": "a flat bar across the top",
    "bottom_bar": "a flat stroke along the bottom",
    "vertical": "a long vertical stroke",
    "wide": "a wide shape",
    "thick": "thick strokes",
    "slanted": "a slanted shape",
    "top_heavy": "most of its ink at the top",
}
NEGATIVE = {"loop": "no closed loop", "wide": "a narrow shape", "top_heavy":
            "most of its ink at the bottom"}
CLASS_ATTRIBUTES = {
    0: ["a digit with a closed loop and no straight strokes",
        "a round digit with one closed loop and a wide shape"],
    1: ["a digit with a long vertical stroke and a narrow shape",
        "a digit with no closed loop, a single straight stroke"],
    2: ["a digit with a curve at the top and a flat stroke along the bottom",
        "a digit with no closed loop and most of its ink at the bottom"],
    3: ["a digit with two curves opening to the left and no closed loop",
        "a digit with no closed loop and a narrow shape"],
    4: ["a digit with a long vertical stroke and a crossbar, a loop at the top",
        "a digit with an open or closed triangle at the top"],
    5: ["a digit with a flat bar across the top and a curve at the bottom",
        "a digit with no closed loop, a flat bar across the top"],
    6: ["a digit with a closed loop at the bottom and a curve at the top",
        "a digit with a loop at the bottom and most of its ink at the bottom"],
    7: ["a digit with a flat bar across the top and a long slanted stroke",
        "a digit with no closed loop, a flat bar across the top and a narrow shape"],
    8: ["a digit with two closed loops, a loop at the top and a loop at the bottom",
        "a digit with two closed loops"],
    9: ["a digit with a closed loop at the top and a long vertical stroke",
        "a digit with a loop at the top and most of its ink at the top"],
}


def _runs(a: np.ndarray) -> int:
    """The longest run of True in a 1-D boolean array."""
    best = cur = 0
    for v in a:
        cur = cur + 1 if v else 0
        best = max(best, cur)
    return best


def _deskew(box: np.ndarray, slant: float) -> np.ndarray:
    """``box`` with each row shifted by ``-slant * (row - middle)``: a slanted stroke upright
    (``slant`` > 0: the top leans right)."""
    h, w = box.shape
    pad = int(np.ceil(abs(slant) * h / 2)) + 1
    out = np.zeros((h, w + 2 * pad), dtype=bool)
    for r in range(h):
        s = int(round(-slant * ((h - 1) / 2 - r)))
        out[r, pad + s:pad + s + w] = box[r]
    return out


def measure_shapes(x: torch.Tensor) -> dict[str, np.ndarray]:
    """Raw shape measurements of images ``x`` (N, 1, H, W) or (N, H, W), intensities >= 0:
    ``loops``, ``loop_top``, ``loop_bottom`` (counts), ``top_bar``, ``bottom_bar``,
    ``vertical`` (booleans), ``aspect`` (box width / height), ``top_heavy`` (bool)."""
    from scipy import ndimage

    from .captions import measure

    if x.dim() not in (3, 4) or x.shape[-1] < 4 or x.shape[-2] < 4:
        raise ConfigError("data.images", tuple(x.shape), "images (N, 1, H, W), H, W >= 4")
    x = x.reshape(len(x), *x.shape[-2:]).float()
    ink = (x > 0.5 * x.amax(dim=(1, 2), keepdim=True).clamp_min(1e-6)).numpy()
    n, h, w = ink.shape
    min_hole = MIN_HOLE if h >= 16 else 1
    out = {k: np.zeros(n, dtype=np.int64) for k in ("loops", "loop_top", "loop_bottom")}
    out.update({k: np.zeros(n, dtype=bool) for k in ("top_bar", "bottom_bar", "vertical",
                                                     "top_heavy")})
    out["aspect"] = np.zeros(n, dtype=np.float64)
    a = measure(torch.as_tensor(x))
    slant = a["slant"]
    for i in range(n):
        m = ink[i]
        rows, cols = np.nonzero(m)
        if len(rows) == 0:
            continue
        r0, r1, c0, c1 = rows.min(), rows.max(), cols.min(), cols.max()
        bh, bw = r1 - r0 + 1, c1 - c0 + 1
        out["aspect"][i] = bw / bh
        mid = (r0 + r1) / 2
        lab, k = ndimage.label(~m)  # 4-connected background regions
        border = set(np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])))
        for region in range(1, k + 1):
            if region in border:
                continue
            rr, _ = np.nonzero(lab == region)
            if len(rr) < min_hole:
                continue
            out["loops"][i] += 1
            rel = (rr.mean() - r0) / bh  # a loop near the middle (a 0's) is neither
            if rel < 0.42:
                out["loop_top"][i] += 1
            elif rel > 0.58:
                out["loop_bottom"][i] += 1
        q = max(1, int(round(bh / 4)))
        box = m[r0:r1 + 1, c0:c1 + 1]
        bar = max(0.6 * bw, 0.3 * bh)  # a narrow box (a 1) has no bar
        out["top_bar"][i] = max(_runs(r) for r in box[:q]) >= bar
        out["bottom_bar"][i] = max(_runs(r) for r in box[-q:]) >= bar
        out["vertical"][i] = max(_runs(c) for c in _deskew(box, slant[i]).T) >= 0.7 * bh
        out["top_heavy"][i] = rows.mean() < mid
    out["thickness"], out["slant"] = a["thickness"], a["slant"]
    return out


def aspect_cuts(train: dict[str, np.ndarray]) -> dict[str, float]:
    """The cut points of the graded aspects, from the train split's measurements."""
    return {"wide": float(np.median(train["aspect"])),
            "thick": float(np.median(train["thickness"])),
            "slanted": float(np.quantile(train["slant"], 0.75))}


def aspects(shapes: dict[str, np.ndarray], cuts: dict[str, float]) -> torch.Tensor:
    """(N, len(ASPECTS)) 0/1 float targets, in :data:`ASPECTS` order."""
    missing = {"wide", "thick", "slanted"} - set(cuts)
    if missing:
        raise ConfigError("aspects.cuts", sorted(cuts), "wide, thick and slanted cut points")
    cols = {
        "loop": shapes["loops"] >= 1, "two_loops": shapes["loops"] >= 2,
        "loop_top": shapes["loop_top"] >= 1, "loop_bottom": shapes["loop_bottom"] >= 1,
        "top_bar": shapes["top_bar"], "bottom_bar": shapes["bottom_bar"],
        "vertical": shapes["vertical"], "wide": shapes["aspect"] > cuts["wide"],
        "thick": shapes["thickness"] > cuts["thick"],
        "slanted": shapes["slant"] > cuts["slanted"], "top_heavy": shapes["top_heavy"],
    }
    return torch.tensor(np.stack([cols[k] for k in ASPECTS], 1), dtype=torch.float32)


def shape_caption(row, rng: np.random.Generator, phrases: int = 2) -> str:
    """A caption naming up to ``phrases`` of an image's measured aspects (0/1 ``row`` in
    :data:`ASPECTS` order), without the digit's name: "a digit with a closed loop and a
    long vertical stroke". Aspects that do not hold say so only where that is visible
    (no loop, narrow, ink at the bottom)."""
    on = [PHRASES[k] for k, v in zip(ASPECTS, row) if v]
    off = [NEGATIVE[k] for k, v in zip(ASPECTS, row) if not v and k in NEGATIVE]
    pool = on + off
    pick = rng.choice(len(pool), size=min(phrases, len(pool)), replace=False)
    said = [pool[i] for i in sorted(pick)]
    return "a digit with " + " and ".join(said)


def class_descriptions(classes=range(10), template: str = "a handwritten {digit}") -> list[
        list[str]]:
    """Per class: its name prompt followed by its attribute descriptions."""
    from .captions import NAMES

    out = []
    for c in classes:
        if c not in CLASS_ATTRIBUTES:
            raise ConfigError("classes", c, "digits 0-9")
        out.append([template.format(digit=NAMES[c]), *CLASS_ATTRIBUTES[c]])
    return out


def raw_images(data) -> torch.Tensor:
    """A ``digit_captions`` split's images back in raw intensities (``x * std + mean``)."""
    mean, std = data.info.get("mean"), data.info.get("std")
    if mean is None or std is None:
        raise ConfigError("data", getattr(data, "name", type(data).__name__),
                          "a digit_captions split (its info holds the train mean and std)")
    return data["x"] * std + mean


def with_aspects(data, train=None, *, shape_captions: int = 1, phrases: int = 2,
                 seed: int = 0, cuts: dict | None = None):
    """A copy of a ``digit_captions`` split with key ``aspects`` (N, A) (measured; cut points
    from ``train``, default ``data`` itself, or given as ``cuts``) and ``shape_captions`` more
    captions per image (:func:`shape_caption`, seeded by ``seed`` and the image id) appended
    to ``caption_ids`` / ``caption_mask`` (tokenized with the split's own tokenizer);
    ``data.texts`` grows too."""
    from .dataset import Dataset
    from .turns import _ids

    if isinstance(shape_captions, bool) or not isinstance(shape_captions, int) or not (
            0 <= shape_captions <= 4):
        raise ConfigError("data.shape_captions", shape_captions, "an integer in 0..4")
    if "caption_ids" not in data or getattr(data, "tokenizer", None) is None:
        raise ConfigError("data", getattr(data, "name", type(data).__name__),
                          "a digit_captions split (caption_ids and a tokenizer)")
    if cuts is None:
        cuts = aspect_cuts(measure_shapes(raw_images(data if train is None else train)))
    a = aspects(measure_shapes(raw_images(data)), cuts)
    texts = [list(t) for t in data.texts]
    ids, mask = data["caption_ids"], data["caption_mask"]
    if shape_captions:
        extra = []
        for row, idx, t in zip(a.tolist(), data["idx"].tolist(), texts):
            g = np.random.default_rng([seed, 7, int(idx)])
            new = [shape_caption(row, g, phrases) for _ in range(shape_captions)]
            t.extend(new)
            extra.extend(new)
        e_ids, e_mask = _ids(data.tokenizer, extra, ids.shape[-1])
        n = len(texts)
        ids = torch.cat([ids, e_ids.view(n, shape_captions, -1)], 1)
        mask = torch.cat([mask, e_mask.view(n, shape_captions, -1)], 1)
    tensors = dict(data.tensors)
    tensors.update(caption_ids=ids, caption_mask=mask, aspects=a)
    kinds = dict(data.kinds)
    kinds["aspects"] = "value"
    out = Dataset(tensors, kinds, name=data.name, split=data.split,
                  num_classes=data.num_classes,
                  info={**data.info, "aspects": list(ASPECTS), "aspect_cuts": cuts,
                        "shape_captions": shape_captions})
    out.texts, out.words, out.tokenizer = texts, getattr(data, "words", None), data.tokenizer
    return out
