"""Data for multi-source transfer (DistillNearest / DistillWeighted) and cross-task KD
(ProC-KD): source domains, a few-label target task, and class subsets with their own label
space.

The MNIST train split (6,000 images of the offline 10k set) is cut once, stratified and
seeded (``split_seed``), into two disjoint halves: ``"source"`` images, from which the source
domains are made (and the cross-task teacher's data), and ``"target"`` images, the target
task's training pool. No source model ever sees a target training image, and the MNIST val
and test splits belong to the target task alone (sources select their checkpoints on a
held-out part of the source half).

Source domains (:func:`source_domain`), each an image-classification :class:`Dataset` with
MNIST's 28x28 frame and MNIST's train mean/std (one input pipeline for every model):

* ``mnist``: the source half as it is (the cross-task teacher's domain);
* ``inverted``: ``1 - x`` on the raw [0, 1] pixels (white background, dark strokes);
* ``rotated``: every image turned by ``angle`` degrees (default 90; multiples of 90 are
  exact pixel permutations, other angles bilinear);
* ``digits``: scikit-learn's 8x8 digits upsampled into MNIST's 20x20 box
  (:func:`crossdistill.data.domains.domain_splits`), its own train / val splits.

:func:`target_split` gives the target task (MNIST, ``labelled`` stratified train labels, the
rest -100), optionally restricted to some classes with labels renumbered 0..C-1 (the
cross-task student's 5-9). :func:`oversample_labelled` repeats the labelled rows so that a
batch holds about one labelled image per ``ratio`` unlabelled ones (FixMatch's mu = 7), the
in-memory equivalent of cycling a labelled loader beside the unlabelled one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .dataset import IGNORE_INDEX, Dataset
from .splits import stratified_split

DOMAINS = ("mnist", "inverted", "rotated", "digits")
SOURCE_VAL = 500  # held out of the source half for the sources' own checkpoint choice


def _mnist(root, split: str, split_seed: int):
    from . import load

    return load("mnist", split, root=root, split_seed=split_seed)


def mnist_halves(root: str | None = None, split_seed: int = 0) -> dict[str, np.ndarray]:
    """Positions in ``load("mnist", "train")`` of the ``"source"`` and ``"target"`` halves
    (stratified, disjoint, seeded by ``split_seed``)."""
    y = _mnist(root, "train", split_seed).y.numpy()
    half = len(y) // 2
    return stratified_split(y, {"source": half, "target": len(y) - half}, split_seed + 7)


def _classes(classes, field: str) -> list[int] | None:
    if classes is None:
        return None
    c = list(classes)
    if not c or len(set(c)) != len(c) or any(
        isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= 9 for k in c
    ):
        raise ConfigError(field, classes, "distinct digit classes 0..9, e.g. [0, 1, 2, 3, 4]")
    return c


def class_subset(data: Dataset, classes: Sequence[int], key: str = "y") -> Dataset:
    """The samples of ``classes`` (labels ``-100`` kept out), labels renumbered to their
    position in ``classes`` (``[5, 6, 7, 8, 9]`` -> 0..4); ``num_classes = len(classes)``."""
    c = _classes(classes, "data.classes")
    y = data[key]
    keep = torch.isin(y, torch.tensor(c))
    out = data.subset(torch.nonzero(keep).flatten())
    remap = torch.full((10,), IGNORE_INDEX, dtype=torch.long)
    remap[torch.tensor(c)] = torch.arange(len(c))
    out.tensors[key] = remap[out[key]]
    out.num_classes = len(c)
    out.info = {**out.info, "classes": c}
    return out


def _rotate(x: torch.Tensor, angle: float) -> torch.Tensor:
    if angle % 90 == 0:
        return torch.rot90(x, int(angle // 90) % 4, dims=(-2, -1)).contiguous()
    a = math.radians(angle)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]])
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def source_domain(
    name: str,
    split: str = "train",
    *,
    root: str | None = None,
    split_seed: int = 0,
    angle: float = 90.0,
    classes: Sequence[int] | None = None,
    limit: int | None = None,
) -> Dataset:
    """One source domain's ``train`` or ``val`` split (module docstring). MNIST-made domains
    use the source half (its last :data:`SOURCE_VAL` stratified images are ``val``);
    ``digits`` its own splits. ``classes``: keep those, renumbered (:func:`class_subset`);
    ``limit``: a stratified subset."""
    if name not in DOMAINS:
        raise ConfigError("source.domain", name, f"one of {', '.join(DOMAINS)}")
    if split not in ("train", "val"):
        raise ConfigError("source.split", split, "train or val (the test split is the "
                          "target task's, never a source's)")
    if not isinstance(angle, (int, float)) or isinstance(angle, bool) or not math.isfinite(angle):
        raise ConfigError("source.angle", angle, "a finite rotation in degrees")
    if name == "digits":
        from .domains import domain_splits

        _, tgt = domain_splits(split, root=root, split_seed=split_seed)
        data = Dataset.classification(tgt.x, tgt["target_y"], tgt.idx + 10_000_000,
                                      "digits-28", split, 10, {**tgt.info, "domain": name})
    else:
        full = _mnist(root, "train", split_seed)
        pos = mnist_halves(root, split_seed)["source"]
        parts = stratified_split(full.y.numpy()[pos], {"val": SOURCE_VAL,
                                 "train": len(pos) - SOURCE_VAL}, split_seed + 11)
        sub = full.subset(torch.from_numpy(pos[parts[split]]))
        mean, std = full.info["mean"], full.info["std"]
        x = sub.x
        if name == "inverted":
            x = ((1.0 - (x * std + mean)) - mean) / std
        elif name == "rotated":
            x = ((_rotate(x * std + mean, float(angle))) - mean) / std
        info = {**full.info, "domain": name, "angle": angle if name == "rotated" else None,
                "construction": f"MNIST source half ({split}), {name}"}
        data = Dataset.classification(x.contiguous(), sub.y, sub.idx, f"mnist-{name}", split,
                                      10, info)
    if classes is not None:
        data = class_subset(data, classes)
    if limit is not None:
        data = stratified_limit(data, limit, split_seed, "source.limit")
    return data


def stratified_limit(data: Dataset, limit, seed: int = 0, field: str = "data.limit") -> Dataset:
    """A stratified, seeded subset of ``limit`` samples (all of them when fewer)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(field, limit, "a positive number of samples")
    if limit >= len(data):
        return data
    keep = stratified_split(data.y.numpy(), {"keep": limit}, seed)["keep"]
    return data.subset(torch.from_numpy(keep))


