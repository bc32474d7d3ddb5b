"""Real data, offline: sklearn's digits (embedded) and MNIST from standard IDX files.

``load(name, split=...)`` returns a :class:`Dataset` of one split. Splits are fixed, seeded
(``split_seed``, default 0, independent of the training seed) and stratified:

* ``digits`` (1,797 images, 8x8): train 1,077 / val 360 / test 360.
* ``mnist`` from the 10,000-image test set alone (what ships offline): train 6,000 /
  val 2,000 / test 2,000. If the directory also holds the official ``train-*`` files, the
  official 60k train set is split 55,000 / 5,000 into train / val and the 10k set is test.

Inputs are normalised with the train split's mean and std. ``labelled=k`` keeps labels on a
stratified ``k`` training samples and sets the rest to -100 (``IGNORE_INDEX``: unlabelled,
for KD with few labels).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..registry import DATASETS
from ..schema import Count, Seed
from . import sources
from .dataset import IGNORE_INDEX, KINDS, Batches, Dataset
from .splits import stratified_split

SPLITS = ("train", "val", "test")

__all__ = [
    "IGNORE_INDEX",
    "KINDS",
    "Batches",
    "Dataset",
    "load",
    "names",
    "stratified_split",
    "SPLITS",
]


@DATASETS.register(
    "digits",
    description="scikit-learn 8x8 digits, 1,797 images, embedded",
    sizes={"train": 1077, "val": 360, "test": 360},
)
def _digits(root=None):
    x, y = sources.digits()
    return {"all": (x, y)}


@DATASETS.register(
    "mnist",
    description="MNIST from IDX files (default $CROSSDISTILL_DATA/mnist-t10k, else "
    "../shared/data/mnist-t10k relative to the project)",
    sizes={"train": 6000, "val": 2000, "test": 2000},
)
def _mnist(root=None):
    return sources.mnist(root)


def names() -> list[str]:
    return DATASETS.names()


def _split_ids(name: str, parts: dict, split_seed: int):
    """(x, y, ids) of every split; ids index the concatenation of the raw parts."""
    if "train" in parts and "t10k" in parts:  # the official MNIST layout
        (xtr, ytr), (xte, yte) = parts["train"], parts["t10k"]
        s = stratified_split(ytr, {"val": 5000, "train": len(ytr) - 5000}, split_seed)
        x, y = np.concatenate([xtr, xte]), np.concatenate([ytr, yte])
        s["test"] = np.arange(len(ytr), len(ytr) + len(yte))
        return x, y, s
    x, y = next(iter(parts.values()))
    sizes = dict(DATASETS.meta(name)["sizes"])
    if sum(sizes.values()) > len(y):  # a smaller user copy: keep the proportions
        frac = len(y) / sum(sizes.values())
        sizes = {k: int(v * frac) for k, v in sizes.items()}
    order = {"test": sizes["test"], "val": sizes["val"], "train": sizes["train"]}
    return x, y, stratified_split(y, order, split_seed)


def load(
    name: str,
    split: str = "train",
    *,
    root: str | None = None,
    img_size: int | None = None,
    split_seed: int = 0,
    labelled: int | None = None,
    normalize: bool = True,
    limit: int | None = None,
) -> Dataset:
    """One split of a registered dataset, as tensors, normalised with the train statistics."""
    reader = DATASETS.get(name, "data.name")
    if split not in SPLITS:
        raise ConfigError("data.split", split, f"allowed: {', '.join(SPLITS)}")
    x, y, ids = _split_ids(name, reader(root=root), split_seed)
    train_x = x[ids["train"]]
    mean, std = float(train_x.mean()), float(train_x.std())
    sel = ids[split]
    if limit is not None:
        keep = stratified_split(y[sel], {"keep": min(limit, len(sel))}, split_seed)["keep"]
        sel = sel[keep]
    xs = torch.from_numpy(np.ascontiguousarray(x[sel]))
    if img_size is not None and tuple(xs.shape[-2:]) != (img_size, img_size):
        xs = F.interpolate(xs, size=(img_size, img_size), mode="bilinear", align_corners=False)
    if normalize:
        xs = (xs - mean) / std
    ys = torch.from_numpy(y[sel].copy())
    if labelled is not None and split == "train":
        if not 0 < labelled <= len(ys):
            raise ConfigError("data.labelled", labelled, f"must be in 1..{len(ys)}")
        keep = stratified_split(ys.numpy(), {"keep": labelled}, split_seed + 1)["keep"]
        mask = torch.ones(len(ys), dtype=torch.bool)
        mask[torch.from_numpy(keep)] = False
        ys[mask] = IGNORE_INDEX
    info = {
        "mean": mean,
        "std": std,
        "split_seed": split_seed,
        "root": root,
        "img_size": img_size,
        "labelled": labelled,
    }
    return Dataset.classification(
        xs.float().contiguous(),
        ys,
        torch.from_numpy(sel.astype(np.int64)),
        name,
        split,
        int(y.max()) + 1,
        info,
    )


# -- split-level sources: datasets other than image classification ------------------------
# Each is registered with ``splits=True`` and called as ``fn(split, root=..., split_seed=...,
# **params)``; its ``task`` meta names the task its batches are for.


@DATASETS.register(
    "shakespeare",
    description="tiny Shakespeare (embedded), contiguous 90/5/5 split, LM blocks",
    splits=True,
    task="lm",
)
def _shakespeare(split, root=None, split_seed=0, **params):
    from .text_source import shakespeare_split

    return shakespeare_split(split, root=root, **params)


@DATASETS.register(
    "shakespeare_pair",
    description="tiny Shakespeare blocks under a student and a teacher tokenizer, with the "
    "byte-chunk alignment (cross-tokenizer KD: uld, mined, alm)",
    splits=True,
    task="lm",
)
def _shakespeare_pair(split, root=None, split_seed=0, **params):
    from .text_pair import shakespeare_pair_split

    return shakespeare_pair_split(split, root=root, **params)


@DATASETS.register(
    "shakespeare_turns",
    description="tiny Shakespeare speaker turns paired with the turn that answers them, "
    "split by contiguous blocks of turns (text retrieval)",
    splits=True,
    task="retrieval",
)
def _shakespeare_turns(
    split,
    root: str | None = None,
    split_seed: Seed = 0,
    tokenizer: Literal["minilm", "bpe", "char"] = "minilm",
    vocab_size: Count = 2000,
    max_tokens: Count = 48,
    block_turns: Count = 40,
    max_chars: Count | None = None,
    stride: Literal[1, 2] = 1,
    cache_dir: str = "runs/cache/tokenizers",
):
    from .turns import shakespeare_turns

    return shakespeare_turns(split, root=root, tokenizer=tokenizer, vocab_size=vocab_size,
                             max_tokens=max_tokens, block_turns=block_turns,
                             split_seed=split_seed, max_chars=max_chars, stride=stride,
                             cache_dir=cache_dir)


@DATASETS.register(
    "digit_captions",
    description="MNIST or sklearn digits images with captions from templates and attributes "
    "measured on each image (thickness, slant, size, position); zero_shot: test on unseen 5-9",
    splits=True,
    task="retrieval",
)
def _digit_captions(
    split,
    root: str | None = None,
    split_seed: Seed = 0,
    images: Literal["mnist", "digits"] = "mnist",
    captions: Count = 3,
    seed: Seed = 0,
    zero_shot: bool = False,
    limit: Count | None = None,
    tokenizer: Literal["minilm", "bpe", "char"] = "minilm",
    max_tokens: Count = 24,
    cache_dir: str = "runs/cache/tokenizers",
):
    from .captions import digit_captions

    return digit_captions(split, images=images, root=root, split_seed=split_seed,
                          captions=captions, seed=seed, zero_shot=zero_shot, limit=limit,
                          tokenizer=tokenizer, max_tokens=max_tokens, cache_dir=cache_dir)


@DATASETS.register(
    "canvas",
    description="64x64 canvases of 1-4 MNIST digits with per-pixel class maps (11 classes)",
    splits=True,
    task="segmentation",
)
def _canvas(split, root=None, split_seed=0, n=None, **params):
    from .canvas import canvas_dataset

    sizes = {"train": 2000, "val": 400, "test": 400}
    return canvas_dataset(
        split,
        int(n or sizes[split]) if not isinstance(n, dict) else n[split],
        root=root,
        seed=split_seed,
        **params,
    )


@DATASETS.register(
    "detection-canvas",
    description="56x56 canvases of 1-3 non-overlapping MNIST digits, one box + class per "
    "digit, label maps, degraded views",
    splits=True,
    task="detection",
)
def _detection_canvas(split, root=None, split_seed=0, n=None, **params):
    from .detection import detection_dataset

    sizes = {"train": 2000, "val": 400, "test": 400}
    return detection_dataset(
        split,
        int(n or sizes[split]) if not isinstance(n, dict) else n[split],
        root=root,
        seed=split_seed,
        **params,
    )


@DATASETS.register(
    "av",
    description="MNIST images paired with FSDD recordings of the same digit (speaker split)",
    splits=True,
    task="classification",
)
def _av(
    split,
    root: str | None = None,
    split_seed: Seed = 0,
    limit: Count | dict[str, Count] | None = None,
    **params,
):
    from .av import paired_av

    data = paired_av(split, mnist_root=root, seed=split_seed, **params)
    n = limit.get(split) if isinstance(limit, dict) else limit
    if n is not None:  # a stratified subset (toy runs)
        keep = stratified_split(data.y.numpy(), {"keep": min(int(n), len(data))}, split_seed)
        data = data.subset(keep["keep"])
    return data


@DATASETS.register(
    "mnist_digits",
    description="MNIST (source, labelled) paired with sklearn digits upsampled into MNIST's "
    "28x28 frame (target; labels as target_y, for evaluation): cross-domain KD",
    splits=True,
    task="classification",
)
def _mnist_digits(
    split,
    root: str | None = None,
    split_seed: Seed = 0,
    pair_seed: Seed = 0,
    limit: Count | dict[str, Count] | None = None,
    target_limit: Count | dict[str, Count] | None = None,
    train_target_labels: bool = False,
    target_frame: Literal["mnist", "fill"] = "mnist",
):
    from .domains import mnist_digits

    return mnist_digits(
        split,
        root=root,
        split_seed=split_seed,
        pair_seed=pair_seed,
        limit=limit,
        target_limit=target_limit,
        train_target_labels=train_target_labels,
        target_frame=target_frame,
    )


def load_split(name: str, split: str, *, root=None, split_seed: int = 0, **params):
    """One split of any registered source (classification readers go through ``load``)."""
    fn = DATASETS.get(name, "data.name")
    if split not in SPLITS:
        raise ConfigError("data.split", split, f"allowed: {', '.join(SPLITS)}")
    if DATASETS.meta(name).get("splits"):
        try:
            return fn(split, root=root, split_seed=split_seed, **params)
        except TypeError as err:
            raise ConfigError("data.params", params, f"bad options for {name!r} ({err})") from None
    return load(name, split, root=root, split_seed=split_seed, **params)
from . import av_seq as _av_seq  # noqa: E402,F401  (registers av_seq)
from . import digit_aspects as _digit_aspects  # noqa: E402,F401  (registers)
from . import digit_vqa as _digit_vqa  # noqa: E402,F401  (registers)
from . import fewshot as _fewshot  # noqa: E402,F401  (registers fewshot-canvas)
from . import halves as _halves  # noqa: E402,F401  (registers)
from . import multisource as _multisource  # noqa: E402,F401  (registers)
from . import paraphrase as _paraphrase  # noqa: E402,F401  (registers)
