"""Block ``transfer`` of benchmarks/vl.py: multi-source transfer with few labels
(DistillNearest / DistillWeighted, Borup et al., ICCV 2023) and cross-task KD across label
spaces (ProC-KD, 2022).

Multi-source part. Target task: MNIST with ``labelled`` (100) labels on the target half of
the MNIST train split (3,000 images, the rest unlabelled), val = 1,000 MNIST val images
(checkpoint choice), test = the 2,000 MNIST test images, read once. Sources (seed 0, cached):
three wider CNNs (channels 16-32-64 against the student's 8-16-32, so they know more than a
student could learn from 100 labels) trained with labels and +-2 px shifts on other domains
made from the *other* half of the MNIST train split or from sklearn digits (``inverted``:
``1 - x``; ``rotated``: turned 30 degrees; ``digits``: sklearn's 8x8 digits upsampled into
MNIST's 20x20 box). Task similarity: held-out linear-probe accuracy on the 100 labelled
images (5-fold CV; ``score`` in the profile, pluggable). Rows:

- ``ce``: the student from scratch, CE on the labelled images only (the plateau baseline);
- ``finetune``: the top-scored source itself, every weight but its head kept, fine-tuned
  with CE at lr 1e-3 (a source is wider than the student, so it has about 4x the student's
  compute: the paper's "equal student compute" fine-tuned init would need a source of the
  student's size, which this pool does not have);
- ``distill-nearest``: CE + feature (MSE through a linear projector) + KD from the top
  source's linear probe, on every target image;
- ``distill-weighted``: the same for every source, weighted by softmax(score / tau).

Every BatchNorm's statistics are recomputed on 1,000 train images before each validation
(``precise_bn``: with the running averages the baseline's val accuracy still moved by ~1
point between the last epochs). Every arm sees the same batches: the 100 labelled rows
are repeated (4 copies) so that a batch holds about one labelled image per 7 unlabelled
(FixMatch's mu = 7; the in-memory form of cycling the labelled loader), and the CE arms
ignore the unlabelled rows. FixMatch itself (the paper's other baseline) is left out: its
two augmentation streams and confidence-masked pseudo-labels do not fit this block's
budget.

Cross-task part (rows ``xt-*``): a teacher CNN (wider) trained on digits 0-4 of the source
half; students on digits 5-9 of the target half (labels 0..4 = digits 5..9) with
``xt_labelled`` (50) labels, val / test = MNIST val / test images of 5-9. Rows: ``xt-ce``
(CE only), ``xt-fitnet`` (CE + MSE between the student's last stage through a 1x1 conv and
the teacher's last stage), ``xt-proc-kd`` (prototypes fitted to the teacher's last-stage
local features on the student's training images; prototype attention in the student;
CE + MSE to the prototype reconstructions). Logit KD is undefined across these label
spaces and is not a row.

Budget: ``full`` (sources + teacher + 7 arms x 3 seeds) about 6 single-thread CPU minutes
uncontended; ``quick`` (1 seed, toy sizes) < 30 s.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from hetero import cache_key, memo

import crossdistill as cd
from crossdistill.data import multisource as MS
from crossdistill.io import load_weights, save_weights
from crossdistill.methods import build
from crossdistill.methods import multisource as M
from crossdistill.methods import proc_kd as PK

BLOCK = "transfer"
METHODS = ["ce", "finetune", "distill-nearest", "distill-weighted",
           "xt-ce", "xt-fitnet", "xt-proc-kd"]
BASELINE = "ce"
PLATEAU_ARMS = ["ce", "xt-ce"]  # both parts' supervised baselines (BASELINE is the first)
METRIC = ("test_acc", "test acc", 100.0)
EXTRA = [("val_acc", "val acc"), ("teacher_test_acc", "teacher test acc")]
SOURCES = ("inverted", "rotated", "digits")
CACHE_VERSION = 1

_COMMON = dict(
    batch_size=64, lr=3e-3, ratio=7.0, student_channels=(8, 16, 32),
    source_channels=(16, 32, 64), source_shift=2, finetune_lr=1e-3, precise_bn=1000,
    score="probe", score_params={"folds": 5}, probe_weight_decay=1e-3, tau=0.1,
    feature_loss="mse", feature_weight=1.0, kd_weight=1.0, temperature=4.0, angle=30.0,
    xt_teacher_channels=(16, 32, 64), xt_teacher=(0, 1, 2, 3, 4), xt_student=(5, 6, 7, 8, 9),
    xt_weight=1.0, prototypes=16, proto_tau=0.1, proto_steps=200, proto_dim=32,
)
PROFILES = {
    "full": dict(_COMMON, seeds=3, labelled=100, target_limit=None, val_limit=1000,
                 test_limit=None, source_limit=None, source_epochs=12, epochs=20,
                 xt_labelled=50, xt_teacher_epochs=8, xt_epochs=20),
    "quick": dict(_COMMON, seeds=1, labelled=30, target_limit=400, val_limit=200,
                  test_limit=200, source_limit=300, source_epochs=1, epochs=1,
                  xt_labelled=15, xt_teacher_epochs=1, xt_epochs=1, proto_steps=20,
                  precise_bn=200),
}
CLAIMS = [
    dict(name="DistillWeighted", pairs=[("distill-weighted", "distill-nearest")],
         text="DistillWeighted >= DistillNearest", metric=None, higher=True),
    dict(name="DistillNearest", pairs=[("distill-nearest", "finetune"),
                                       ("distill-nearest", "ce")],
         text="DistillNearest > fine-tuning the best source (and > CE only)", metric=None,
         higher=True),
    dict(name="ProC-KD", pairs=[("xt-proc-kd", "xt-fitnet"), ("xt-proc-kd", "xt-ce")],
         text="ProC-KD > FitNet-style feature KD (and > CE) when teacher classes differ",
         metric=None, higher=True),
]




# -- data -----------------------------------------------------------------------------------


def _cap(data, n, seed=0):
    return data if n is None else MS.stratified_limit(data, int(n), seed, "profile.limit")


def source_data(name: str, P: dict):
    def make():
        tr = MS.source_domain(name, "train", angle=P["angle"])
        va = MS.source_domain(name, "val", angle=P["angle"])
        return _cap(tr, P["source_limit"]), _cap(va, P["source_limit"])
    return memo(("source", name, P["angle"], P["source_limit"]), make)


def target_data(P: dict, cross: bool = False):
    """(train with labelled rows repeated, the labelled rows alone, val, test)."""
    classes = list(P["xt_student"]) if cross else None
    labelled = P["xt_labelled"] if cross else P["labelled"]

    def make():
        limit = P["target_limit"] if not cross or P["target_limit"] is None else \
            P["target_limit"] // 2
        tr = MS.target_split("train", labelled=labelled, classes=classes, limit=limit)
        va = _cap(MS.target_split("val", classes=classes), P["val_limit"], 1)
        te = _cap(MS.target_split("test", classes=classes), P["test_limit"], 2)
        return MS.oversample_labelled(tr, P["ratio"]), MS.labelled_part(tr), tr, va, te
    return memo(("target", cross, labelled, P["target_limit"], P["val_limit"],
                  P["test_limit"], P["ratio"]), make)


def cnn(channels, num_classes: int, seed: int):
    torch.manual_seed(seed)
    return cd.models.create("cnn", num_classes=num_classes, in_channels=1, img_size=28,
                            channels=tuple(channels))


def train_kw(P: dict, epochs: int, seed: int) -> dict:
    return dict(epochs=epochs, batch_size=P["batch_size"], lr=P["lr"], optimizer="adamw",
                weight_decay=0.0, schedule="cosine", progress=False, seed=seed,
                precise_bn=P.get("precise_bn", 0))


def curve(trainer, key: str = "val_acc") -> list[float]:
    return [float(r[key]) for r in trainer.log.rows if key in r]


# -- sources and the cross-task teacher (seed 0, cached) --------------------------------------
def _cached(model, path: Path, train):
    if path.exists():
        model.load_state_dict(load_weights(path))
        return model.eval(), json.loads(path.with_suffix(".json").read_text())
    t0 = time.process_time()
    meta = train(model)
    meta["cpu_seconds"] = time.process_time() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(model.state_dict(), path)
    path.with_suffix(".json").write_text(json.dumps(meta))
    return model.eval(), meta


def source_model(name: str, P: dict, cache: Path):
    keys = ("angle", "source_limit", "source_epochs", "batch_size", "lr", "source_channels",
            "source_shift", "precise_bn")
    cfg = dict(kind="source", name=name, P={k: P[k] for k in keys}, v=CACHE_VERSION)
    path = Path(cache) / f"vl-transfer-source-{name}-{cache_key(cfg)}.safetensors"

    def train(model):
        tr, va = source_data(name, P)
        d = cd.Distiller(model, None, [cd.Term("ce")])
        res = cd.Trainer(d, tr, va, augment_shift=P["source_shift"],
                         **train_kw(P, P["source_epochs"], 0)).fit()
        return {"domain": name, "val_acc": res["best_val_acc"], "n_train": len(tr)}

    return _cached(cnn(P["source_channels"], 10, 0), path, train)


def xt_teacher(P: dict, cache: Path):
    keys = ("source_limit", "xt_teacher_epochs", "batch_size", "lr", "xt_teacher_channels",
            "xt_teacher", "precise_bn")
    cfg = dict(kind="xt-teacher", P={k: P[k] for k in keys}, v=CACHE_VERSION)
    path = Path(cache) / f"vl-transfer-xt-teacher-{cache_key(cfg)}.safetensors"

    def train(model):
        tr = MS.source_domain("mnist", "train", classes=P["xt_teacher"])
        va = MS.source_domain("mnist", "val", classes=P["xt_teacher"])
        tr, va = _cap(tr, P["source_limit"]), _cap(va, P["source_limit"])
        d = cd.Distiller(model, None, [cd.Term("ce")])
        res = cd.Trainer(d, tr, va, **train_kw(P, P["xt_teacher_epochs"], 0)).fit()
        return {"classes": list(P["xt_teacher"]), "val_acc": res["best_val_acc"],
                "n_train": len(tr)}

    return _cached(cnn(P["xt_teacher_channels"], len(P["xt_teacher"]), 0), path, train)


def teachers(P: dict, cache: Path) -> dict:
    """Train (seed 0) or load every source and the cross-task teacher; with the sources'
    transferability scores on the labelled target images."""
    out = {}
    models = {}
    for name in SOURCES:
        models[name], out[f"source-{name}"] = source_model(name, P, cache)
    scores = probed_sources(P, cache)[1]
    for name in SOURCES:
        out[f"source-{name}"] = {**out[f"source-{name}"], "score": scores[name]}
    out["xt-teacher"] = xt_teacher(P, cache)[1]
    return out


def probed_sources(P: dict, cache: Path):
    """(probed teachers, scores) on the labelled target rows (deterministic)."""
    def make():
        models = {n: source_model(n, P, cache)[0] for n in SOURCES}
        lab = target_data(P)[1]
        return M.probe_sources(models, lab, score=P["score"], score_params=P["score_params"],
                               weight_decay=P["probe_weight_decay"], num_classes=10)
    return memo(("probed", {k: v for k, v in P.items() if k != "seeds"}, str(cache)), make)


# -- one cell -------------------------------------------------------------------------------
def run(method: str, seed: int, P: dict, cache: Path) -> dict:
    if method not in METHODS:
        raise KeyError(f"{method!r} is not an arm of block {BLOCK}: {', '.join(METHODS)}")
    if method.startswith("xt-"):
        return run_cross(method, seed, P, cache)
    train, _, _, val, test = target_data(P)
    student = cnn(P["student_channels"], 10, 100 + seed)
    teacher, terms, extra = None, [cd.Term("ce")], {}
    kd = dict(feature_loss=P["feature_loss"], feature_weight=P["feature_weight"],
              kd_weight=P["kd_weight"], temperature=P["temperature"])
    if method != "ce":
        probed, scores = probed_sources(P, cache)
        best = max(SOURCES, key=lambda n: (scores[n], -SOURCES.index(n)))
        extra = {"source": best, "scores": scores,
                 "teacher_test_acc": cd.evaluate(probed[best], test)["acc"]}
    kw = train_kw(P, P["epochs"], seed)
    if method == "finetune":  # the best source itself, every weight but its head
        student = cnn(P["source_channels"], 10, 100 + seed)
        M.inherit_trunk(student, source_model(best, P, cache)[0])
        kw["lr"] = P["finetune_lr"]
    elif method == "distill-nearest":
        teacher = probed
        terms = build("distill-nearest", student, probed, scores=scores, **kd).terms
    elif method == "distill-weighted":
        teacher = probed
        terms = build("distill-weighted", student, probed, scores=scores, tau=P["tau"],
                      **kd).terms
        extra["weights"] = M.source_weights(scores, P["tau"])
    d = cd.Distiller(student, teacher, terms, seed=seed)
    t = cd.Trainer(d, train, val, test, **kw)
    res = t.fit()
    return dict(test_acc=res["test_acc"], val_acc=res["best_val_acc"],
                best_epoch=res["best_epoch"], val_curve=curve(t), epochs=P["epochs"], **extra)


def run_cross(method: str, seed: int, P: dict, cache: Path) -> dict:
    train, _, plain, val, test = target_data(P, cross=True)
    k = len(P["xt_student"])
    student = cnn(P["student_channels"], k, 100 + seed)
    teacher, extra = None, {}
    if method != "xt-ce":
        teacher = xt_teacher(P, cache)[0]
        extra["teacher_val_acc_own_classes"] = xt_teacher(P, cache)[1]["val_acc"]
    if method == "xt-ce":
        terms = [cd.Term("ce")]
    elif method == "xt-fitnet":
        terms = build("fitnet", student, teacher, projector="conv1x1",
                      weight=P["xt_weight"])
        terms = terms.terms
    else:
        protos = PK.fit_to_teacher(teacher, plain, k=P["prototypes"], tau=P["proto_tau"],
                                   steps=P["proto_steps"], seed=seed)
        torch.manual_seed(200 + seed)
        student = PK.ProtoAugmented(student, protos, dim=P["proto_dim"], tau=P["proto_tau"])
        terms = build("proc-kd", student, teacher, weight=P["xt_weight"]).terms
    d = cd.Distiller(student, teacher, terms, seed=seed)
    t = cd.Trainer(d, train, val, test, **train_kw(P, P["xt_epochs"], seed))
    res = t.fit()
    return dict(test_acc=res["test_acc"], val_acc=res["best_val_acc"],
                best_epoch=res["best_epoch"], val_curve=curve(t), epochs=P["xt_epochs"],
                **extra)


def _tail_range(c: list[float]) -> float:  # as vl.py: the last ceil(20 %) + the one before
    k = max(1, -(-len(c) // 5))
    return max(c[-k - 1:]) - min(c[-k - 1:])


def notes(rows: list[dict], P: dict) -> str:
    """The sources' scores, the chosen source and DistillWeighted's weights, and the
    cross-task baseline's plateau (vl.py judges only BASELINE's)."""
    lines = []
    r = next((r for r in rows if r.get("weights")), None) or next(
        (r for r in rows if r.get("scores")), None)
    if r is not None:
        sc = ", ".join(f"{n} {v:.3f}" for n, v in r["scores"].items())
        lines.append(f"Transferability ({P['score']}, on the {P['labelled']} labelled target "
                     f"images): {sc}; nearest source: {r['source']} (its probe's test acc "
                     f"{100 * r['teacher_test_acc']:.2f} %).")
        if r.get("weights"):
            w = ", ".join(f"{n} {v:.3f}" for n, v in r["weights"].items())
            lines.append(f"DistillWeighted weights (tau {P['tau']}): {w}.")
    curves = [r["val_curve"] for r in rows if r.get("method") == "xt-ce"
              and len(r.get("val_curve") or []) > 1]
    if curves:
        worst = max(100 * _tail_range(c) for c in curves)
        lines.append(f"Cross-task baseline xt-ce: val range over the last 20 % of epochs "
                     f"{worst:.2f} points (worst seed; plateaued: {worst <= 0.5}).")
    return " ".join(lines)


def main() -> None:  # a stand-alone check: python benchmarks/vl_transfer.py [--quick]
    import argparse
    import statistics

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cache", default="runs/cache")
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    P = PROFILES["quick" if a.quick else "full"]
    cache = Path(a.cache)
    c0, w0 = time.process_time(), time.time()
    meta = teachers(P, cache)
    print(json.dumps(meta, indent=1))
    print(f"teachers: cpu {time.process_time() - c0:.1f}s wall {time.time() - w0:.1f}s")
    rows = []
    for m in a.methods:
        accs = []
        for s in range(P["seeds"]):
            c1, w1 = time.process_time(), time.time()
            r = run(m, s, P, cache)
            r.update(method=m, seed=s, cpu_seconds=time.process_time() - c1,
                     seconds=time.time() - w1)
            rows.append(r)
            accs.append(r["test_acc"])
            print(f"{m:18s} seed {s} test {100 * r['test_acc']:.2f} val {100 * r['val_acc']:.2f}"
                  f" tail-range {100 * _tail_range(r['val_curve']):.2f} cpu {r['cpu_seconds']:.1f}s"
                  f" wall {r['seconds']:.1f}s", flush=True)
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"  {m}: {100 * statistics.mean(accs):.2f} +- {100 * sd:.2f}")
    print(f"total: cpu {time.process_time() - c0:.1f}s wall {time.time() - w0:.1f}s")
    if a.out:
        Path(a.out).write_text(json.dumps({"teachers": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
