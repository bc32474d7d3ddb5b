"""CUDA smoke check (run where a GPU exists; CI never needs one): the same pipeline as the
CPU tests, on ``cuda`` with bf16 autocast: online KD with feature taps, a teacher store, a
mixture with a learned router, checkpoint + exact resume, and export. Prints one JSON line.

    python benchmarks/cuda_smoke.py [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import crossdistill as cd
from crossdistill.teachers import Mixture, TeacherStore, cache_teacher


def methods_on(dev, teacher, tr, va) -> dict:
    """One short epoch of every registered method recipe on ``dev``: val accuracy or error."""
    from crossdistill import methods
    from crossdistill.methods.collaborative import BestMembers, CollaborativePair

    res = {}
    for name in methods.METHODS.names():
        try:
            torch.manual_seed(0)
            s = cd.models.create(
                "vit", num_classes=10, in_channels=1, img_size=8, patch=2, dim=32, depth=2
            )
            t = teacher
            if name in ("collaborative", "dml"):
                c = cd.models.create("cnn", num_classes=10, in_channels=1, img_size=8)
                s, t = CollaborativePair(c, s), None
            recipe = methods.build(name, s, t)
            d = cd.Distiller(s, t, recipe.terms, hooks=recipe.hooks, num_samples=2000)
            keep = [BestMembers(s, va)] if t is None else []  # each member's own best epoch
            r = cd.Trainer(
                d,
                tr,
                va,
                epochs=1,
                optimizer="adamw",
                lr=2e-3,
                device=dev,
                amp=True,
                progress=False,
                callbacks=keep,
            ).fit()
            res[name] = round(r["best_val_acc"], 3)
            if keep:
                res[name] = [res[name], {k: round(v[0], 3) for k, v in keep[0].restore().items()}]
        except Exception as err:  # report every failure, keep checking the rest
            res[name] = f"ERROR {type(err).__name__}: {err}"[:300]
    return res


def condensers_on(dev, tr) -> dict:
    """Two outer iterations of every registered condenser on ``dev`` (IPC 1, digits)."""
    from crossdistill.condense import CONDENSERS, RealSampler

    res = {}
    for name in CONDENSERS.names():
        try:
            c = CONDENSERS.get(name)(
                ipc=1, num_classes=10, input_shape=(1, 8, 8), device=dev, seed=0, iterations=2
            )
            real = RealSampler(tr, seed=0, device=dev)
            c.init(real)
            for it in range(2):
                c.step(real, it)
            syn = c.synthetic()
            res[name] = list(syn.x.shape)
        except Exception as err:
            res[name] = f"ERROR {type(err).__name__}: {err}"[:300]
    return res


def harness_on(dev, tr) -> dict:
    """The condensation harness choosing its evaluation config on val, on ``dev``."""
    from crossdistill.condense import harness as H

    try:
        syn = H.random_subset(tr, 2, seed=0)
        grid = H.candidate_configs(H.EvalConfig(steps=20))
        r = H.evaluate_synthetic(syn, "digits", n_models=2, candidates=grid, device=dev)
        return {
            a: {"chosen": [v["chosen"]["lr"], v["chosen"]["steps"]], "test": v["test_mean"]}
            for a, v in r["archs"].items()
        }
    except Exception as err:
        return {"error": f"ERROR {type(err).__name__}: {err}"[:300]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    dev = args.device
    out = {"device": dev, "torch": torch.__version__}
    if dev.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(0)
    tmp = Path(tempfile.mkdtemp())
    tr, va, te = (cd.data.load("digits", s) for s in ("train", "val", "test"))
    torch.manual_seed(0)
    teacher = cd.models.create(
        "resnet", depth=8, width=2, num_classes=10, in_channels=1, img_size=8
    )
    t0 = time.time()
    out["teacher"] = cd.Trainer(
        cd.Distiller(teacher), tr, va, te, epochs=8, lr=0.05, amp=True, device=dev, progress=False
    ).fit()["test_acc"]
    teacher.cpu()

    def student():
        torch.manual_seed(1)
        return cd.models.create(
            "vit", num_classes=10, in_channels=1, img_size=8, patch=2, dim=48, depth=3
        )

    terms = [
        cd.Term("ce"),
        cd.Term("dkd", warmup=2),
        cd.Term("mse", student="blocks.2", teacher="layer3", projector="auto", weight=1.0),
    ]
    s = student()
    kd = dict(epochs=6, optimizer="adamw", lr=2e-3, device=dev, progress=False)
    out["online_kd_amp"] = cd.Trainer(
        cd.Distiller(s, teacher, terms), tr, va, te, amp=True, out_dir=tmp / "kd", **kd
    ).fit()["test_acc"]
    cache_teacher(teacher, tr, tmp / "store", taps=["layer3"], device=dev, progress=False)
    s = student()
    out["stored_kd"] = cd.Trainer(
        cd.Distiller(s, TeacherStore(tmp / "store"), terms), tr, va, te, **kd
    ).fit()["test_acc"]
    torch.manual_seed(5)
    t2 = cd.models.create("cnn", num_classes=10, in_channels=1, img_size=8)
    cd.Trainer(cd.Distiller(t2), tr, va, epochs=5, device=dev, progress=False).fit()
    s = student()
    d = cd.Distiller(
        s, {"a": teacher, "b": t2.cpu()}, [cd.Term("ce"), cd.Term("kd")], mixture=Mixture("router")
    )
    out["mixture_router"] = cd.Trainer(
        d, tr, va, te, epochs=4, optimizer="adamw", lr=2e-3, device=dev, progress=False
    ).fit()["test_acc"]

    class Kill(Exception):
        pass

    class KillAt:
        def on_batch_end(self, trainer, b):
            if trainer.state["epoch"] == 1 and b == 5:
                raise Kill

    def run(callbacks=(), resume=False, name="r"):
        s = student()
        d = cd.Distiller(s, teacher, terms)
        kw = dict(
            epochs=3,
            optimizer="adamw",
            lr=2e-3,
            device=dev,
            progress=False,
            checkpoint_every=2,
            out_dir=tmp / name,
            deterministic=True,
        )
        try:
            cd.Trainer(d, tr, va, callbacks=callbacks, **kw).fit(resume=resume)
        except Kill:
            return None
        return {k: v.cpu() for k, v in s.state_dict().items()}

    ref = run(name="ref")
    run([KillAt()], name="res")
    resumed = run(resume=True, name="res")
    out["resume_identical"] = all(torch.equal(ref[k], resumed[k]) for k in ref)
    out["resume_max_abs_diff"] = max(
        float((ref[k].float() - resumed[k].float()).abs().max()) for k in ref
    )
    out["methods"] = methods_on(dev, teacher, tr, va)
    out["condensers"] = condensers_on(dev, tr)
    out["harness_select_on_val"] = harness_on(dev, tr)
    out["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
