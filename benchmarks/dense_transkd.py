"""Block ``transkd`` of benchmarks/dense.py: TransKD between two tiny SegFormers on 56x56 digit
canvases (11 classes, mIoU).

Teacher: ``segformer-tiny`` of widths (32, 64, 128, 256) (1.18M parameters; seed 0, cached;
batch 16, lr 4e-3, 20 epochs); student: ``segformer-tiny`` of widths (16, 32, 64, 128)
(0.30M), both MiT's 4 stages of strides 4, 2, 2, 2 (14, 7, 4, 2 cell grids), one block per
stage. One student schedule for every arm (AdamW, batch 8, lr 6e-3, cosine, 15 epochs; not
tuned per method); the task loss of every arm, the teacher's included, is the paper's
class-weighted CE (weights ``1 / ln(1.10 + p_k)`` from the train split's label frequencies:
about 1.4 for background, 10 for each digit, as ink covers about 6 % of a canvas); mIoU on
test at the best val epoch:

- ``ce``: the student alone;
- ``hcl``: + HCL on every stage map, projected by a 1x1 conv (the feature-map-only KD the
  paper compares with; ``methods.transkd.hcl_kd``);
- ``transkd``: + CSF (cross-stage SK fusion, then HCL per stage) + PEA (patch-embedding
  alignment, weights 0.1, 0.1, 0.5, 1) (the paper; ``methods.transkd.transkd``).

The CSF / PEA ablations (``build("transkd", ..., pea_weight=0)`` / ``csf_weight=0``) are left
out: the full profile already uses the 12 worker-minute budget.

Claim (the paper's): TransKD (CSF + PEA) > feature-map-only KD (HCL) > the student alone.
"""

from __future__ import annotations

from pathlib import Path

import dense_common as C
import torch

import crossdistill as cd
import crossdistill.methods.transkd  # noqa: F401  (registers transkd, hcl_kd)
import crossdistill.models.segformer  # noqa: F401  (registers segformer-tiny)
from crossdistill.losses.transkd import frequency_weights
from crossdistill.methods import build

BLOCK = "transkd"
METHODS = ["ce", "hcl", "transkd"]
BASELINE = "ce"
METRIC = ("test_miou", "test mIoU", 100.0)
TASK = {"name": "segmentation", "target": "seg", "num_classes": 11}
PROFILES = {
    "full": dict(size=56, n={"train": 720, "val": 200, "test": 400}, batch_size=8,
                 lr=6e-3, epochs=15, teacher_batch_size=16, teacher_lr=4e-3,
                 teacher_epochs=20, t_widths=(32, 64, 128, 256), s_widths=(16, 32, 64, 128),
                 t_decoder=64, s_decoder=32),
    "quick": dict(size=56, n={"train": 64, "val": 32, "test": 32}, batch_size=16,
                  lr=6e-3, epochs=2, teacher_batch_size=16, teacher_lr=6e-3, teacher_epochs=2,
                  t_widths=(16, 32, 32, 64), s_widths=(8, 16, 16, 32), t_decoder=16,
                  s_decoder=16),
}
COST = {"ce": 1.0, "hcl": 1.45, "transkd": 1.7}
CLAIMS = [dict(name="TransKD", pairs=[("transkd", "hcl"), ("hcl", "ce")],
               text="TransKD (CSF + PEA) > feature-map-only KD (HCL) > the student alone")]
TEACHER_KEYS = ("size", "n", "teacher_batch_size", "teacher_lr", "teacher_epochs", "t_widths",
                "t_decoder")


def segformer(P: dict, widths, decoder_dim: int):
    return cd.models.create("segformer-tiny", num_classes=11, img_size=P["size"],
                            widths=tuple(widths), decoder_dim=decoder_dim)


def class_weights(P: dict) -> tuple[float, ...]:
    """The task loss's class weights from the train split's label frequencies."""
    tr, _, _ = C.splits(P)
    return tuple(frequency_weights(tr.tensors["seg"], 11))


def task_term(P: dict) -> cd.Term:
    return cd.Term("class_weighted_ce", name="ce", weights=class_weights(P))


def teacher(P: dict, cache: Path, retrain: bool = True):
    def train(model):  # its own batch size and lr (the wider model prefers larger batches)
        tp = dict(P, batch_size=P["teacher_batch_size"], lr=P["teacher_lr"])
        row, _ = C.fit(model, None, [task_term(P)], tp, 0, task=TASK,
                       epochs=P["teacher_epochs"], metric="miou")
        return {"test_miou": row["test_miou"], "val_miou": max(row["val_curve"]),
                "val_curve": row["val_curve"], "params": row["student_params"]}

    return C.teacher("segformer", lambda: segformer(P, P["t_widths"], P["t_decoder"]), train,
                     P, TEACHER_KEYS, cache, retrain)


def teachers(P: dict, cache: Path) -> dict:
    return {"segformer_teacher": teacher(P, cache)[1]}


def run(method: str, seed: int, P: dict, cache: Path) -> dict:
    t, _ = teacher(P, cache, retrain=False)
    torch.manual_seed(seed)
    s = segformer(P, P["s_widths"], P["s_decoder"])
    cw = class_weights(P)
    if method == "ce":
        terms, t = [task_term(P)], None
    elif method == "hcl":
        terms = build("hcl_kd", s, t, class_weights=cw).terms
    elif method == "transkd":
        terms = build("transkd", s, t, class_weights=cw).terms
    else:
        raise ValueError(method)
    row, _ = C.fit(s, t, terms, P, seed, task=TASK, epochs=P["epochs"], metric="miou")
    return row
