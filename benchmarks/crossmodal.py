"""Cross-modal and multi-modal KD benchmark on paired image + audio (issue 13).

Blocks (each a set of cells, one row per method, 3 seeds; the checkpoint of every run is
chosen on the validation split and the test split is read once at the end):

- ``image``: an image-only CNN student on audio-visual digits (MNIST image + an FSDD
  recording of the same digit; test speakers unseen) taught by a late-fusion teacher that
  sees and hears the digit: CE, KD, FitNet, CRD, MST-Distill, and CroDiNo-KD (no teacher:
  an image and an audio network co-trained; its image network is the row).
- ``missing``: multimodal students trained with modality dropout and scored with both
  modalities, the image only, the audio only and a seeded 50 % per-sample mask: CE, SP and
  MAD on the fused embedding (from the complete-input teacher), MMANet (MAD + MAR), and
  Any2Seg's fusion without LSCD / with plain feature KD / with LSCD from encoders aligned
  to all-MiniLM-L6-v2 anchors.
- ``mrdd``: MRDD on MNIST + its Sobel edge map (no labels in training): mask ratio 0.3 vs
  0.7 with c_dim 20 > v_dim 10 (the official EdgeMNIST sizes), and c_dim 5 < v_dim 10 at
  mask 0.7; linear-probe accuracy (C chosen on val) on ``c`` and on ``[c, v]``.
- ``bida``: MNIST (labelled source) -> sklearn digits in MNIST's 20 x 20 box (unlabelled target),
  target accuracy (checkpoint chosen on the labelled target val split, the domain task's
  default): source only, source + MMD, BiDA without its distillation term, BiDA.
- ``libs``: digit strings (2-4 spoken digits / the same digits' images read column by
  column, under white noise of std 2 so that reading is harder than hearing, as lip
  reading is), an audio seq2seq teacher and a visual student of the same shape: CE, frame +
  sequence KD, all three levels, all three without LCS filtering; digit error rate.

Schedules: 20 epochs (AdamW, cosine) for the image block, 35 for the missing block (the
fusion students under modality dropout converge more slowly), 25 for BiDA, and every BatchNorm's
statistics recomputed on 1,000 train samples before each validation (``precise_bn``: the
running averages made the val metric swing by points between epochs). CRD uses 1,024
negatives (the paper 16,384) for the budget.

Noise: the image and missing blocks' students are also scored on the noisy test set (audio
at 10 dB SNR, 25 % of each image occluded, seeded). Teachers are trained inside the run
(seed 0) and cached by config hash. Each claim is judged only where the baseline's
validation metric plateaued (range over the last 20 % of epochs within 0.5 points; reported
per cell). Output: a table per block, benchmarks/results/crossmodal.json and
docs/results/crossmodal.md.

    nice -n 10 python benchmarks/crossmodal.py               # full (< 60 min, 2 workers)
    python benchmarks/crossmodal.py --quick                  # < 5 min smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hetero import _pool, cache_key  # noqa: E402  (the benchmarks' shared helpers)
from verdicts import PLATEAU_POINTS, compare, tail_range  # noqa: E402
from verdicts import lookup as _lookup  # noqa: E402
from verdicts import verdict as _verdict_words  # noqa: E402

import crossdistill as cd  # noqa: E402
from crossdistill.io import load_weights, save_weights  # noqa: E402
from crossdistill.report import aggregate, format_table, pm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE_VERSION = 3  # 2: the fusion teacher trains with modality dropout; 3: precise BN, and
# the fusion branches skip missing samples

FULL = dict(
    seeds=3,
    av_limit={"train": 3000, "val": 1000, "test": 1000},
    batch_size=64,
    lr=3e-3,
    teacher_epochs=20,
    epochs=20,
    mst_epochs=(7, 3, 13),  # stage 1 + stage 3 = the baselines' 20 student epochs
    missing_epochs=35,  # the fusion students (modality dropout) converge more slowly
    rate=0.5,
    teacher_rate=0.3,
    student_width=8,  # the fusion students; the fusion teacher has width 16
    precise_bn=1000,  # BN statistics recomputed on 1,000 train samples before each validation
    noise={"audio_snr_db": 10.0, "occlusion": 0.25, "seed": 0},
    mrdd=dict(limit={"train": 3000, "val": 1000, "test": 1000}, epochs=(10, 10),
              batch_size=64, lr=1e-3),
    bida=dict(epochs=25, batch_size=64, lr=3e-3),  # 15 left target accuracy rising
    libs=dict(n={"train": 2000, "val": 300, "test": 300}, epochs=20, teacher_epochs=20,
              batch_size=32, lr=3e-3, video_noise=2.0),
)
QUICK = dict(
    seeds=1,
    av_limit={"train": 300, "val": 200, "test": 200},
    batch_size=64,
    lr=3e-3,
    teacher_epochs=2,
    epochs=2,
    mst_epochs=(1, 1, 2),
    missing_epochs=2,
    precise_bn=300,
    rate=0.5,
    teacher_rate=0.3,
    student_width=8,
    noise={"audio_snr_db": 10.0, "occlusion": 0.25, "seed": 0},
    mrdd=dict(limit={"train": 300, "val": 200, "test": 200}, epochs=(1, 1), batch_size=64,
              lr=1e-3),
    bida=dict(limit={"train": 200, "val": 100, "test": 100}, epochs=1, batch_size=64, lr=1e-3),
    libs=dict(n={"train": 200, "val": 60, "test": 60}, epochs=1, teacher_epochs=1,
              batch_size=32, lr=3e-3, video_noise=2.0),
)

BLOCKS = {
    "image": ["ce", "kd", "fitnet", "crd", "mst", "crodino"],
    "missing": ["ce", "sp", "mad", "mmanet", "a2s-none", "a2s-feature", "a2s-lscd"],
    "mrdd": ["c20-v10-m0.3", "c20-v10-m0.7", "c5-v10-m0.7"],
    "bida": ["source", "mmd", "bida-nodistill", "bida"],
    "libs": ["ce", "frame+seq", "all", "all-nolcs"],
}
BASELINE = {"image": "ce", "missing": "ce", "bida": "source", "libs": "ce"}
METRIC = {  # per block: the test metric, its direction, its scale in the tables
    "image": ("test_acc", "max", 100.0),
    "missing": ("test_acc", "max", 100.0),
    "mrdd": ("test_acc", "max", 100.0),  # linear probe on [c, v]
    "bida": ("test_target_acc", "max", 100.0),
    "libs": ("test_cer", "min", 100.0),
}
EXTRA = {  # per block: further columns of its table (metric, header)
    "image": [("noisy_test_acc", "noisy test")],
    "missing": [("noisy_test_acc", "noisy test"), ("image_only", "image only"),
                ("audio_only", "audio only"), ("random50", "random50")],
    "mrdd": [("c_test_acc", "probe on c"), ("c_kmeans", "k-means on c"),
             ("mi_proxy", "R2 of c from v")],
    "bida": [("test_acc", "source test acc")],
    "libs": [("test_ser", "string error")],
}
VIEWS = ["image_only", "audio_only", "random50"]


# -- data and models ----------------------------------------------------------------------------
_DATA: dict = {}


def _memo(key, make):
    """Each worker loads a dataset once and reuses it across its runs."""
    if key not in _DATA:
        _DATA[key] = make()
    return _DATA[key]


def _splits(name: str, **params):
    return tuple(cd.data.load_split(name, s, **params) for s in ("train", "val", "test"))


def av_data(P: dict, noisy: bool = False):
    """(train, val, test) audio-visual digits at the profile's sizes (noisy: the test split's
    corrupted copy only)."""
    key = ("av", noisy, json.dumps(P["av_limit"]))
    if noisy:
        return _memo(key, lambda: cd.data.load_split("av", "test", limit=P["av_limit"],
                                                     noise=P["noise"]))
    return _memo(key, lambda: _splits("av", limit=P["av_limit"]))


def image_cnn(seed: int):
    torch.manual_seed(seed)
    return cd.models.create("cnn", num_classes=10, in_channels=1, img_size=28,
                            channels=(16, 32, 32))


def audio_net(seed: int):
    torch.manual_seed(seed)
    return cd.models.create("audio-cnn", num_classes=10, img_size=(40, 48), channels=(32, 64))


def fusion_net(seed: int, width: int = 16):
    torch.manual_seed(seed)
    return cd.models.create("fusion", num_classes=10, width=width, audio_size=(40, 48))


def train_kw(P: dict, epochs: int, seed: int) -> dict:
    """Trainer settings; ``P`` is the profile or a block's own (its batch_size and lr)."""
    return dict(epochs=epochs, batch_size=P["batch_size"], lr=P["lr"], optimizer="adamw",
                weight_decay=0.0, schedule="cosine", progress=False, seed=seed,
                precise_bn=P.get("precise_bn", 0))


