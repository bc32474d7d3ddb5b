"""Fixed, seeded, stratified splits: the same ids land in the same split on every machine."""

from __future__ import annotations

import numpy as np


def stratified_split(y: np.ndarray, sizes: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Split sample indices into named parts of exactly the given sizes, classes spread evenly.

    Each class is shuffled with ``seed``; its i-th sample gets the key (i + 0.5) / n_class, so
    sorting all samples by key interleaves the classes in proportion. Consecutive runs of that
    order form the parts: every part's class balance matches the whole set's (to one sample).
    """
    y = np.asarray(y)
    total = sum(sizes.values())
    if total > len(y):
        raise ValueError(f"split sizes {sizes} need {total} samples, only {len(y)} exist")
    rng = np.random.default_rng(seed)
    keys = np.empty(len(y))
    for c in np.unique(y):
        ids = np.flatnonzero(y == c)
        rng.shuffle(ids)
        keys[ids] = (np.arange(len(ids)) + 0.5) / len(ids)
    order = np.lexsort((rng.random(len(y)), keys))
    out, start = {}, 0
    for name, n in sizes.items():
        out[name] = np.sort(order[start : start + n])
        start += n
    return out
