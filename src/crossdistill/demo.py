"""``crossdistill demo``: the default distillation on embedded data, end to end.

On scikit-learn's digits it trains a CNN teacher (cached by config hash), then a ViT and an
MLP student with four recipes (scratch, kd, dkd, feature mse through an auto projector),
three seeds each, selecting epochs on the validation split and testing once. It prints a
mean +- std table and writes ``<out>/report.html``. Everything goes through the same config
layer as ``crossdistill train``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from tqdm.auto import tqdm

from . import config as C
from .build import make_trainer
from .report import aggregate, format_table, pm, write_report
from .train.console import quiet

TEACHER = {"model": "cnn", "channels": [32, 64, 128]}
STUDENTS = {
    "vit": (
        {"model": "vit", "patch": 2, "dim": 48, "depth": 3, "heads": 4},
        {"student": "blocks.2", "teacher": "stage3"},
    ),
    "mlp": ({"model": "mlp", "hidden": [128, 64]}, {"student": "fc:input", "teacher": "fc:input"}),
}
RECIPES = {
    "scratch": lambda feat: [{"loss": "ce"}],
    "kd": lambda feat: [{"loss": "ce"}, {"loss": "kd", "temperature": 4.0, "weight": 0.9}],
    "dkd": lambda feat: [
        {"loss": "ce"},
        {"loss": "dkd", "alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup": 5},
    ],
    "fitnet": lambda feat: [{"loss": "ce"}, {"loss": "mse", "projector": "auto", **feat}],
}


def _train_cfg(epochs: int, seed: int, lr: float, optimizer: str) -> dict:
    return {
        "epochs": epochs,
        "optimizer": optimizer,
        "lr": lr,
        "weight_decay": 0.05 if optimizer == "adamw" else 5e-4,
        "schedule": "cosine",
        "seed": seed,
        "warmup_epochs": 1 if optimizer == "adamw" else 0,
        "progress": False,
    }


def _teacher(cache: Path, data: dict, epochs: int) -> tuple[Path, dict]:
    cfg = C.validate(
        {
            "name": "teacher",
            "student": TEACHER,
            "data": data,
            "terms": [{"loss": "ce"}],
            "train": _train_cfg(epochs, 0, 0.05, "sgd"),
        }
    )
    run = cache / f"teacher-{cfg.digest()}"
    if not (run / "results.json").is_file():
        tqdm.write(f"training the CNN teacher ({epochs} epochs) -> {run}")
        with quiet():
            make_trainer(cfg, run).fit()
        (run / "config.yaml").write_text(C.dump(cfg))
    else:
        tqdm.write(f"reusing the cached teacher {run}")
    return run / "student.safetensors", json.loads((run / "results.json").read_text())


def run_demo(
    out: str | Path = "runs/demo", seeds: int = 3, quick: bool = False, epochs: int | None = None
) -> dict:
    t0 = time.time()
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    data = {"name": "digits", "batch_size": 64}
    t_epochs, s_epochs = (2, 2) if quick else (20, 30)
    s_epochs = epochs or s_epochs
    ckpt, t_res = _teacher(Path("runs/cache"), data, t_epochs)
    jobs = [(s, r, seed) for s in STUDENTS for r in RECIPES for seed in range(seeds)]
    rows = []
    bar = tqdm(jobs, desc="demo: students", unit="run", dynamic_ncols=True, disable=None)
    for student, recipe, seed in bar:
        bar.set_postfix_str(f"{student}/{recipe}/seed{seed}")
        spec, feat = STUDENTS[student]
        cfg = C.validate(
            {
                "name": f"{student}-{recipe}-s{seed}",
                "data": data,
                "teacher": {**TEACHER, "checkpoint": str(ckpt)},
                "student": spec,
                "terms": RECIPES[recipe](feat),
                "train": _train_cfg(s_epochs, seed, 2e-3, "adamw"),
            }
        )
        run = out / student / recipe / f"seed{seed}"
        with quiet():  # the demo prints its own table, not every run's epoch lines
            res = make_trainer(cfg, run).fit()
        (run / "config.yaml").write_text(C.dump(cfg))
        rows.append({"student": student, "method": recipe, "seed": seed, **res})
    groups = aggregate(rows, ["student", "method"], ["test_acc", "best_val_acc"])
    scratch = {g["student"]: g["test_acc"] for g in groups if g["method"] == "scratch"}
    table = []
    for g in groups:
        g["label"] = f"{g['student']}/{g['method']}"
        g["test acc (%)"] = pm(g["test_acc"], g["test_acc_std"])
        g["val acc (%)"] = pm(g["best_val_acc"], g["best_val_acc_std"])
        g["vs scratch"] = f"{100 * (g['test_acc'] - scratch[g['student']]):+.2f}"
        g["seeds"] = g["n"]  # the report table reads groups by header
        table.append(
            [
                g["student"],
                g["method"],
                g["test acc (%)"],
                g["val acc (%)"],
                g["vs scratch"],
                g["n"],
            ]
        )
    headers = ["student", "method", "test acc (%)", "val acc (%)", "vs scratch", "seeds"]
    text = format_table(headers, table)
    note = (
        f"digits (train 1077 / val 360 / test 360); CNN teacher test acc "
        f"{100 * t_res['test_acc']:.2f}%; students {s_epochs} epochs, AdamW, best epoch on "
        f"val, test once; mean +- std over {seeds} seeds; {time.time() - t0:.0f}s total"
    )
    summary = {
        "note": note,
        "headers": headers,
        "groups": groups,
        "rows": rows,
        "teacher": t_res,
        "reference_acc": t_res["test_acc"],
        "reference_label": "teacher",
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    report = write_report(out, "crossdistill demo: CNN teacher -> ViT / MLP students on digits")
    print("\n" + text + "\n" + note)
    print(f"\nHTML report: {report}")
    return summary
