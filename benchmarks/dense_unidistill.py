"""Block ``unidistill`` of benchmarks/dense.py: UniDistill, cross-modality detection KD.

Paper: Zhou et al., "UniDistill: A Universal Cross-Modality Knowledge Distillation Framework
for 3D Object Detection in Bird's-Eye View", CVPR 2023 (``methods/unidistill.py``). The two
"modalities" are views of one 56x56 digit canvas: the teacher sees the clean canvas plus its
distance-to-ink map (``image_distance``, 2 channels), the students only a degraded view
(``image_<view>``, default ``lowres``: 4x average-pooled). Teacher: ``centernet-tiny`` of
width ``t_width`` trained with the CenterNet loss (seed 0, cached); students:
``centernet-tiny`` of width ``s_width`` (the low-level maps differ in width, so a conv1x1
projector bridges the feature term), one schedule for every arm (not tuned per method):

- ``det``: the CenterNet loss alone (the single-modality student trained alone);
- ``feature`` / ``relation`` / ``response``: + one UniDistill term (the paper's ablation);
- ``unidistill``: + all three (the paper).

Weights: the paper's 100 / 40 / 10 / 10 were set for BEV maps. ``weights`` in the profile
holds the block's values (see ``WEIGHT_NOTE``); the method's defaults stay the paper's.

Claim (the paper's): UniDistill adds 2-3 points of mAP to the single-modality student, and
each term helps on its own. COCO mAP (0.50:0.95) and mAP@0.5 by pycocotools.
"""

from __future__ import annotations

from pathlib import Path

import dense_common as C
import torch

import crossdistill as cd
from crossdistill.methods import build
from crossdistill.methods import unidistill as U

BLOCK = "unidistill"
METHODS = ["det", "feature", "relation", "response", "unidistill"]
BASELINE = "det"
METRIC = ("test_map", "test mAP", 100.0)
EXTRA = [("test_map50", "test mAP@0.5")]
TASK = {"name": "detection", "head": "centernet"}
PAPER = dict(feature_weight=100.0, relation_weight=40.0, heatmap_weight=10.0,
             regression_weight=10.0)
WEIGHT_NOTE = "the paper's weights"
PROFILES = {
    "full": dict(size=56, n={"train": 500, "val": 200, "test": 400}, batch_size=32,
                 lr=3e-3, epochs=20, teacher_epochs=25, t_width=8, s_width=4,
                 view="lowres", views=["distance", "lowres"], weights=PAPER),
    "quick": dict(size=56, n={"train": 48, "val": 16, "test": 16}, batch_size=16,
                  lr=3e-3, epochs=2, teacher_epochs=2, t_width=4, s_width=2,
                  view="lowres", views=["distance", "lowres"], weights=PAPER),
}
COST = {"det": 0.7, "feature": 1.0, "relation": 1.0, "response": 1.0, "unidistill": 1.1}
CLAIMS = [
    dict(name="UniDistill", pairs=[("unidistill", "det")],
         text="all three terms add 2-3 mAP to the degraded-view student"),
    dict(name="UniDistill terms", pairs=[("feature", "det"), ("relation", "det"),
                                         ("response", "det")],
         text="each term alone helps the degraded-view student"),
]
TEACHER_KEYS = ("size", "n", "batch_size", "lr", "teacher_epochs", "t_width")


def centernet(P: dict, width: int, in_channels: int):
    return cd.models.create("centernet-tiny", img_size=P["size"], width=width,
                            in_channels=in_channels)


def teacher(P: dict, cache: Path, retrain: bool = True):
    def train(model):
        row, _ = C.fit(model, None, None, P, 0, task=TASK, epochs=P["teacher_epochs"],
                       metric="map", io={"inputs": [U.view_key("distance", "view")]})
        return {"test_map": row["test_map"], "val_map": max(row["val_curve"]),
                "params": row["student_params"]}

    return C.teacher("unidistill-centernet", lambda: centernet(P, P["t_width"], 2), train, P,
                     TEACHER_KEYS, cache, retrain)


def teachers(P: dict, cache: Path) -> dict:
    return {"distance_teacher": teacher(P, cache)[1]}


def run(method: str, seed: int, P: dict, cache: Path) -> dict:
    if method not in METHODS:
        raise ValueError(method)
    t, _ = teacher(P, cache, retrain=False)
    torch.manual_seed(seed)
    s = centernet(P, P["s_width"], 1)
    kw = U.distiller_kwargs(P["view"])
    if method == "det":
        t, terms, kw = None, None, {"io": kw["io"]}
    else:
        terms = build("unidistill", s, t, variant=method, **P["weights"]).terms
    row, tr = C.fit(s, t, terms, P, seed, task=TASK, epochs=P["epochs"], metric="map", **kw)
    row["test_map50"] = tr.results.get("test_map50") if tr.results else None
    return row
