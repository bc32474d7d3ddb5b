"""Block ``unidistill`` of benchmarks/dense.py: UniDistill, cross-modality detection KD.

Paper: Zhou et al., "UniDistill: A Universal Cross-Modality Knowledge Distillation Framework
for 3D Object Detection in Bird's-Eye View", CVPR 2023 (``methods/unidistill.py``). The two
"modalities" are views of one 56x56 digit canvas: the teacher sees the clean canvas plus its
distance-to-ink map (``image_distance``, 2 channels), the students only a degraded view
(``image_noisy``: blurred, sigma 1.5, plus Gaussian noise 0.3). Teacher and students are
``centernet-tiny`` of width 8 (the same detector, as in the paper; the recipe puts a conv1x1
projector on the feature term when widths differ), the teacher trained with the CenterNet
loss (seed 0, cached). One schedule for every arm (not tuned per method):

- ``det``: the CenterNet loss alone (the single-modality student trained alone);
- ``feature`` / ``relation`` / ``response``: + one UniDistill term (the paper's ablation);
- ``unidistill``: + all three (the paper).

Claim (the paper's): UniDistill adds 2-3 points of mAP to the single-modality student, and
each term helps on its own. COCO mAP (0.50:0.95) and mAP@0.5 by pycocotools.

The view: ``noisy`` gives a modality gap at equal width (a width-8 student reaches about 41
val mAP on it, the distance teacher 63); on ``lowres`` a width-8 student nearly matched the
teacher in a pilot, leaving little to distil.

Weights (``WEIGHTS``): the paper's 100 (feature) and 40 (relation); the two response terms at
1 instead of 10 (the method's defaults stay the paper's). Chosen on val mAP in a pilot of
this profile (seed 0; the student alone: 42.2), each term alone at the paper's weight times
10^-k: feature 100 / 10 / 1 / 0.1 -> 54.7 / 53.8 / 49.2 / 41.5; relation 40 / 4 / 0.4 / 0.04
-> 48.6 / 46.3 / 43.1 / 44.4; heatmap 10 / 1 / 0.1 / 0.01 -> 41.0 / 42.5 / 40.7 / 43.7;
regression 10 / 1 / 0.1 / 0.01 -> 41.3 / 44.3 / 41.9 / 43.1; heatmap + regression at 1 ->
45.4; all four at the paper's weights -> 46.5, at ``WEIGHTS`` -> 52.5. Why the response
terms want less here: CenterNet trains its size and offset maps only at the centre cell, and
a third of the Gaussian's weight lies off it, where the teacher's regressions are
unsupervised (its offsets there miss the object's centre by 0.42 cells, 0.09 at the centre
cell); at weight 10 the L1's constant-size gradient (100 times the detection loss's own size
weight, 0.1) makes the student copy them. (In an earlier pilot on other canvases, whole
28x28 digit frames, a width-4 student on ``lowres`` lost mAP with every term at the paper's
weights: too small a student to absorb them.)

Budget (full profile, one thread, CPU seconds while other jobs shared the 2 cores): data
about 4 per worker, teacher 39, a ``det`` cell about 37, a single-term cell about 43, a
``unidistill`` cell about 50: about 11.7 worker-minutes for the 16 jobs. The baseline's val
mAP plateaus (range 0.4 points over its last 6 epochs in each of 3 seeds).
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
WEIGHTS = dict(feature_weight=100.0, relation_weight=40.0, heatmap_weight=1.0,
               regression_weight=1.0)
PROFILES = {
    "full": dict(size=56, n={"train": 500, "val": 200, "test": 400}, batch_size=32,
                 lr=2e-3, epochs=23, teacher_epochs=25, t_width=8, s_width=8, precise_bn=128,
                 view="noisy", views=["distance", "noisy"], weights=WEIGHTS),
    "quick": dict(size=32, max_digits=1, n={"train": 32, "val": 16, "test": 16},
                  batch_size=16, lr=2e-3, epochs=2, teacher_epochs=2, t_width=4, s_width=2,
                  view="noisy", views=["distance", "noisy"], weights=WEIGHTS),
}
COST = {"det": 37.0, "feature": 43.0, "relation": 43.0, "response": 43.0, "unidistill": 50.0}
CLAIMS = [
    dict(name="UniDistill", pairs=[("unidistill", "det")],
         text="all three terms add 2-3 mAP to the degraded-view student"),
    dict(name="UniDistill terms", pairs=[("feature", "det"), ("relation", "det"),
                                         ("response", "det")],
         text="each term alone helps the degraded-view student"),
]
TEACHER_KEYS = ("size", "max_digits", "n", "batch_size", "lr", "teacher_epochs", "t_width",
                "precise_bn")


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