def target_split(
    split: str,
    *,
    labelled: int | None = 100,
    root: str | None = None,
    split_seed: int = 0,
    classes: Sequence[int] | None = None,
    limit: int | None = None,
) -> Dataset:
    """The target task: MNIST's ``target`` half (train) or MNIST val / test. On train only
    ``labelled`` stratified samples keep their labels (None: all). ``classes``: restrict and
    renumber first (the cross-task student's digits); ``limit``: a stratified subset, taken
    before the labels are chosen."""
    if split not in ("train", "val", "test"):
        raise ConfigError("target.split", split, "train, val or test")
    data = _mnist(root, split, split_seed)
    if split == "train":
        data = data.subset(torch.from_numpy(mnist_halves(root, split_seed)["target"]))
    if classes is not None:
        data = class_subset(data, classes)
    if limit is not None:
        data = stratified_limit(data, limit, split_seed + 3, "target.limit")
    if split == "train" and labelled is not None:
        if isinstance(labelled, bool) or not isinstance(labelled, int) or not (
            data.num_classes <= labelled <= len(data)
        ):
            raise ConfigError("target.labelled", labelled,
                              f"an int in {data.num_classes}..{len(data)} (one per class at least)")
        keep = stratified_split(data.y.numpy(), {"keep": labelled}, split_seed + 1)["keep"]
        y = torch.full_like(data.y, IGNORE_INDEX)
        y[torch.from_numpy(keep)] = data.y[torch.from_numpy(keep)]
        data.tensors["y"] = y
    data.info = {**data.info, "labelled": labelled if split == "train" else None,
                 "target": "MNIST target half" if split == "train" else f"MNIST {split}"}
    return data


def labelled_part(data: Dataset) -> Dataset:
    """The rows of ``data`` that carry a label."""
    return data.subset(torch.nonzero(data.y != IGNORE_INDEX).flatten())


def oversample_labelled(data: Dataset, ratio: float = 7.0) -> Dataset:
    """``data`` with its labelled rows repeated (whole copies, same ids) until there are about
    ``ratio`` unlabelled rows per labelled one; nothing changes when there are fewer."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0:
        raise ConfigError("target.ratio", ratio, "a positive number of unlabelled per labelled")
    lab = torch.nonzero(data.y != IGNORE_INDEX).flatten()
    n_u = len(data) - len(lab)
    if len(lab) == 0:
        raise ConfigError("target.labelled", 0, "at least one labelled sample")
    copies = max(1, round(n_u / ratio / len(lab)))
    if copies == 1:
        return data
    ids = torch.cat([torch.arange(len(data)), lab.repeat(copies - 1)])
    out = data.subset(ids)
    out.info = {**out.info, "labelled_copies": copies}
    return out
