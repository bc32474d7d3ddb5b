"""Block ``fss`` of benchmarks/dense.py: DistillFSS, few-shot segmentation on digit canvases.

Data (``fewshot-canvas``): 56x56 canvases of 2-3 non-overlapping MNIST digits (20x20 central
crops); base digits 0-4, novel 5-9 held out. An episode is a target digit, K = 5 support
canvases with its binary masks and a query whose target is the ink of that digit (the other
digits are background).

Teacher (cached, seed 0): ``proto-fss`` (masked average pooling of support features, cosine
coarse maps at H/2 and H/4, small decoder), trained by episodes on the base classes only
(queries and supports from the train digits of 0-4; ``teacher_shots`` supports per episode,
any K at test; cross-entropy with the target class weighted 5: plain CE collapsed to
all-background at width 16, the target being ~4 % of the pixels), selected on base val
episodes. Each seed draws another 5-shot task for the
novel classes (``support_seed`` = seed: which 5 canvases per class are labelled) and
another student initialisation; queries (val: checkpoint selection, test: read once) are
the same canvases for every seed. Rows, fg IoU of the target digit on novel test queries:

- ``teacher``: the base-trained teacher with the 5 shots as its support (no training);
- ``finetune``: the DistillFSS student architecture (the teacher's encoder and decoder + new
  per-class blocks, encoder frozen) trained on the 25 shots with CE alone, weighted as the
  teacher's (the claim's fine-tune baseline);
- ``distillfss``: the same student distilled from the teacher on the same 25 shots, each
  shot the query with the other 4 as the teacher's support: 1/2 focal(student, argmax
  teacher) + 1/2 coarse-map MSE, no labels (``methods.distillfss``, stage distill);
- ``refine``: DistillFSS's refinement loss from the start (labels too): 1/3 [focal(support
  path, y) + focal(student, y) + coarse MSE], its focal terms class-weighted as the
  baseline's CE (unweighted, it fell to 43 % fg IoU at seed 0, the label terms pulling
  towards background); the official ``parameters/distill/*.yaml`` recipes train with this
  loss (``refine_distill``), so both rows are DistillFSS in the claims.

One schedule for the three students (AdamW, cosine, not tuned per method). ``ms_per_query``:
CPU time per query at batch 1 on one thread (``time.process_time``; robust to a shared
machine): the teacher encodes its 5 supports for each query, as it is called; the student
runs the teacher's query path (encoder + decoder) with its blocks in place of the
prototype matching. With prototypes cached once per class the prototype teacher would cost
about what the student costs: the saving here is the support encoding (the paper's teachers,
DCAMA and others, attend over every support pixel per query and cannot be cached that way).
"""

from __future__ import annotations

import time
from pathlib import Path

import dense_common as C
import torch

import crossdistill as cd
from crossdistill.data.fewshot import fewshot_dataset
from crossdistill.methods import build
from crossdistill.methods import distillfss as DF
from crossdistill.models import fewshot as MF

BLOCK = "fss"
METHODS = ["teacher", "finetune", "distillfss", "refine"]
BASELINE = "finetune"
METRIC = ("test_fg_iou", "test fg IoU (novel)", 100.0)
EXTRA = [("test_miou", "test mIoU (fg/bg)"), ("ms_per_query", "CPU ms / query")]
SCALES = {"ms_per_query": 1.0}
STAGE = {"finetune": "ce", "distillfss": "distill", "refine": "refine"}
PROFILES = {
    "full": dict(size=56, max_digits=3, min_digits=2, shots=5, teacher_shots=2,
                 base=[0, 1, 2, 3, 4], novel=[5, 6, 7, 8, 9],
                 n_base={"train": 1000, "val": 150}, n_novel={"val": 100, "test": 400},
                 width=16, batch_size=16, lr=3e-3, teacher_epochs=8, fg_weight=5.0,
                 weighted=["ce", "refine"], shot_batch=5, student_lr=3e-3, epochs=40,
                 time_queries=50),
    "quick": dict(size=56, max_digits=3, min_digits=2, shots=5, teacher_shots=2,
                  base=[0, 1, 2, 3, 4], novel=[5, 6, 7, 8, 9],
                  n_base={"train": 32, "val": 16}, n_novel={"val": 10, "test": 10},
                  width=4, batch_size=16, lr=3e-3, teacher_epochs=1, fg_weight=5.0,
                  weighted=["ce", "refine"], shot_batch=25,
                  student_lr=3e-3, epochs=2, time_queries=2),
}
COST = {"teacher": 0.2, "finetune": 1.0, "distillfss": 1.5, "refine": 1.6}
CLAIMS = [
    dict(name="DistillFSS", pairs=[("distillfss", "teacher"), ("refine", "teacher")],
         text="the student without support matches or beats the support-using teacher on "
         "novel classes (fg IoU), at a fraction of its inference cost"),
    dict(name="DistillFSS vs fine-tuning", pairs=[("distillfss", "finetune"),
                                                  ("refine", "finetune")],
         text="distilling the teacher on the K shots beats fine-tuning the same student on "
         "them with CE"),
]
TEACHER_KEYS = ("size", "max_digits", "min_digits", "teacher_shots", "base", "novel",
                "n_base", "width", "batch_size", "lr", "teacher_epochs", "fg_weight")


