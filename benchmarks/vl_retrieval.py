"""Block ``retrieval`` of benchmarks/vl.py: retrieval distillation on H2 instance retrieval.

Data (``halves``): each MNIST image (the t10k file's fixed train / val / test split) cut into
its top and bottom 14 x 28 halves; query ``xa[i]`` must retrieve ``xb[i]`` among the split's
bottom halves (and back), R@1/5/10 averaged over both directions. The teachers see the whole
6,000-image train split, the students a stratified 1,000-image subset of it (the teachers
know more than the students' data shows, which is what distillation is for; the subset is
also what fits the CPU budget with a plateaued baseline); val 500 images, test gallery
1,000. Every student trains 20 epochs (DCD group: 8) in batches of 16, AdamW with a step
schedule (x0.03 at 50 % and 75 % of the epochs), BatchNorm statistics recomputed on 500
train images before each validation.

Teachers (seed 0, cached by a hash of the profile):

- ``dual``: a wide dual encoder (two CNN towers of 32, 64, 64 channels, 64-d embeddings),
  ITC;
- ``cross``: a cross-encoder (``pair-fusion``: the dual teacher's towers, frozen, and a
  fusion transformer over both halves' 2 x 4 token grids with segment embeddings, plus the
  towers' scaled cosine as a prior), trained with in-batch ``pair_nce``; its logits on a
  batch are the (B, B) score matrix of every top half against every bottom half.

Arms (one student architecture per group; every checkpoint chosen on val, test read once):

- CPRD group (dual-encoder student of 16, 32 channels, 64-d): ``itc`` (contrastive only),
  ``score-kd`` (ITC + MSE to the cross-encoder's in-batch scores), ``rank-kd`` (ITC + ListNet
  over the full in-batch list), ``cprd`` (ITC + partial ranking of the student's top-8 hard
  negatives in the teacher's order);
- DCD group (a small cross-encoder student, trained from scratch: ``pair-fusion`` with
  towers of 16, 32 channels, one 16-wide fusion block and the towers' cosine prior; a plain
  patch transformer learnt nothing in this budget, its re-ranking R@1 stayed at chance):
  ``ce-nokd`` (BCE on the positive + 7 random in-batch negatives), ``ce-score-kd`` (a = 0.2
  MSE to the teacher's scores + BCE, uniform weights, random negatives), ``dcd`` (the
  teacher's 7 hardest in-batch negatives, entropy weights applied); batches of 16 (15
  in-batch negatives, as DCD's 15 drawn texts). A cross-encoder cannot search a gallery
  cheaply, so these arms are scored by re-ranking the dual teacher's top-10 candidates per
  query (the ``rerank`` task; a query whose match the first stage missed is a miss; val:
  the first 200 val images' lists, for the budget): their R@K is not comparable with the
  dual-encoder rows, only with each other, and their R@10 is the first stage's;
- GSSF group (the CPRD group's student): ``itc-gssf`` (ITC in a learnable GSSF metric, 8
  groups, retrieval by its dot product) against ``itc``; ``rkd-cos`` / ``rkd-gssf`` (ITC + a
  contrastive relational KD term from the dual teacher with a cosine / GSSF kernel).

Claims (vl.md): CPRD > score KD > ITC and CPRD > full-list ranking KD; DCD > plain score KD
> no KD; GSSF > cosine as the ITC metric and as the KD relation kernel.

    python benchmarks/vl_retrieval.py [--quick] [--methods ...] [--seeds N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import crossdistill as cd  # noqa: E402
import crossdistill.data.halves  # noqa: E402,F401  (registers halves)
import crossdistill.losses.gssf  # noqa: E402,F401
import crossdistill.losses.ranking  # noqa: E402,F401
import crossdistill.methods.cprd  # noqa: E402,F401
import crossdistill.methods.dcd  # noqa: E402,F401
import crossdistill.methods.gssf  # noqa: E402,F401
import crossdistill.models.pair  # noqa: E402,F401
import crossdistill.tasks.rerank  # noqa: E402,F401
from crossdistill.io import load_weights, save_weights  # noqa: E402

BLOCK = "retrieval"
METHODS = ["itc", "score-kd", "rank-kd", "cprd", "itc-gssf", "rkd-cos", "rkd-gssf",
           "ce-nokd", "ce-score-kd", "dcd"]
BASELINE = "itc"
METRIC = ("test_r@1", "R@1", 100.0)
EXTRA = [("test_r@5", "R@5"), ("test_r@10", "R@10"), ("test_mean_recall", "mean R")]
CACHE_VERSION = 1

_TEACHER = dict(channels=(32, 64, 64), dim=64, epochs=12, batch_size=64, lr=3e-3,
                temperature=0.05, schedule="cosine")
_CROSS = dict(dim=32, depth=1, heads=2, epochs=1, batch_size=32, lr=1e-3, schedule="cosine")
# students: a step schedule (x0.03 at 50 % and 75 %), so the last quarter of the epochs runs
# at 0.1 % of the peak rate and the val metric settles; BatchNorm statistics recomputed on
# 500 train images before each validation (batches of 16 make the running ones noisy)
_STUDENT = dict(channels=(16, 32), dim=64, epochs=20, batch_size=16, lr=3e-3,
                temperature=0.05, schedule="step", gamma=0.03, precise_bn=500)
_DCD = dict(channels=(16, 32), emb=64, dim=16, depth=1, heads=2, epochs=8, batch_size=16,
            lr=3e-3, candidates=8, alpha=0.2, schedule="step", gamma=0.03, precise_bn=500)
PROFILES = {
    "full": dict(images="mnist", img_size=28, grid=(2, 4), teacher_limit=None, train=1000,
                 val=500, test=1000, lists=10, val_lists=200, teacher=_TEACHER, cross=_CROSS,
                 student=_STUDENT, dcd=_DCD, cprd_k=8, kd_weight=1.0, groups=8,
                 kd_temperature=0.1),
    "quick": dict(images="digits", img_size=8, grid=(1, 2), teacher_limit=400, train=200,
                  val=100, test=100, lists=10, val_lists=50,
                  teacher={**_TEACHER, "channels": (8, 16), "dim": 16, "epochs": 2,
                           "temperature": 0.1, "lr": 1e-2},
                  cross={**_CROSS, "dim": 16, "epochs": 1},
                  student={**_STUDENT, "channels": (8, 16), "dim": 16, "epochs": 2,
                           "temperature": 0.1, "lr": 1e-2},
                  dcd={**_DCD, "channels": (8, 16), "emb": 16, "epochs": 1, "lr": 1e-2},
                  cprd_k=4, kd_weight=1.0,
                  groups=4, kd_temperature=0.1),
}
CLAIMS = [
    dict(name="CPRD", pairs=[("cprd", "score-kd"), ("cprd", "rank-kd"), ("score-kd", "itc")],
         text="CPRD > score KD > ITC alone, and CPRD > full-list ranking KD (R@1)",
         metric=None, higher=True),
    dict(name="DCD", pairs=[("dcd", "ce-score-kd"), ("ce-score-kd", "ce-nokd")],
         text="DCD > plain score KD > no KD, one cross-encoder student (re-ranking R@1)",
         metric=None, higher=True),
    dict(name="GSSF", pairs=[("itc-gssf", "itc"), ("rkd-gssf", "rkd-cos")],
         text="GSSF > cosine: as the ITC metric, and as the KD relation kernel (R@1)",
         metric=None, higher=True),
]
IO = {"inputs": {"xa": "xa", "xb": "xb"}}
_MEMO: dict = {}


def cache_key(obj) -> str:
    import hashlib

    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- data ------------------------------------------------------------------------------------
def data(P: dict):
    """(teacher train, student train, val, test) halves."""
    key = ("data", P["images"], P["teacher_limit"], P["train"], P["val"], P["test"])
    if key not in _MEMO:
        h = lambda s, n: cd.data.load_split("halves", s, images=P["images"], limit=n)  # noqa
        _MEMO[key] = (h("train", P["teacher_limit"]), h("train", P["train"]),
                      h("val", P["val"]), h("test", P["test"]))
    return _MEMO[key]


def lists(P: dict, cache: Path):
    """(val, test) re-ranking lists: the dual teacher's top ``lists`` per query."""
    from crossdistill.data.halves import candidate_lists

    dual, _ = dual_teacher(P, cache)
    key = ("lists", id(dual), P["lists"], P["val_lists"])
    if key not in _MEMO:
        out = []
        va, te = data(P)[2:]
        va = va.subset(torch.arange(min(P["val_lists"], len(va))))  # (cost: K pairs a query)
        for split in (va, te):
            with torch.no_grad():
                a, b = dual(split["xa"], split["xb"])
            out.append(candidate_lists(split, a, b, k=P["lists"]))
        _MEMO[key] = tuple(out)
    return _MEMO[key]


