"""Block ``seg`` of benchmarks/dense.py: segmentation KD on digit canvases (11 classes).

Teacher: a U-Net ``seg-cnn`` of width 16 (CE, seed 0, cached). Student: ``seg-cnn`` of width
8 (about 4x fewer parameters). One schedule for every arm (AdamW, cosine, not tuned per
method); mIoU on test at the best val epoch:

- ``ce``: the student alone; ``mse``: + plain feature MSE (1x1-conv projected ``enc3`` and
  ``dec2`` maps: FitNets-style hints, the plain feature-KD row);
- ``static_mask``: + FGD-style teacher-attention-masked MSE on ``enc3`` (ACAM-KD's baseline);
- ``acam``: + ACAM-KD (cross-attention fusion, adaptive spatial/channel masks, on ``enc3``);
- ``esp_medsam``: ESP-MedSAM's decoupled encoder distillation: the student encoder regresses
  the teacher's ``enc3`` on the train canvases with labels voided (``encoder_epochs``), then
  the decoder trains on labels with the encoder frozen (the same epochs as every other arm).
"""

from __future__ import annotations

from pathlib import Path

import dense_common as C
import torch
from crossmodal import train_kw

import crossdistill as cd
from crossdistill.methods import build
from crossdistill.methods import esp_medsam as ESP

BLOCK = "seg"
METHODS = ["ce", "mse", "static_mask", "acam", "esp_medsam"]
BASELINE = "ce"
METRIC = ("test_miou", "test mIoU", 100.0)
EXTRA: list = []
TASK = {"name": "segmentation", "target": "seg", "num_classes": 11}
PROFILES = {
    # measured (1 thread, 1200 canvases): seg-cnn w8 6 s / epoch, w32 32 s / epoch
    "full": dict(size=56, n={"train": 600, "val": 200, "test": 400}, batch_size=32,
                 lr=3e-3, epochs=15, teacher_epochs=15, encoder_epochs=8, t_width=16,
                 s_width=8),
    "quick": dict(size=56, n={"train": 64, "val": 32, "test": 32}, batch_size=16,
                  lr=3e-3, epochs=2, teacher_epochs=2, encoder_epochs=1, t_width=8,
                  s_width=4),
}
COST = {"ce": 1.0, "mse": 1.3, "static_mask": 1.3, "acam": 1.6, "esp_medsam": 1.6}
CLAIMS = [
    dict(name="ACAM-KD", pairs=[("acam", "static_mask")],
         text="adaptive cooperative masks > static teacher-derived masks"),
    dict(name="ESP-MedSAM", pairs=[("esp_medsam", "ce")],
         text="decoupled encoder distillation > the small model trained alone"),
]
TEACHER_KEYS = ("size", "n", "batch_size", "lr", "teacher_epochs", "t_width")


def unet(P: dict, width: int):
    return cd.models.create("seg-cnn", num_classes=11, img_size=P["size"], width=width)


def teacher(P: dict, cache: Path, retrain: bool = True):
    def train(model):
        row, _ = C.fit(model, None, [cd.Term("ce")], P, 0, task=TASK,
                       epochs=P["teacher_epochs"], metric="miou")
        return {"test_miou": row["test_miou"], "val_miou": max(row["val_curve"]),
                "params": row["student_params"]}

    return C.teacher("unet", lambda: unet(P, P["t_width"]), train, P, TEACHER_KEYS, cache,
                     retrain)


def teachers(P: dict, cache: Path) -> dict:
    return {"unet_teacher": teacher(P, cache)[1]}


def esp_medsam(s, t, P: dict, seed: int) -> dict:
    """Stage 1 (encoder regression, unlabelled, last epoch kept), then C.fit's stage 2."""
    tr, _, _ = C.splits(P)
    recipe = build("esp_medsam", s, t, stage="encoder")
    d = cd.Distiller(s, t, recipe.terms, task=TASK, seed=seed)
    cd.Trainer(d, ESP.unlabelled(tr), None, **train_kw(P, P["encoder_epochs"], seed)).fit()
    d.close()
    recipe = build("esp_medsam", s, None, stage="decoder")
    try:
        row, _ = C.fit(s, None, recipe.terms, P, seed, task=TASK, epochs=P["epochs"],
                             metric="miou")
    finally:
        ESP.release(s)
    return row


def run(method: str, seed: int, P: dict, cache: Path) -> dict:
    t, _ = teacher(P, cache, retrain=False)
    torch.manual_seed(seed)
    s = unet(P, P["s_width"])
    if method == "esp_medsam":
        return esp_medsam(s, t, P, seed)
    terms = [cd.Term("ce")]
    if method == "mse":
        terms += [cd.Term("mse", student=tap, teacher=tap, projector="conv1x1", weight=1.0,
                          name=f"mse_{tap}") for tap in ("enc3", "dec2")]
    elif method in ("static_mask", "acam"):
        terms = build(f"{method}_kd", s, t).terms
    elif method != "ce":
        raise ValueError(method)
    row, _ = C.fit(s, t if method != "ce" else None, terms, P, seed, task=TASK,
                   epochs=P["epochs"], metric="miou")
    return row
