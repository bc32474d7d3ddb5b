"""Fixed-seed regression fingerprint: every method and every condenser at toy size.

Runs each registered method (a short KD run on sklearn digits) and each condenser (a few
synthesis iterations) with fixed seeds, one thread, and records the numbers that a change
to the engine must not move: per-epoch validation accuracy and training loss, test
accuracy, and a digest + sum of the final student weights / synthetic images.

    python benchmarks/regression.py --out benchmarks/results/regression_before.json
    python benchmarks/regression.py --compare benchmarks/results/regression_before.json

``--compare`` reruns and prints, per entry, whether the weights are bit-identical and the
largest difference of every recorded number.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

import crossdistill as cd
from crossdistill.methods import METHODS, build

SETTINGS = dict(epochs=6, batch_size=50, optimizer="adamw", lr=3e-3, progress=False, seed=0)
TINY_NET = {"net_kw": {"width": 8, "depth": 2}, "batch_real": 8}


def _digest(tensors) -> tuple[str, float]:
    h = hashlib.sha256()
    total = 0.0
    for t in tensors:
        t = t.detach().float().contiguous().cpu()
        h.update(t.numpy().tobytes())
        total += float(t.double().sum())
    return h.hexdigest()[:16], total


def _splits():
    return {
        s: cd.data.load("digits", s, limit=n)
        for s, n in (("train", 600), ("val", 200), ("test", 200))
    }


def _model(kind: str, seed: int):
    torch.manual_seed(seed)
    if kind == "vit":
        return cd.models.create(
            "vit", num_classes=10, in_channels=1, img_size=8, patch=2, dim=16, depth=2, heads=2
        )
    return cd.models.create("cnn", num_classes=10, in_channels=1, img_size=8, channels=(8, 16, 16))


def _teacher(splits):
    t = _model("cnn", 100)
    cd.Trainer(cd.Distiller(t), splits["train"], splits["val"], **{**SETTINGS, "epochs": 15}).fit()
    return t.eval()


def run_methods(splits) -> dict:
    from crossdistill.methods.collaborative import CollaborativePair

    out = {}
    teacher = _teacher(splits)
    for name in METHODS.names():
        if METHODS.meta(name).get("family") == "sequence":  # LM methods: not image classifiers
            continue
        student = _model("vit" if name in ("ofa", "scalekd") else "cnn", 1)
        t = None if name == "scratch" else teacher
        if name in ("collaborative", "dml"):
            student, t = CollaborativePair(_model("cnn", 1), _model("vit", 2)), None
        kw = {"num_negatives": 64} if name == "crd" else {}
        recipe = build(name, student, t, **kw)
        d = cd.Distiller(student, t, recipe.terms, num_samples=2000, hooks=recipe.hooks)
        torch.manual_seed(0)
        trainer = cd.Trainer(d, splits["train"], splits["val"], splits["test"], **SETTINGS)
        res = trainer.fit()
        digest, total = _digest(d.student.state_dict().values())
        out[name] = {
            "test_acc": res.get("test_acc"),
            "best_val_acc": res.get("best_val_acc"),
            "digest": digest,
            "weight_sum": total,
            "val_acc": [r.get("val_acc") for r in trainer.log.rows],
            "train_loss": [r.get("train_loss") for r in trainer.log.rows],
        }
    return out


def run_condensers(splits) -> dict:
    from crossdistill.condense import CONDENSERS
    from crossdistill.condense import harness as H

    out = {}
    for name in CONDENSERS.names():
        extra = {}
        if name.startswith("mtt"):
            extra = {"num_experts": 1, "syn_steps": 2, "max_start_epoch": 1, "expert_epochs": 1}
        elif name.startswith("ncfm"):
            extra = {"num_freqs": 32, "t_repeat": 4}
        elif name.startswith(("dc", "dsa")):
            extra = {"outer_loop": 2, "inner_loop": 1}
        kw = TINY_NET
        if name in ("sre2l", "cvdd", "infer", "nrr"):
            kw = {}
        try:
            syn = H.synthesize(
                name, splits["train"], ipc=1, iterations=2, seed=0, progress=False, **kw, **extra
            )
        except Exception as err:  # record, so a comparison shows it
            out[name] = {"error": f"{type(err).__name__}: {err}"[:300]}
            continue
        digest, total = _digest([syn.x, syn.y.float()])
        out[name] = {"digest": digest, "pixel_sum": total}
    return out


def collect() -> dict:
    torch.set_num_threads(1)
    splits = _splits()
    t0 = time.time()
    res = {"methods": run_methods(splits), "condensers": run_condensers(splits)}
    res["seconds"] = time.time() - t0
    return res


def compare(before: dict, after: dict) -> list[str]:
    lines = []
    for group in ("methods", "condensers"):
        for name, b in before[group].items():
            a = after[group].get(name)
            if a is None:
                lines.append(f"{group}/{name}: missing after")
                continue
            same = a.get("digest") == b.get("digest")
            diffs = {}
            for k, v in b.items():
                if isinstance(v, float) and isinstance(a.get(k), float):
                    diffs[k] = abs(a[k] - v)
                elif isinstance(v, list) and isinstance(a.get(k), list) and len(v) == len(a[k]):
                    diffs[k] = max((abs(x - y) for x, y in zip(v, a[k])), default=0.0)
            worst = ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
            lines.append(f"{group}/{name}: {'identical' if same else 'DIFFERENT'} ({worst})")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/regression.json")
    p.add_argument("--compare", help="a previous output to compare against")
    args = p.parse_args(argv)
    from crossdistill.train.console import quiet

    with quiet():  # a table, not every toy run's epoch lines
        res = collect()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    if args.compare:
        print("\n".join(compare(json.loads(Path(args.compare).read_text()), res)))
    print(f"written {args.out} ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