def retrieval_task(similarity: str = "cosine") -> dict:
    return {"name": "retrieval", "inputs": IO["inputs"], "similarity": similarity}


# -- training --------------------------------------------------------------------------------
def fit(model, terms, splits, S: dict, seed: int, teacher=None, task=None, hooks=()):
    """(results, val curve of the selection metric, trainer)."""
    d = cd.Distiller(model, teacher, terms, io=IO, teacher_io=IO if teacher is not None else None,
                     task=task or retrieval_task(getattr(model, "similarity", "cosine")),
                     hooks=list(hooks), seed=seed)
    t = cd.Trainer(d, *splits, epochs=S["epochs"], batch_size=S["batch_size"], lr=S["lr"],
                   optimizer="adamw", weight_decay=0.0, schedule=S["schedule"], seed=seed,
                   gamma=S.get("gamma", 0.1), precise_bn=S.get("precise_bn", 0),
                   progress=False)
    res = t.fit()
    curve = [float(r["val_mean_recall"]) for r in t.log.rows if "val_mean_recall" in r]
    return res, curve, t


def _cached(model, path: Path):
    if path.exists() and path.with_suffix(".json").exists():
        model.load_state_dict(load_weights(path))
        return model.eval(), json.loads(path.with_suffix(".json").read_text())
    return None


