"""Block ``prune`` of benchmarks/dense.py: GCP + SAD on digit-canvas segmentation.

Teacher: a U-Net ``seg-cnn`` (width ``t_width``) after GCP's stage 1, dynamic sparse training
(CE + s * L1 on the BN gammas, the kept 65 % relieved to 1 % of it from 40 % of the epochs;
seed 0, cached). Every arm starts from a copy of it, loses ``ratio`` (50 %) of each pruning
group's channels by group channel pruning (per (scale, module type) gamma thresholds,
shortcut-linked layers merged; the plan is the same in every arm and seed: it depends only on
the teacher's gammas) and is fine-tuned on the same schedule (AdamW, cosine, not tuned per
method); mIoU on test at the best val epoch. Fine-tuning runs at ``ft_lr``, a tenth of the
teacher's lr (seed 0, CE only: at 3e-3 the pruned model collapses to all-background for the
whole run; at 1e-3 it sits near background for 6 of 8 epochs and jumps at the end):

- ``finetune``: pruned + fine-tuning (CE only), the baseline;
- ``kd``: pruned + plain logit KD (CE + KD at T = 3 per pixel) from the unpruned teacher;
- ``sad``: pruned + spatial attention distilling (CE + sum_l b_l * SAD on enc1, enc2, enc3,
  dec1, dec2; b_l = sad_beta * H_l * W_l) from the unpruned teacher (GCP + SAD). sad_beta
  0.1 was chosen on val (seed 0, the canvases before their 24x24-digit revision: val mIoU
  10.94 at 0.1 vs 10.22 at 1.0, where SAD starts at about twice the CE and the first epoch
  falls below the pruned model's own level).

Claim (the paper's): pruned + SAD recovers more than pruned + fine-tuning and than pruned +
plain KD, at the same size. ``params (k)`` is the pruned student's parameter count in
thousands (the same in every arm); the notes give the unpruned count, and the teacher's
metadata the pruned model's mIoU before fine-tuning.
"""

from __future__ import annotations

import copy
from pathlib import Path

import dense_common as C
import torch

import crossdistill as cd
import crossdistill.methods.gcp_sad  # noqa: F401  (registers gcp_sad, sad, bn_l1, slice_inputs)
from crossdistill import prune as PR
from crossdistill.methods import build
from crossdistill.structure import apply

BLOCK = "prune"
METHODS = ["finetune", "kd", "sad"]
BASELINE = "finetune"
METRIC = ("test_miou", "test mIoU", 100.0)
EXTRA = [("params_k", "params (k)")]
SCALES = {"params_k": 1.0}
TASK = {"name": "segmentation", "target": "seg", "num_classes": 11}
DISTILL = {"finetune": "none", "kd": "kd", "sad": "sad"}
PROFILES = {
    "full": dict(size=56, n={"train": 600, "val": 200, "test": 400}, batch_size=32, lr=3e-3,
                 ft_lr=3e-4, epochs=9, teacher_epochs=15, t_width=16, sparsity=0.001,
                 ratio=0.5, sad_beta=0.1, temperature=3.0),
    "quick": dict(size=32, max_digits=1, n={"train": 64, "val": 32, "test": 32}, batch_size=16,
                  lr=3e-3, ft_lr=3e-4, epochs=2, teacher_epochs=2, t_width=4, sparsity=0.001,
                  ratio=0.5, sad_beta=0.1, temperature=3.0),
}
COST = {"finetune": 1.0, "kd": 1.8, "sad": 1.9}
CLAIMS = [dict(name="GCP+SAD", pairs=[("sad", "finetune"), ("sad", "kd")],
               text="pruned + SAD recovers more than pruned + fine-tuning and than pruned + "
               "plain logit KD, at the same size")]
TEACHER_KEYS = ("size", "max_digits", "n", "batch_size", "lr", "teacher_epochs", "t_width",
                "sparsity")


def unet(P: dict):
    return cd.models.create("seg-cnn", num_classes=11, img_size=P["size"], width=P["t_width"])


def pruned_copy(model, P: dict):
    """The teacher pruned by the block's plan, before any fine-tuning, and the plan."""
    plan = PR.plan(model, P["ratio"], input_size=P["size"])
    out = copy.deepcopy(model)
    for e in plan.events:
        apply(out, e["op"], {k: v for k, v in e.items() if k != "op"})
    return out, plan


def teacher(P: dict, cache: Path, retrain: bool = True):
    def train(model):
        recipe = build("gcp_sad", model, None, stage="sparse", sparsity=P["sparsity"],
                       epochs=P["teacher_epochs"], input_size=P["size"])
        try:
            row, _ = C.fit(model, None, recipe.terms, P, 0, task=TASK,
                           epochs=P["teacher_epochs"], metric="miou")
        finally:
            PR.release(model)
        _, _, te = C.splits(P)
        small, plan = pruned_copy(model, P)
        gammas = torch.cat([m.weight.detach().abs() for m in model.modules()
                            if isinstance(m, torch.nn.BatchNorm2d)])
        return {"test_miou": row["test_miou"], "val_miou": max(row["val_curve"]),
                "val_curve": row["val_curve"], "params": PR.count_params(model),
                "pruned_params": PR.count_params(small), "channels": list(plan.channels),
                "pruned_test_miou": cd.evaluate(small, te, task=TASK)["miou"],
                "gamma_quantiles": [float(q) for q in gammas.quantile(
                    torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9]))]}

    return C.teacher("prune", lambda: unet(P), train, P, TEACHER_KEYS, cache, retrain)


def teachers(P: dict, cache: Path) -> dict:
    return {"sparse_unet_teacher": teacher(P, cache)[1]}


def run(method: str, seed: int, P: dict, cache: Path) -> dict:
    t, meta = teacher(P, cache, retrain=False)
    torch.manual_seed(seed)
    s = unet(P)
    s.load_state_dict(t.state_dict())  # the sparse-trained model, pruned by the recipe
    recipe = build("gcp_sad", s, t, ratio=P["ratio"], distill=DISTILL[method],
                   input_size=P["size"], sad_beta=P["sad_beta"], temperature=P["temperature"])
    row, _ = C.fit(s, t if method != "finetune" else None, recipe.terms, dict(P, lr=P["ft_lr"]),
                   seed, task=TASK, epochs=P["epochs"], metric="miou", hooks=recipe.hooks)
    row.update(params=recipe.params[1], params_k=recipe.params[1] / 1000,
               params_before=recipe.params[0], channels=list(recipe.plan.channels))
    return row


def notes(rows: list[dict], P: dict) -> str:
    r = next((r for r in rows if "params_before" in r), None)
    if r is None:
        return ""
    return (f"Params {r['params_before']} unpruned -> {r['params']} after pruning "
            f"{P['ratio']:.0%} of each group's channels (kept {r['channels'][0]} of "
            f"{r['channels'][1]} conv channels; shortcut-linked layers keep the union). The "
            "teacher's metadata gives the sparse teacher's mIoU and the pruned model's mIoU "
            "before fine-tuning (pruned_test_miou).")