def curve(trainer, key: str = "val_acc") -> list[float]:
    return [float(r[key]) for r in trainer.log.rows if key in r]


def load_cached(model, path: Path):
    """(model, meta) from a cached teacher's weights and metadata, or None if absent."""
    if not path.exists():
        return None
    model.load_state_dict(load_weights(path))
    return model, json.loads(path.with_suffix(".json").read_text())


def save_cached(model, path: Path, meta: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(model.state_dict(), path)
    path.with_suffix(".json").write_text(json.dumps(meta))
    return model, meta


def fusion_teacher(P: dict, cache: Path, train: bool = True):
    """The late-fusion teacher (image + audio, CE, seed 0; trained with modality dropout at
    ``teacher_rate`` so that each branch is a good classifier alone), cached."""
    cfg = dict(kind="fusion-teacher", P={k: P.get(k) for k in (
        "av_limit", "teacher_epochs", "batch_size", "lr", "teacher_rate", "precise_bn")},
               v=CACHE_VERSION)
    path = cache / f"crossmodal-teacher-{cache_key(cfg)}.safetensors"
    model = fusion_net(0)
    if (hit := load_cached(model, path)) is not None:
        return hit
    if not train:
        return None, None
    tr, va, te = av_data(P)
    task = {"name": "classification", "inputs": ["image", "audio"],
            "missing": ["image_only", "audio_only"]}
    d = cd.Distiller(model, None, [cd.Term("ce")], task=task,
                     prepare=[{"name": "modality_dropout", "keys": ["image", "audio"],
                               "rate": P["teacher_rate"]}])
    t = cd.Trainer(d, tr, va, te, **train_kw(P, P["teacher_epochs"], 0))
    res = t.fit()
    meta = {"val_acc": res["best_val_acc"], "test_acc": res["test_acc"],
            "image_only_test_acc": res.get("test_image_only_acc"),
            "audio_only_test_acc": res.get("test_audio_only_acc"),
            "seconds": res["train_seconds"], "epochs": P["teacher_epochs"]}
    return save_cached(model, path, meta)


def noisy_acc(model, P, io) -> float:
    return cd.evaluate(model, av_data(P, noisy=True), io=io)["acc"]


# -- the image block ------------------------------------------------------------------------------
def run_image(method: str, seed: int, P: dict, cache: Path) -> dict:
    from crossdistill.methods import build
    from crossdistill.methods.collaborative import BestMembers
    from crossdistill.methods.members import Members

    tr, va, te = av_data(P)
    kw = train_kw(P, P["epochs"], seed)
    image_io = {"inputs": ["image"]}
    if method == "mst":
        from crossdistill.methods.mst import mst_distill

        teacher = fusion_net(200 + seed)  # MST co-trains its own teacher and aux in stage 1
        out = mst_distill(teacher, audio_net(300 + seed), image_cnn(100 + seed), tr, va, te,
                          epochs=P["mst_epochs"], lr=P["lr"], batch_size=P["batch_size"],
                          seed=seed, schedule="cosine", precise_bn=P.get("precise_bn", 0))
        res = out["results"]
        return dict(test_acc=res["test_acc"], val_acc=res["best_val_acc"],
                    best_epoch=res["best_epoch"], val_curve=res.get("val_curve", []),
                    noisy_test_acc=noisy_acc(out["student"], P, image_io),
                    routes=res.get("routes"))
    if method == "crodino":
        group = Members({"image": image_cnn(100 + seed), "audio": audio_net(300 + seed)},
                        reads={"image": "image", "audio": "audio"})
        recipe = build("crodino", group, None)
        d = cd.Distiller(group, None, recipe.terms, io=group.io(), hooks=recipe.hooks, seed=seed)
        keep = BestMembers(group, va)
        t = cd.Trainer(d, tr, va, callbacks=[keep], **kw)
        t.fit()
        best = keep.restore()
        student = group["image"]
        test = cd.evaluate(student, te, io=image_io)["acc"]
        return dict(test_acc=test, val_acc=best["image"][0], best_epoch=best["image"][1],
                    val_curve=curve(t), noisy_test_acc=noisy_acc(student, P, image_io),
                    peer_test_acc=cd.evaluate(group["audio"], te, io={"inputs": ["audio"]})["acc"])
    student = image_cnn(100 + seed)
    teacher = None
    if method != "ce":
        teacher = fusion_teacher(P, cache, train=False)[0]
    params = {"crd": {"num_negatives": min(1024, len(tr) - 1)},  # the paper: 16,384
              "fitnet": {"student_tap": "fc:input", "teacher_tap": "fc:input",
                         "projector": "auto", "weight": 1.0}}.get(method, {})
    recipe = build(method, student, teacher, **params) if method != "ce" else None
    terms = recipe.terms if recipe else [cd.Term("ce")]
    d = cd.Distiller(student, teacher, terms, io=image_io,
                     teacher_io={"inputs": ["image", "audio"]} if teacher else None,
                     hooks=recipe.hooks if recipe else (), num_samples=int(tr.idx.max()) + 1,
                     seed=seed)
    t = cd.Trainer(d, tr, va, te, **kw)
    res = t.fit()
    return dict(test_acc=res["test_acc"], val_acc=res["best_val_acc"],
                best_epoch=res["best_epoch"], val_curve=curve(t),
                noisy_test_acc=noisy_acc(student, P, image_io))


# -- the missing-modality block -------------------------------------------------------------------
MISSING_TASK = {"name": "classification", "inputs": ["image", "audio"],
                "missing": ["image_only", "audio_only", "random@0.5"]}


def _view_metrics(res: dict) -> dict:
    return {v: res.get(f"test_{v}_acc") for v in VIEWS}


def run_missing(method: str, seed: int, P: dict, cache: Path) -> dict:
    tr, va, te = av_data(P)
    kw = train_kw(P, P["missing_epochs"], seed)
    io = {"inputs": ["image", "audio"]}
    if method.startswith("a2s-"):
        return run_any2seg(method.removeprefix("a2s-"), seed, P, cache)
    from crossdistill.methods import build

    student = fusion_net(100 + seed, P["student_width"])
    teacher = None if method == "ce" else fusion_teacher(P, cache, train=False)[0]
    if method == "mmanet":
        from crossdistill.methods.mmanet import mine_weak

        weak = mine_weak(teacher, va, modalities=["image", "audio"])
        recipe = build("mmanet", student, teacher, weak=weak)
    elif method in ("sp", "mad"):
        recipe = build("mmanet", student, teacher, relation=method, mar_weight=0.0)
    else:
        recipe = None
    terms = recipe.terms if recipe else [cd.Term("ce")]
    d = cd.Distiller(student, teacher, terms, io=io, teacher_io=io if teacher else None,
                     hooks=recipe.hooks if recipe else (), task=MISSING_TASK, seed=seed,
                     prepare=[{"name": "modality_dropout", "keys": ["image", "audio"],
                               "rate": P["rate"], "teacher": "complete"}])
    t = cd.Trainer(d, tr, va, te, **kw)
    res = t.fit()
    return dict(test_acc=res["test_acc"], val_acc=res["best_val_acc"],
                best_epoch=res["best_epoch"], val_curve=curve(t), **_view_metrics(res),
                noisy_test_acc=noisy_acc(student, P, io))


def any2seg_teacher(P: dict, cache: Path, train: bool = True):
    """Frozen per-modality encoders aligned CLIP-style to the MiniLM class anchors (seed 0)."""
    from crossdistill.methods.any2seg import teacher_encoders

    cfg = dict(kind="any2seg-teacher", P={k: P.get(k) for k in (
        "av_limit", "teacher_epochs", "batch_size", "lr", "precise_bn")},
               v=CACHE_VERSION)
    path = cache / f"crossmodal-a2s-teacher-{cache_key(cfg)}.safetensors"
    group = teacher_encoders({"image": image_cnn(0), "audio": audio_net(0)})
    if (hit := load_cached(group, path)) is not None:
        return hit
    if not train:
        return None, None
    tr, va, te = av_data(P)
    terms = [cd.Term("ce", student=m, name=f"ce_{m}") for m in group.names]
    from crossdistill.methods.collaborative import BestMembers

    d = cd.Distiller(group, None, terms, io=group.io())
    keep = BestMembers(group, va)
    cd.Trainer(d, tr, va, callbacks=[keep], **train_kw(P, P["teacher_epochs"], 0)).fit()
    best = keep.restore()
    meta = {f"{m}_val_acc": best[m][0] for m in group.names}
    meta.update({f"{m}_test_acc": cd.evaluate(group[m], te, io=group.member_io(m))["acc"]
                 for m in group.names})
    return save_cached(group, path, meta)


def run_any2seg(distill: str, seed: int, P: dict, cache: Path) -> dict:
    from crossdistill.methods import build
    from crossdistill.methods.any2seg import Any2SegFusion

    tr, va, te = av_data(P)
    torch.manual_seed(100 + seed)
    student = Any2SegFusion({"image": image_cnn(100 + seed), "audio": audio_net(300 + seed)},
                            num_classes=10, dim=384)
    teacher = None if distill == "none" else any2seg_teacher(P, cache, train=False)[0]
    recipe = build("any2seg", student, teacher, distill=distill)
    io = student.io()
    d = cd.Distiller(student, teacher, recipe.terms, io=io,
                     teacher_io=teacher.io() if teacher is not None else None,
                     hooks=recipe.hooks, task=MISSING_TASK, seed=seed,
                     prepare=[{"name": "modality_dropout", "keys": ["image", "audio"],
                               "rate": P["rate"], "teacher": "complete"}])
    t = cd.Trainer(d, tr, va, te, **train_kw(P, P["missing_epochs"], seed))
    res = t.fit()
    return dict(test_acc=res["test_acc"], val_acc=res["best_val_acc"],
                best_epoch=res["best_epoch"], val_curve=curve(t), **_view_metrics(res),
                noisy_test_acc=noisy_acc(student, P, io))


# -- the MRDD block -------------------------------------------------------------------------------
MRDD_CELLS = {"c20-v10-m0.3": (20, 10, 0.3), "c20-v10-m0.7": (20, 10, 0.7),
              "c5-v10-m0.7": (5, 10, 0.7)}


def mrdd_data(P: dict):
    from crossdistill.models.mrdd import edge_views

    lim = P["mrdd"]["limit"]
    return _memo(("mrdd", json.dumps(lim)), lambda: tuple(
        edge_views(cd.data.load_split("mnist", s, limit=lim[s])) for s in ("train", "val", "test")))


def run_mrdd(method: str, seed: int, P: dict, cache: Path) -> dict:
    """Both MRDD stages (no labels), then linear probes fit on train, C chosen on val."""
    from crossdistill.methods import mrdd as M

    c_dim, v_dim, ratio = MRDD_CELLS[method]
    Q = P["mrdd"]
    e1, e2 = Q["epochs"]
    out = M.run(*mrdd_data(P), mask_ratio=ratio, c_dim=c_dim, v_dim=v_dim,
                epochs_consistency=e1, epochs_specific=e2, batch_size=Q["batch_size"],
                lr=Q["lr"], seed=seed)
    v = f"v{out['model'].best_view}"
    return dict(test_acc=out["cv_probe"]["test_acc"], val_acc=out["cv_probe"]["val_acc"],
                c_test_acc=out["c_probe"]["test_acc"], c_val_acc=out["c_probe"]["val_acc"],
                v_test_acc=out[f"{v}_probe"]["test_acc"], c_kmeans=out["c_kmeans"],
                mi_proxy=out["mi_proxy"],
                loss_curves={st: [float(r["loss"]) for r in out[st]]
                             for st in ("stage1", "stage2") if out[st] and "loss" in out[st][0]})


# -- the BiDA block -------------------------------------------------------------------------------
def domain_data(P: dict):
    lim = P["bida"].get("limit")
    kw = {"limit": lim, "target_limit": lim} if lim else {}
    return _memo(("domains", json.dumps(lim)), lambda: _splits("mnist_digits", **kw))


def run_bida(method: str, seed: int, P: dict, cache: Path) -> dict:
    """The same triple-branch model and data for every row; only the loss terms differ."""
    from crossdistill.methods import build
    from crossdistill.models.bida import BiDA

    tr, va, te = domain_data(P)
    Q = P["bida"]
    torch.manual_seed(100 + seed)
    student = BiDA(cd.models.create("bida"))
    name, params = {"source": ("mmd_da", {"weight": 0.0}), "mmd": ("mmd_da", {}),
                    "bida-nodistill": ("bida", {"distill_weight": 0.0}),
                    "bida": ("bida", {})}[method]
    recipe = build(name, student, None, **params)
    d = cd.Distiller(student, None, recipe.terms, task="domain_adaptation",
                     hooks=recipe.hooks, seed=seed)
    t = cd.Trainer(d, tr, va, te, **train_kw(Q, Q["epochs"], seed))
    res = t.fit()
    return dict(test_target_acc=res["test_target_acc"], test_acc=res["test_acc"],
                val_target_acc=res.get("best_val_target_acc"), best_epoch=res["best_epoch"],
                val_curve=curve(t, "val_target_acc"))


# -- the LIBS block -------------------------------------------------------------------------------
LIBS_CELLS = {"ce": None, "frame+seq": {"context_weight": 0.0}, "all": {},
              "all-nolcs": {"context_align": "all"}}


def seq_data(P: dict):
    n, noise = P["libs"]["n"], P["libs"].get("video_noise", 0.0)
    return _memo(("av_seq", json.dumps(n), noise),
                 lambda: _splits("av_seq", n=n, video_noise=noise))


def libs_teacher(P: dict, cache: Path, train: bool = True):
    """The audio seq2seq recogniser (CE, seed 0, checkpoint on val CER), cached."""
    from crossdistill.models.seq import seq_io

    cfg = dict(kind="libs-teacher", P=P["libs"], v=CACHE_VERSION)
    path = cache / f"crossmodal-libs-teacher-{cache_key(cfg)}.safetensors"
    torch.manual_seed(0)
    model = cd.models.create("seq2seq", in_features=40)
    if (hit := load_cached(model, path)) is not None:
        return hit
    if not train:
        return None, None
    tr, va, te = seq_data(P)
    d = cd.Distiller(model, None, [cd.Term("ce")], task="cer", io=seq_io("audio"))
    res = cd.Trainer(d, tr, va, te, **train_kw(P["libs"], P["libs"]["teacher_epochs"], 0)).fit()
    meta = {"val_cer": res.get("best_val_cer"), "test_cer": res["test_cer"],
            "seconds": res["train_seconds"]}
    return save_cached(model, path, meta)


def run_libs(method: str, seed: int, P: dict, cache: Path) -> dict:
    from crossdistill.methods import build
    from crossdistill.models.seq import seq_io

    tr, va, te = seq_data(P)
    torch.manual_seed(100 + seed)
    student = cd.models.create("seq2seq", in_features=28)
    params = LIBS_CELLS[method]
    teacher = None if params is None else libs_teacher(P, cache, train=False)[0]
    recipe = build("libs", student, teacher, **params) if teacher is not None else None
    d = cd.Distiller(student, teacher, recipe.terms if recipe else [cd.Term("ce")],
                     task="cer", io=seq_io("video"),
                     teacher_io=seq_io("audio") if teacher is not None else None, seed=seed)
    t = cd.Trainer(d, tr, va, te, **train_kw(P["libs"], P["libs"]["epochs"], seed))
    res = t.fit()
    return dict(test_cer=res["test_cer"], test_ser=res.get("test_ser"),
                val_cer=res.get("best_val_cer"), best_epoch=res["best_epoch"],
                val_curve=curve(t, "val_cer"))


RUNNERS = {"image": run_image, "missing": run_missing, "mrdd": run_mrdd, "bida": run_bida,
           "libs": run_libs}
TEACHERS = {"image": ["fusion"], "missing": ["fusion", "any2seg"], "libs": ["libs"]}


def train_teacher(name: str, P: dict, cache: Path) -> dict:
    if name == "fusion":
        return fusion_teacher(P, cache)[1]
    if name == "any2seg":
        return any2seg_teacher(P, cache)[1]
    if name == "libs":
        return libs_teacher(P, cache)[1]
    raise KeyError(name)


def block_key(block: str, P: dict) -> str:
    """The hash of the settings a block's runs depend on: a saved run is reused only while
    they are unchanged (changing one block's profile reruns that block alone)."""
    if block in P:  # a block with a profile of its own
        sub = P[block]
    else:
        sub = {k: v for k, v in P.items() if k not in BLOCKS and k != "seeds"}
    return cache_key({"block": block, "P": sub, "v": CACHE_VERSION})


# -- workers --------------------------------------------------------------------------------------
def _quiet() -> None:
    os.environ["CROSSDISTILL_QUIET"] = "1"


def _work(item):
    kind, payload, P, cache, deadline = item
    _quiet()
    torch.set_num_threads(1)
    if kind == "teacher":
        t0 = time.time()
        meta = train_teacher(payload, P, Path(cache))
        return ("teacher", payload), {**(meta or {}), "wall_seconds": time.time() - t0}
    block, method, seed = payload
    if deadline and time.time() > deadline:
        return payload, None
    t0 = time.time()
    try:
        row = RUNNERS[block](method, seed, P, Path(cache))
    except Exception as err:  # one broken method must not sink the benchmark
        import traceback

        row = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(-4)}
    row.update(block=block, method=method, seed=seed, seconds=time.time() - t0)
    return payload, row