def _save(model, path: Path, meta: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(model.state_dict(), path)
    path.with_suffix(".json").write_text(json.dumps(meta))
    return model.eval(), meta


def _metrics(res: dict, prefix: str = "test_") -> dict:
    """R@1/5/10 averaged over both directions, and the mean recall."""
    out = {f"{prefix}r@{k}": 0.5 * (res[f"{prefix}q2g_r@{k}"] + res[f"{prefix}g2q_r@{k}"])
           for k in (1, 5, 10)}
    out[f"{prefix}mean_recall"] = res[f"{prefix}mean_recall"]
    return out


def dual_model(P: dict, spec: dict, seed: int, metric: str = "cosine"):
    torch.manual_seed(seed)
    return cd.models.create("pair-dual", img_size=P["img_size"], channels=spec["channels"],
                            dim=spec["dim"], metric=metric, groups=P["groups"])


def dual_teacher(P: dict, cache: Path, train: bool = True):
    from crossdistill.methods import build

    T = P["teacher"]
    cfg = dict(kind="dual", v=CACHE_VERSION, **{k: P[k] for k in (
        "images", "img_size", "teacher_limit", "val", "test")}, T=T)
    path = cache / f"vl-retrieval-dual-{cache_key(cfg)}.safetensors"
    if ("dual", path) in _MEMO:
        return _MEMO[("dual", path)]
    model = dual_model(P, T, 0)
    hit = _cached(model, path)
    if hit is None:
        if not train:
            raise RuntimeError(f"dual teacher not cached at {path}: run teachers() first")
        ttr, _, va, te = data(P)
        t0 = time.process_time()
        res, curve, _ = fit(model, build("itc", model, None, temperature=T["temperature"]).terms,
                            (ttr, va, te), T, 0)
        hit = _save(model, path, {**_metrics(res), "val_curve": curve,
                                  "cpu_seconds": time.process_time() - t0})
    _MEMO[("dual", path)] = hit
    return hit


def cross_teacher(P: dict, cache: Path, train: bool = True):
    from crossdistill.distiller import Term

    C = P["cross"]
    cfg = dict(kind="cross", v=CACHE_VERSION, grid=P["grid"], lists=P["lists"], C=C,
               dual=str(dual_teacher(P, cache, train)[1].get("test_mean_recall")),
               **{k: P[k] for k in ("images", "img_size", "teacher_limit", "val", "test")},
               T=P["teacher"])
    path = cache / f"vl-retrieval-cross-{cache_key(cfg)}.safetensors"
    if ("cross", path) in _MEMO:
        return _MEMO[("cross", path)]
    dual, _ = dual_teacher(P, cache, train)
    T = P["teacher"]
    torch.manual_seed(0)
    model = cd.models.create("pair-fusion", img_size=P["img_size"], channels=T["channels"],
                             emb=T["dim"], dim=C["dim"], depth=C["depth"], heads=C["heads"],
                             grid=tuple(P["grid"]), freeze_towers=True)
    hit = _cached(model, path)
    if hit is None:
        if not train:
            raise RuntimeError(f"cross teacher not cached at {path}: run teachers() first")
        missing, unexpected = model.load_state_dict(dual.state_dict(), strict=False)
        assert not unexpected and all(not k.startswith("tower") for k in missing)
        ttr = data(P)[0]
        vl, tl = lists(P, cache)
        init = cd.evaluate(model, tl, task="rerank", io=IO)
        t0 = time.process_time()
        res, curve, _ = fit(model, [Term("pair_nce", teacher=None)], (ttr, vl, tl), C, 0,
                            task="rerank")
        hit = _save(model, path, {**_metrics(res), "val_curve": curve,
                                  "init_test_r@1": 0.5 * (init["q2g_r@1"] + init["g2q_r@1"]),
                                  "first_stage_test_recall": tl.info["first_stage_recall"],
                                  "cpu_seconds": time.process_time() - t0})
    _MEMO[("cross", path)] = hit
    return hit


def teachers(P: dict, cache: Path) -> dict:
    """Train (seed 0) or load both teachers; their test metrics."""
    _, dual = dual_teacher(P, cache)
    _, cross = cross_teacher(P, cache)
    keep = lambda m: {k: v for k, v in m.items() if k != "val_curve"}  # noqa: E731
    return {"dual": keep(dual), "cross (re-ranking the dual top-k)": keep(cross)}


def run(method: str, seed: int, P: dict, cache: Path) -> dict:
    from crossdistill.methods import build

    if method not in METHODS:
        raise ValueError(f"unknown arm {method!r}; arms: {', '.join(METHODS)}")
    _, tr, va, te = data(P)
    S, t0 = P["student"], time.process_time()
    extra = {}
    if method.startswith("ce-") or method == "dcd":
        D = P["dcd"]
        vl, tl = lists(P, cache)
        teacher = None if method == "ce-nokd" else cross_teacher(P, cache, train=False)[0]
        torch.manual_seed(200 + seed)
        student = cd.models.create("pair-fusion", img_size=P["img_size"],
                                   channels=D["channels"], emb=D["emb"], dim=D["dim"],
                                   depth=D["depth"], heads=D["heads"], grid=tuple(P["grid"]))
        kw = dict(candidates=D["candidates"], alpha=D["alpha"])
        if method == "ce-score-kd":
            kw.update(mine="random", weights="uniform")
        recipe = (build("dcd", student, None, candidates=D["candidates"]) if teacher is None
                  else build("dcd", student, teacher, **kw))
        res, curve, _ = fit(student, recipe.terms, (tr, vl, tl), D, seed, teacher=teacher,
                            task="rerank")
        extra["first_stage_test_recall"] = tl.info["first_stage_recall"]
    else:
        metric = "gssf" if method == "itc-gssf" else "cosine"
        student = dual_model(P, S, 100 + seed, metric)
        tau = S["temperature"]
        if method in ("itc", "itc-gssf"):
            teacher = None
            recipe = build("itc" if method == "itc" else "gssf", student, None, temperature=tau)
        elif method in ("rkd-cos", "rkd-gssf"):
            teacher = dual_teacher(P, cache, train=False)[0]
            kw = dict(weight=P["kd_weight"], temperature=tau, kd_temperature=P["kd_temperature"])
            recipe = (build("relation-kd", student, teacher, **kw) if method == "rkd-cos"
                      else build("gssf", student, teacher, groups=P["groups"], **kw))
        else:
            teacher = cross_teacher(P, cache, train=False)[0]
            kw = dict(weight=P["kd_weight"], temperature=tau)
            if method == "cprd":
                kw["k"] = P["cprd_k"]
            recipe = build(method, student, teacher, **kw)
        res, curve, _ = fit(student, recipe.terms, (tr, va, te), S, seed, teacher=teacher)
    return {**_metrics(res), "val_curve": curve, "epochs": len(curve),
            "best_epoch": res.get("best_epoch"), "cpu_seconds": time.process_time() - t0,
            **extra}


def main(argv=None) -> None:
    """Run the block alone: teachers, then every arm x seed, one process; a table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--methods", nargs="*", default=METHODS)
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--cache", default=str(Path(__file__).resolve().parents[1] / "runs" / "cache"))
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    P = PROFILES["quick" if a.quick else "full"]
    seeds = a.seeds or (1 if a.quick else 3)
    cache = Path(a.cache)
    c0, w0 = time.process_time(), time.time()
    meta = teachers(P, cache)
    print(json.dumps(meta, indent=1))
    rows = []
    for m in a.methods:
        for s in range(seeds):
            r = run(m, s, P, cache)
            rows.append({"method": m, "seed": s, **r})
            print(m, s, {k: round(v, 4) for k, v in r.items() if isinstance(v, float)},
                  [round(v, 3) for v in r["val_curve"]], flush=True)
    total = {"cpu_seconds": time.process_time() - c0, "wall_seconds": time.time() - w0}
    print(json.dumps(total))
    if a.out:
        Path(a.out).write_text(json.dumps({"teachers": meta, "rows": rows, **total}, indent=1))


if __name__ == "__main__":
    main()
