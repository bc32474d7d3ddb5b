"""What the dense-prediction blocks (benchmarks/dense_*.py) share: the canvases, training one
cell, and teachers cached by a hash of their settings.

Data: ``detection-canvas`` (56x56 by default; 1-3 non-overlapping MNIST digits per canvas,
train canvases from the 6k train digits, val/test from the held-out val/test digits), which
carries the label map (``seg``, 11 classes) and the boxes of every canvas, so segmentation
and detection blocks read the same images.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from crossmodal import _memo, curve, load_cached, save_cached, train_kw  # noqa: F401
from hetero import cache_key

import crossdistill as cd

CACHE_VERSION = 2  # 2: digits cropped to 24x24 (data.detection crop); v1 teachers are stale


def splits(P: dict, **extra):
    """(train, val, test) detection canvases at the profile's sizes (memoised per worker)."""
    params = dict(size=P["size"], max_digits=P.get("max_digits", 3), views=P.get("views",
                  ["clean"]), **extra)
    n = P["n"]
    key = ("canvas", json.dumps(params, sort_keys=True), json.dumps(n, sort_keys=True))
    return _memo(key, lambda: tuple(
        cd.data.load_split("detection-canvas", s, n=n[s], **params)
        for s in ("train", "val", "test")))


def fit(student, teacher, terms, P: dict, seed: int, *, task, epochs: int, metric: str,
        callbacks=(), **distiller_kw) -> tuple[dict, cd.Trainer]:
    """One cell: distil, pick the best epoch on val, read test once. Returns the row
    (``test_<metric>``, ``val_curve``, ``best_epoch``, ``epochs``) and the trainer."""
    tr, va, te = splits(P)
    d = cd.Distiller(student, teacher, terms, task=task, seed=seed, **distiller_kw)
    t = cd.Trainer(d, tr, va, te, callbacks=list(callbacks), **train_kw(P, epochs, seed))
    res = t.fit()
    row = {f"test_{metric}": res[f"test_{metric}"], "val_curve": curve(t, f"val_{metric}"),
           "best_epoch": res["best_epoch"], "epochs": epochs,
           "student_params": res["student_params"]}
    return row, t


def teacher(name: str, make, train, P: dict, keys, cache: Path, retrain: bool = True):
    """``(model, meta)`` of a teacher cached under ``cache`` by a hash of ``P[keys]``:
    ``make()`` builds it, ``train(model) -> meta`` trains it (seed 0) on a cache miss."""
    cfg = dict(kind=f"dense-{name}", P={k: P.get(k) for k in keys}, v=CACHE_VERSION)
    path = cache / f"dense-{name}-{cache_key(cfg)}.safetensors"
    torch.manual_seed(0)
    model = make()
    if (hit := load_cached(model, path)) is not None:
        return hit
    if not retrain:
        return None, None
    return save_cached(model, path, train(model))