# -- summaries ------------------------------------------------------------------------------------
def stats(rows: list[dict]) -> list[dict]:
    metrics = ["test_acc", "test_cer", "test_ser", "test_target_acc", "noisy_test_acc",
               "seconds", *VIEWS, "peer_test_acc", "c_test_acc", "v_test_acc", "c_kmeans",
               "mi_proxy"]
    return aggregate([r for r in rows if "error" not in r], by=["block", "method"],
                     metrics=metrics)


def lookup(st, block, method, metric=None):
    return _lookup(st, block, method, metric or METRIC[block][0])


def plateau(rows: list[dict]) -> list[dict]:
    """Per block with a supervised baseline: the range of its val metric (points) over the
    last ceil(20 %) of epochs and the epoch before, worst seed."""
    out = []
    for block, method in BASELINE.items():
        curves = [r["val_curve"] for r in rows
                  if (r["block"], r["method"]) == (block, method) and r.get("val_curve")]
        if not curves:
            continue
        k = max(1, math.ceil(0.2 * len(curves[0])))
        ranges = [100 * tail_range(c) for c in curves if len(c) > k]
        if not ranges:
            continue
        out.append(dict(block=block, method=method, epochs=len(curves[0]),
                        range_points=max(ranges), plateaued=max(ranges) <= PLATEAU_POINTS + 1e-9))
    return out


