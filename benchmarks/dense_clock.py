"""Block ``clock`` of benchmarks/dense.py: CLoCKDistill for DETRs on digit canvases.

Teacher: tiny DETR (width 64, 2+2 layers, 6 queries) on the clean canvases, trained with the
set loss plus ``query_recon`` so its target-query branch answers ground-truth queries
(``methods.clockdistill.teacher_terms``). Student: tiny DETR of width 32, same schedule for
every arm (not tuned per method):

- ``set``: the DETR set loss alone (the student trained alone);
- ``backbone``: + MSE on the projected backbone maps (feature KD on the backbone);
- ``matched``: + Hungarian-matched logit and box KD between the learned queries;
- ``memory`` / ``query``: one CLoCKDistill term (ablations);
- ``clock``: + location-weighted memory MSE + target-aware query KD (the paper).

Claim (the paper's): memory + target-aware-query KD > backbone-feature KD and >
Hungarian-matched logit KD, in mAP.
"""

from __future__ import annotations

from pathlib import Path

import dense_common as C
import torch

import crossdistill as cd
from crossdistill.methods import build
from crossdistill.methods import clockdistill as CK

BLOCK = "clock"
METHODS = ["set", "backbone", "matched", "memory", "query", "clock"]
BASELINE = "set"
METRIC = ("test_map", "test mAP", 100.0)
EXTRA = [("test_map50", "test mAP@0.5")]
TASK = {"name": "detection", "head": "set"}
PROFILES = {
    "full": dict(size=56, n={"train": 1200, "val": 300, "test": 400}, batch_size=32,
                 lr=1e-3, epochs=30, teacher_epochs=40, t_width=64, s_width=32, queries=6),
    "quick": dict(size=56, n={"train": 64, "val": 32, "test": 32}, batch_size=16,
                  lr=1e-3, epochs=2, teacher_epochs=2, t_width=32, s_width=16, queries=4),
}
COST = {m: 1.0 for m in METHODS}
CLAIMS = [dict(name="CLoCKDistill", pairs=[("clock", "backbone"), ("clock", "matched")],
               text="memory + target-aware-query KD > backbone-feature KD and > "
               "Hungarian-matched logit KD")]
TEACHER_KEYS = ("size", "n", "batch_size", "lr", "teacher_epochs", "t_width", "queries")


def detr(P: dict, width: int):
    return cd.models.create("detr-tiny", img_size=P["size"], width=width, queries=P["queries"])


def teachers(P: dict, cache: Path) -> dict:
    _, meta = teacher(P, cache)
    return {"detr_teacher": meta}


def teacher(P: dict, cache: Path, retrain: bool = True):
    def train(model):
        row, t = C.fit(model, None, CK.teacher_terms(), P, 0, task=TASK,
                       epochs=P["teacher_epochs"], metric="map", **CK.distiller_kwargs())
        return {"test_map": row["test_map"], "val_map": max(row["val_curve"]),
                "params": row["student_params"]}

    return C.teacher("detr", lambda: detr(P, P["t_width"]), train, P, TEACHER_KEYS, cache,
                     retrain)


def run(method: str, seed: int, P: dict, cache: Path) -> dict:
    t, _ = teacher(P, cache, retrain=False)
    torch.manual_seed(seed)
    s = detr(P, P["s_width"])
    if method == "set":
        terms, t = [cd.Term("set_loss", student=["output.logits", "output.boxes"],
                            teacher=None)], None
    else:
        terms = build("clockdistill", s, t, variant=method).terms
    kw = CK.distiller_kwargs() if t is not None else {}
    row, tr = C.fit(s, t, terms, P, seed, task=TASK, epochs=P["epochs"], metric="map", **kw)
    row["test_map50"] = tr.results.get("test_map50") if tr.results else None
    return row
