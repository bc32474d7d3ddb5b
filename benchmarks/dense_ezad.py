"""Block ``ezad`` of benchmarks/dense.py: EZAD, zero-shot annotation detection on canvases.

Digits 0-4 are boxed in the training canvases; 5-9 are on the same images but unlabelled.
The CLIP stand-in (``ezad-clip``: a tiny ViT aligned to the all-MiniLM-L6-v2 embeddings of
the digit names, trained with CE on whole MNIST digits of every class, as CLIP saw every
class; seed 0, cached) gives the region targets; ``adapt_ln`` tunes only its LayerNorms on
base-class canvas crops (EZAD's domain adaptation; cached). The student is
``ezad-centernet`` (objectness + an embedding head classified by cosine to the text
embeddings), one schedule for every arm; mAP on the *novel* digits of the test canvases at
the best val epoch (val canvases label every digit; selection on val mAP over all classes):

- ``base-only``: the detector on the base labels alone (no distillation: novel AP ~ 0);
- ``raw-gt``: + L1 distillation of the raw teacher's embeddings of the labelled boxes (raw
  CLIP targets on base-biased regions);
- ``adapted-gt`` / ``raw-proposals``: one of EZAD's two changes (ablations);
- ``ezad``: LN-adapted teacher targets on the labelled boxes + the teacher's novel-class
  proposals (EZAD).
"""

from __future__ import annotations

import json
from pathlib import Path

import dense_common as C
import torch
from crossmodal import _memo, train_kw

import crossdistill as cd
from crossdistill.methods import build
from crossdistill.methods import ezad as E

BLOCK = "ezad"
METHODS = ["base-only", "raw-gt", "adapted-gt", "raw-proposals", "ezad"]
BASELINE = "base-only"
METRIC = ("test_novel_map", "test novel mAP", 100.0)
EXTRA = [("test_novel_map50", "novel mAP@0.5"), ("test_map", "all-class mAP")]
TASK = {"name": "detection"}
PROFILES = {
    "full": dict(size=56, n={"train": 1200, "val": 300, "test": 400}, batch_size=32,
                 lr=3e-3, epochs=20, clip_epochs=6, clip_n=6000, adapt_epochs=12, width=16,
                 k=4),
    "quick": dict(size=56, n={"train": 64, "val": 32, "test": 32}, batch_size=16,
                  lr=3e-3, epochs=2, clip_epochs=1, clip_n=256, adapt_epochs=1, width=4, k=2),
}
COST = {m: 1.0 for m in METHODS}
CLAIMS = [dict(name="EZAD", pairs=[("ezad", "raw-gt"), ("ezad", "base-only")],
               text="LN-adapted CLIP targets + CLIP proposals > raw CLIP targets on "
               "base-biased regions (novel AP)")]
TEACHER_KEYS = ("size", "n", "clip_epochs", "clip_n", "adapt_epochs")


def splits(P: dict):
    """Train canvases with only the base digits boxed; val / test label every digit."""
    n, params = P["n"], dict(size=P["size"], max_digits=3)
    key = ("ezad", json.dumps(n, sort_keys=True), P["size"])
    return _memo(key, lambda: (
        cd.data.load_split("detection-canvas", "train", n=n["train"],
                           labelled_classes=list(E.BASE), **params),
        cd.data.load_split("detection-canvas", "val", n=n["val"], **params),
        cd.data.load_split("detection-canvas", "test", n=n["test"], **params)))


def clip(P: dict, cache: Path, retrain: bool = True):
    """The CLIP stand-in, trained on whole digits of every class (cached)."""
    def train(model):
        tr = cd.data.load("mnist", "train", normalize=False)
        va = cd.data.load("mnist", "val", normalize=False)
        m = min(P["clip_n"], len(tr))
        tr = cd.data.Dataset.classification(tr.x[:m], tr.y[:m], name="digits", split="train")
        d = cd.Distiller(model, None, [cd.Term("ce")], seed=0)
        res = cd.Trainer(d, tr, va, **train_kw(dict(P, lr=1e-3, batch_size=64),
                                               P["clip_epochs"], 0)).fit()
        return {"val_acc": res.get("best_val_acc"), "params": res["student_params"]}

    return C.teacher("ezad-clip", lambda: cd.models.create("ezad-clip"), train, P,
                     TEACHER_KEYS, cache, retrain)


def adapted(P: dict, cache: Path, raw, retrain: bool = True):
    """``raw`` with its LayerNorms tuned on base-class crops of the train canvases (cached)."""
    def train(model):
        tr, va, _ = splits(P)
        model.load_state_dict(E.adapt_ln(raw, E.gt_crops(tr), E.gt_crops(va),
                                         epochs=P["adapt_epochs"]).state_dict())
        return {"adapt_epochs": P["adapt_epochs"]}

    return C.teacher("ezad-clip-ln", lambda: cd.models.create("ezad-clip"), train, P,
                     TEACHER_KEYS, cache, retrain)


def teachers(P: dict, cache: Path) -> dict:
    raw, meta = clip(P, cache)
    return {"clip": meta, "clip_ln": adapted(P, cache, raw)[1]}


def run(method: str, seed: int, P: dict, cache: Path) -> dict:
    raw, _ = clip(P, cache, retrain=False)
    ln, _ = adapted(P, cache, raw, retrain=False)
    tr, va, te = splits(P)
    data, w = E.variant_data(method, tr, raw, ln, k=P["k"])
    torch.manual_seed(seed)
    s = cd.models.create("ezad-centernet", img_size=P["size"], width=P["width"])
    terms = build("ezad", s, None, distill_weight=w).terms
    d = cd.Distiller(s, None, terms, task=TASK, seed=seed)
    t = cd.Trainer(d, data, va, te, **train_kw(P, P["epochs"], seed))
    res = t.fit()
    novel = E.novel_map(s, te)
    return {"test_novel_map": novel["map"], "test_novel_map50": novel.get("map50"),
            "test_map": res.get("test_map"), "val_curve": C.curve(t, "val_map"),
            "best_epoch": res["best_epoch"], "epochs": P["epochs"],
            "student_params": res["student_params"]}