def loss_plateau(rows: list[dict]) -> list[dict]:
    """MRDD has no supervised baseline: per cell and stage, the training loss's range over
    its last 20 % of epochs relative to its final value (worst seed)."""
    out = []
    for method in BLOCKS["mrdd"]:
        runs = [r for r in rows if (r["block"], r["method"]) == ("mrdd", method)]
        for stage in ("stage1", "stage2"):
            curves = [r["loss_curves"][stage] for r in runs if r.get("loss_curves", {}).get(stage)]
            if not curves or len(curves[0]) < 2:
                continue
            rel = [100 * tail_range(c) / max(abs(c[-1]), 1e-12) for c in curves]
            out.append(dict(block="mrdd", method=method, stage=stage, epochs=len(curves[0]),
                            range_percent=max(rel)))
    return out


def _cmp(st, block, a, b, metric=None, higher=True):
    return compare(st, block, a, b, metric or METRIC[block][0], higher)


def _ev(results, names) -> list[str]:
    return [f"{n}: {g:+.2f} points" for n, r in zip(names, results) if r is not None
            for g, _ in [r]]


def claims(st, plat) -> list[dict]:
    ok = {p["block"]: p["plateaued"] for p in plat}
    out = []

    def claim(name, block, pairs, text, metric=None, higher=True, views=None):
        """``views``: compare the one pair on each missing-modality view instead."""
        if views:
            (a, b), = pairs
            res = [_cmp(st, block, a, b, v, higher) for v in views]
            names = list(views)
        else:
            res = [_cmp(st, block, a, b, metric, higher) for a, b in pairs]
            names = [f"{a} vs {b}" + (f" ({metric})" if metric else "") for a, b in pairs]
        verdict = _verdict_words(res)
        if block in BASELINE and not ok.get(block, False) and verdict != "not run":
            verdict = f"not judged (baseline not plateaued; measured: {verdict})"
        out.append(dict(method=name, claim=text, verdict=verdict, evidence=_ev(res, names)))

    claim("MST-Distill", "image", [("mst", m) for m in ("kd", "fitnet", "crd")],
          "MST-Distill > KD, FitNet and CRD for the image student")
    claim("MMANet (MAD)", "missing", [("mad", "sp")], "MAD > SP on the same features")
    claim("MMANet (missing)", "missing", [("mmanet", "ce")],
          "the MMANet student degrades less with a missing modality (accuracy under image "
          "only / audio only / 50 % random, vs CE + dropout)", views=VIEWS)
    claim("CroDiNo-KD", "image", [("crodino", "kd"), ("crodino", "fitnet")],
          "co-trained unimodal image net > teacher-student cross-modal KD (KD, FitNet)")
    claim("Any2Seg", "missing", [("a2s-lscd", "a2s-none")],
          "LSCD: smaller drop with missing modalities than fusion without it", views=VIEWS)
    claim("Any2Seg (vs feature KD)", "missing", [("a2s-lscd", "a2s-feature")],
          "correlation distillation > plain feature KD")
    claim("MRDD (mask)", "mrdd", [("c20-v10-m0.7", "c20-v10-m0.3")],
          "mask 0.7 > 0.3 (linear probe on c)", metric="c_test_acc")
    claim("MRDD (dims)", "mrdd", [("c5-v10-m0.7", "c20-v10-m0.7")],
          "dim c < dim v beats dim c > dim v (linear probe on [c, v])")
    claim("BiDA", "bida", [("bida", "bida-nodistill"), ("bida", "mmd")],
          "with bi-directional distillation > without, and > source + MMD (target accuracy)")
    claim("LIBS", "libs", [("frame+seq", "ce"), ("all", "ce"), ("all", "all-nolcs")],
          "frame + sequence KD lowers the digit error rate over CE; LCS filtering helps",
          metric="test_cer", higher=False)
    return out