def _data_kw(P: dict) -> dict:
    return dict(size=P["size"], max_digits=P["max_digits"], min_digits=P["min_digits"],
                base=P["base"], novel=P["novel"])


def base_splits(P: dict):
    """Base-class episodes (train, val) for the teacher (memoised per worker)."""
    kw = dict(_data_kw(P), role="base", shots=P["teacher_shots"])
    return tuple(C._memo(("fss-base", str(sorted(kw.items())), s, P["n_base"][s]),
                         lambda s=s: fewshot_dataset(s, P["n_base"][s], **kw))
                 for s in ("train", "val"))


def novel_splits(P: dict, support_seed: int):
    """(shots, val, test) of the novel task drawn by ``support_seed``."""
    kw = dict(_data_kw(P), role="novel", shots=P["shots"], support_seed=support_seed)
    key = ("fss-novel", str(sorted(kw.items())), str(P["n_novel"]))
    return C._memo(key, lambda: (
        fewshot_dataset("train", None, episodes="shots", **kw),
        fewshot_dataset("val", P["n_novel"]["val"], **kw),
        fewshot_dataset("test", P["n_novel"]["test"], **kw)))


def make_teacher(P: dict):
    return cd.models.create("proto-fss", width=P["width"], img_size=P["size"])


def teacher(P: dict, cache: Path, retrain: bool = True):
    def train(model):
        tr, va = base_splits(P)
        d = cd.Distiller(model, None, DF.teacher_terms(P["fg_weight"]), seed=0,
                         **DF.teacher_kwargs())
        t = cd.Trainer(d, tr, va, None, **C.train_kw(P, P["teacher_epochs"], 0))
        res = t.fit()
        _, _, test = novel_splits(P, 0)
        nov = cd.train.evaluate(model, test, task=DF.TASK, io=DF.TEACHER_IO)
        return {"val_miou_base": res["best_val_miou"], "val_curve": C.curve(t, "val_miou"),
                "test_fg_iou_novel_seed0": nov["iou"][1], "params": res["student_params"]}

    return C.teacher("protofss", lambda: make_teacher(P), train, P, TEACHER_KEYS, cache,
                     retrain)


def teachers(P: dict, cache: Path) -> dict:
    return {"protofss_teacher": teacher(P, cache)[1]}


@torch.no_grad()
def ms_per_query(model, data, inputs: dict, n: int) -> float:
    """CPU milliseconds per query, batch 1, after one warm-up call."""
    was = model.training
    model.eval()
    rows = [{k: v[i : i + 1] for k, v in data.tensors.items()} for i in range(min(n, len(data)))]
    args = [{a: b[k] for a, k in inputs.items() if not k.startswith("?")} for b in rows]
    model(**args[0])
    t0 = time.process_time()
    for a in args:
        model(**a)
    model.train(was)
    return 1000 * (time.process_time() - t0) / len(args)


def run(method: str, seed: int, P: dict, cache: Path) -> dict:
    t, _ = teacher(P, cache, retrain=False)
    shots, val, test = novel_splits(P, seed)
    if method == "teacher":
        res = cd.train.evaluate(t, test, task=DF.TASK, io=DF.TEACHER_IO)
        return {"test_fg_iou": res["iou"][1], "test_miou": res["miou"],
                "ms_per_query": ms_per_query(t, test, DF.TEACHER_IO["inputs"],
                                             P["time_queries"])}
    if method not in STAGE:
        raise ValueError(method)
    torch.manual_seed(seed)
    s = MF.student_from_teacher(t, P["novel"])
    stage = STAGE[method]
    weights = {"class_weights": [1.0, P["fg_weight"]]} if stage in P["weighted"] else {}
    recipe = build("distillfss", s, t, stage=stage, **weights)
    d = cd.Distiller(s, t if stage != "ce" else None, recipe.terms, seed=seed,
                     **DF.distiller_kwargs(stage))
    kw = C.train_kw({"batch_size": P["shot_batch"], "lr": P["student_lr"]}, P["epochs"], seed)
    tr = cd.Trainer(d, shots, val, test, **kw)
    res = tr.fit()
    return {"test_fg_iou": res["test_iou"][1], "test_miou": res["test_miou"],
            "val_curve": C.curve(tr, "val_miou"), "best_epoch": res["best_epoch"],
            "epochs": P["epochs"], "trainable_params": sum(
                p.numel() for p in s.parameters() if p.requires_grad),
            "ms_per_query": ms_per_query(s, test, DF.STUDENT_IO["inputs"], P["time_queries"])}


def notes(rows, P) -> str:
    ms = {m: [r["ms_per_query"] for r in rows if r["method"] == m and "ms_per_query" in r]
          for m in ("teacher", "distillfss")}
    if not all(ms.values()):
        return ""
    t, s = (sum(v) / len(v) for v in ms.values())
    return (f"CPU ms per query (batch 1, one thread): teacher with its {P['shots']} supports "
            f"{t:.1f}, DistillFSS student (no support) {s:.1f}: {t / s:.1f}x cheaper. The "
            "student runs the teacher's query path; the teacher's extra cost is encoding the "
            "support per query (with prototypes cached per class a prototype teacher would "
            "cost about the same as the student; attention-based teachers such as DCAMA "
            "cannot cache that way).")