def tables(st, P) -> str:
    parts = []
    for block, methods in BLOCKS.items():
        metric, _, scale = METRIC[block]
        head = ["method", metric.replace("test_", "test ").replace("_", " ")]
        head += [h for _, h in EXTRA.get(block, [])]
        body = []
        for m in methods:
            r = lookup(st, block, m)
            if r is None:
                continue
            line = [m, pm(r[0], r[1], scale) + (f" (n={r[2]})" if r[2] != P["seeds"] else "")]
            for key, _ in EXTRA.get(block, []):
                x = lookup(st, block, m, key)
                line.append(pm(x[0], x[1], 1.0 if key == "mi_proxy" else 100.0) if x else "-")
            body.append(line)
        if body:
            parts.append(f"{block}\n" + format_table(head, body))
    return "\n\n".join(parts)


def _cache_note(res: dict) -> str:
    """Which teachers this run trained and which it read from the cache (a cached teacher
    costs no wall time: the budget of a fresh clone includes training it)."""
    cached = sorted(n for n, m in res["teachers"].items() if m.get("wall_seconds", 0) < 1)
    if not cached:
        return ""
    cost = sum(m.get("seconds", 0) for n, m in res["teachers"].items() if n in cached)
    return (f" Teachers read from the cache: {', '.join(cached)} (training them took "
            f"{cost / 60:.1f} worker-min where recorded).")


def markdown(res: dict) -> str:
    cfg = res["config"]
    lines = [
        "# Cross-modal and multi-modal KD benchmark",
        "",
        "Generated by `benchmarks/crossmodal.py`"
        + (" **--quick (smoke run: not a result)**" if cfg["quick"] else "")
        + f". Wall time {res['wall_seconds'] / 60:.1f} min, {cfg['workers']} worker(s) x "
        f"{cfg['threads']} thread(s); mean +- std over {cfg['seeds']} seed(s); checkpoints "
        "chosen on val, test read once. Accuracy and error rates in %." + _cache_note(res),
        "",
        *([f"**Incomplete: {len(res['runs_not_run'])} of {res['runs_planned']} runs not run "
           "(past --max-minutes; a rerun resumes them).**", ""] if res["runs_not_run"] else []),
        "```",
        res["table"],
        "```",
        "",
        "## Baseline plateau (val accuracy range over the last 20 % of epochs, worst seed)",
        "",
        "| block | baseline | epochs | range (points) | plateaued |",
        "|---|---|---|---|---|",
    ]
    for p in res["plateau"]:
        lines.append(f"| {p['block']} | {p['method']} | {p['epochs']} | "
                     f"{p['range_points']:.2f} | {p['plateaued']} |")
    for b in res.get("loss_plateau", []):
        lines.append(f"| {b['block']} | {b['method']} ({b['stage']} loss, relative) | "
                     f"{b['epochs']} | {b['range_percent']:.2f} % | - |")
    lines += ["", "## Claims", "", "| method | claim | verdict | evidence |", "|---|---|---|---|"]
    for c in res["claims"]:
        lines.append(f"| {c['method']} | {c['claim']} | {c['verdict']} | "
                     f"{'; '.join(c['evidence'])} |")
    lines += ["", "## Teachers", ""]
    for name, meta in res["teachers"].items():
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in meta.items()}
        lines.append(f"- {name}: {shown}")
    for r in res.get("failed", []):
        lines.append(f"- FAILED {r['block']}/{r['method']} seed {r['seed']}: {r['error']}")
    return "\n".join(lines) + "\n"


# -- main -----------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 1 seed (< 5 min)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--blocks", nargs="+", default=list(BLOCKS), choices=list(BLOCKS))
    ap.add_argument("--cache", default=str(ROOT / "runs/cache"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--md", default=None)
    ap.add_argument("--max-minutes", type=float, default=None)
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args(argv)
    P = copy.deepcopy(QUICK if args.quick else FULL)
    P["seeds"] = args.seeds or P["seeds"]
    sub = "runs/crossmodal-quick" if args.quick else None
    args.out = args.out or str(ROOT / (f"{sub}/crossmodal.json" if sub
                                       else "benchmarks/results/crossmodal.json"))
    args.md = args.md or str(ROOT / (f"{sub}/crossmodal.md" if sub
                                     else "docs/results/crossmodal.md"))
    torch.set_num_threads(args.threads)
    _quiet()
    cache = Path(args.cache).resolve()
    t_start = time.time()
    deadline = t_start + 60 * args.max_minutes if args.max_minutes else None
    jobs = [(b, m, s) for s in range(P["seeds"]) for b in args.blocks for m in BLOCKS[b]]
    partial = cache.parent / "crossmodal" / f"{Path(args.out).stem}.partial.jsonl"
    done = {}
    if partial.exists() and not args.fresh:
        for line in partial.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("profile") == block_key(rec["job"][0], P):
                done[tuple(rec["job"])] = rec["row"]
    rows = [done[j] for j in jobs if j in done]
    todo = [j for j in jobs if j not in done]
    teachers = sorted({t for b in args.blocks for t in TEACHERS.get(b, [])})
    print(f"{len(jobs)} runs ({len(todo)} to do), teachers: {', '.join(teachers)}", flush=True)
    teacher_meta, failed, skipped = {}, [], []
    bar = tqdm(total=len(todo), desc="crossmodal", dynamic_ncols=True, disable=None)
    with _pool(args.workers, args.threads) as pmap:
        needs = {j: any(t in TEACHERS.get(j[0], []) for t in teachers) for j in todo}
        phases = [
            [("teacher", t, P, str(cache), None) for t in teachers]
            + [("run", j, P, str(cache), deadline) for j in todo if not needs[j]],
            [("run", j, P, str(cache), deadline) for j in todo if needs[j]],
        ]
        for phase in phases:
            for job, row in pmap(_work, phase):
                if job[0] == "teacher":
                    teacher_meta[job[1]] = row
                    tqdm.write(f"teacher {job[1]}: {row}")
                    continue
                bar.update(1)
                if row is None:
                    skipped.append(job)
                    continue
                if "error" in row:
                    failed.append(row)
                    tqdm.write(f"{job} FAILED: {row['error']}")
                    continue
                rows.append(row)
                partial.parent.mkdir(parents=True, exist_ok=True)
                with partial.open("a") as f:
                    f.write(json.dumps({"job": list(job), "profile": block_key(job[0], P),
                                        "row": row}) + "\n")
                metric = METRIC[job[0]][0]
                tqdm.write(f"{job[0]:>8} {job[1]:>14} seed {job[2]}: {metric} "
                           f"{row.get(metric, float('nan')):.4f} ({row['seconds']:.0f} s)")
    bar.close()
    st = stats(rows)
    plat = plateau(rows)
    res = dict(
        config=dict(quick=args.quick, workers=args.workers, threads=args.threads,
                    seeds=P["seeds"], profile=P, blocks=args.blocks,
                    torch=torch.__version__, python=platform.python_version()),
        wall_seconds=time.time() - t_start,
        sum_run_seconds=sum(r["seconds"] for r in rows),
        teachers=teacher_meta,
        cells=st,
        plateau=plat,
        loss_plateau=loss_plateau(rows),
        claims=claims(st, plat),
        table=tables(st, P),
        failed=failed,
        runs_planned=len(jobs),
        runs_not_run=[list(j) for j in skipped],
        runs=rows,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1, default=str))
    md = markdown(res)
    Path(args.md).parent.mkdir(parents=True, exist_ok=True)
    Path(args.md).write_text(md)
    print(md)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
