"""LLaVA-KD in miniature (issue 14, block ``llava``): does each of its stages add?

Setting. sklearn digits (8x8; fixed splits 1,077 / 360 / 360) with templated questions and
short answers (:mod:`crossdistill.data.digit_vqa`: the digit, even?, above four?, stroke
thickness, slant, size; from the label and the attributes measured on each image; 3 questions
per train image, all 6 per val / test image) and one caption per image for pre-training.
Both MLLMs are :class:`~crossdistill.models.mini_vlm.MiniVLM` s sharing one frozen image
encoder (a CNN, channels (16, 32), trained here on the digit labels, seed 0: the stand-in for
the SigLIP that LLaVA-KD's teacher and student share; 16 visual tokens of width 32) and one
word-level tokenizer (57 tokens). LLMs: teacher width 96 x 3 blocks, student 16 x 2 (at
width 64 the student came within a point of the teacher on this task, leaving distillation
nothing to pass on). Each LLM is first pre-trained on the train split's text alone
(questions, answers, captions; seed 0, shared by every arm as the paper's students share one
pre-trained Qwen checkpoint). The teacher then goes through the plain two-stage recipe (PT:
captions, projector only; SFT: QA, projector + LLM), without distillation.

Rows (students: seeds 0-2 vary the projector's init and the data order; QA stages pick their
best epoch on the val split and the next stage starts there; caption stages keep their last
epoch, as LLaVA's one-epoch pre-training does; the test split is read once, after the last
stage):

- ``teacher``: the trained teacher (seed 0; the same row for every seed);
- ``sft``: the student's SFT alone (CE on the QA data) -- the baseline;
- ``pt+sft``: plain pre-training on captions, then SFT (the usual two stages);
- ``dpt+sft``: LLaVA-KD's distilled pre-training, then SFT;
- ``dpt+sft+ft``: DPT + SFT + a CE-only fine-tuning on DFT's schedule: the control that
  separates DFT's distillation from its extra epochs;
- ``llava-kd``: DPT + SFT + DFT, the full scheme (all loss weights 1);
- ``llava-kd-nordist`` / ``llava-kd-novis``: the same without RDist / without the visual-token
  MDist, in DPT and DFT (ablations).

Claims: "each stage adds" (llava-kd > dpt+sft > sft), DPT > PT before the same SFT, DFT >
the same extra epochs without a teacher, RDist adds, visual MDist adds. Main metric:
exact-match answer accuracy on test (teacher-forced argmax, which equals greedy decoding's
exact match).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

import crossdistill as cd
import crossdistill.data.digit_vqa  # noqa: F401  (registers digit_vqa)
import crossdistill.losses.mllm  # noqa: F401  (registers mdist, rdist)
import crossdistill.methods.llava_kd  # noqa: F401  (registers llava-kd)
import crossdistill.tasks.vqa  # noqa: F401  (registers vqa)
from crossdistill.data.digit_vqa import KINDS, digit_vqa, word_tokenizer
from crossdistill.io import load_weights, save_weights
from crossdistill.methods.llava_kd import Stage, pipeline
from crossdistill.models.mini_vlm import mini_vlm
from crossdistill.train.console import quiet

BLOCK = "llava"
METHODS = ["teacher", "sft", "pt+sft", "dpt+sft", "dpt+sft+ft", "llava-kd", "llava-kd-nordist",
           "llava-kd-novis"]
BASELINE = "sft"
METRIC = ("test_acc", "answer acc", 100.0)
EXTRA = [("test_token_acc", "token acc"), ("test_acc_digit", "digit"),
         ("test_acc_thickness", "thickness"), ("test_acc_slant", "slant"),
         ("test_acc_size", "size")]
ARMS = {  # the student's stages per row; "ft" is an SFT stage on DFT's schedule (no teacher)
    "sft": ("sft",),
    "pt+sft": ("pt", "sft"),
    "dpt+sft": ("dpt", "sft"),
    "dpt+sft+ft": ("dpt", "sft", "ft"),
    "llava-kd": ("dpt", "sft", "dft"),
    "llava-kd-nordist": ("dpt", "sft", "dft"),
    "llava-kd-novis": ("dpt", "sft", "dft"),
}
ABLATIONS = {"-nordist": {"rel_weight": 0.0}, "-novis": {"vis_weight": 0.0}}
RECIPE_STAGE = {"pt": "pt", "dpt": "dpt", "sft": "sft", "ft": "sft", "dft": "dft"}
CACHE_VERSION = 2
_KINDS = ["digit", "even", "above4", "thickness", "slant", "size"]

PROFILES = {
    "full": dict(
        images="digits", kinds=_KINDS, questions=3, captions=1, limit=None,
        batch_size=64, warmup=0.5,
        encoder=dict(channels=(16, 32), epochs=15, lr=0.05),
        teacher=dict(dim=96, depth=3, heads=4), student=dict(dim=16, depth=2, heads=2),
        lm_epochs=3, lm_lr=3e-3,
        teacher_epochs={"pt": 4, "sft": 15}, teacher_lr={"pt": 3e-3, "sft": 2e-3},
        epochs={"pt": 4, "dpt": 4, "sft": 20, "ft": 8, "dft": 8},
        lr={"pt": 3e-3, "dpt": 3e-3, "sft": 3e-3, "ft": 1e-3, "dft": 1e-3},
        method={},
    ),
    "quick": dict(
        images="digits", kinds=_KINDS, questions=2, captions=1,
        limit={"train": 150, "val": 60, "test": 60},
        batch_size=64, warmup=0.0,
        encoder=dict(channels=(8, 16), epochs=2, lr=0.05),
        teacher=dict(dim=32, depth=2, heads=2), student=dict(dim=16, depth=1, heads=2),
        lm_epochs=1, lm_lr=3e-3,
        teacher_epochs={"pt": 1, "sft": 2}, teacher_lr={"pt": 3e-3, "sft": 3e-3},
        epochs={"pt": 1, "dpt": 1, "sft": 2, "ft": 1, "dft": 1},
        lr={"pt": 3e-3, "dpt": 3e-3, "sft": 3e-3, "ft": 1e-3, "dft": 1e-3},
        method={},
    ),
}

CLAIMS = [
    dict(name="LLaVA-KD stages", pairs=[("llava-kd", "dpt+sft"), ("dpt+sft", "sft")],
         text="LLaVA-KD: each stage adds (DPT+SFT+DFT > DPT+SFT > SFT)", metric=None,
         higher=True),
    dict(name="LLaVA-KD DPT", pairs=[("dpt+sft", "pt+sft")],
         text="LLaVA-KD: distilled pre-training > plain pre-training before the same SFT",
         metric=None, higher=True),
    dict(name="LLaVA-KD DFT", pairs=[("llava-kd", "dpt+sft+ft")],
         text="LLaVA-KD: DFT > the same extra fine-tuning without distillation", metric=None,
         higher=True),
    dict(name="LLaVA-KD RDist", pairs=[("llava-kd", "llava-kd-nordist")],
         text="LLaVA-KD: RDist adds to MDist", metric=None, higher=True),
    dict(name="LLaVA-KD visual MDist", pairs=[("llava-kd", "llava-kd-novis")],
         text="LLaVA-KD: MDist on the visual tokens adds to MDist on the response",
         metric=None, higher=True),
]


# -- helpers ------------------------------------------------------------------------------
def cache_key(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


_DATA: dict = {}


def data(P: dict, mode: str):
    """(train, val, test) of ``mode`` (qa, caption, text) at the profile's sizes."""
    key = (mode, json.dumps([P["images"], P["kinds"], P["questions"], P["captions"],
                             P["limit"]], sort_keys=True))
    if key not in _DATA:
        lim = P["limit"] or {}
        _DATA[key] = tuple(
            digit_vqa(s, images=P["images"], mode=mode, kinds=P["kinds"],
                      questions=P["questions"], captions=P["captions"], limit=lim.get(s))
            for s in ("train", "val", "test"))
    return _DATA[key]


def task(P: dict, text_only: bool = False, select: str = "acc"):
    """The vqa task (text_only: the LM reads the text alone); captions select on val loss."""
    if text_only:
        return cd.tasks.build({"name": "vqa", "inputs": {"input_ids": "input_ids"},
                               "select": "loss"})
    return cd.tasks.build({"name": "vqa", "kinds": list(KINDS), "select": select})


def train_kw(P: dict) -> dict:
    return dict(batch_size=P["batch_size"], optimizer="adamw", weight_decay=0.0,
                schedule="cosine", warmup_epochs=P.get("warmup", 0.0), progress=False)


def vlm(P: dict, size: str, seed: int, parts: dict) -> torch.nn.Module:
    """A MiniVLM of ``size`` (teacher / student) built with ``seed``, loading the cached
    ``parts`` (encoder, llm states) that are given."""
    ch = tuple(P["encoder"]["channels"])
    torch.manual_seed(seed)
    m = mini_vlm(vocab_size=len(word_tokenizer()), **P[size], img_size=8, vision="cnn",
                 vision_params={"channels": ch}, vision_tap=f"stage{len(ch)}")
    if "encoder" in parts:
        m.vision.model.load_state_dict(parts["encoder"])
    if "llm" in parts:
        m.llm.load_state_dict(parts["llm"])
    return m


def _cached(cache: Path, name: str, cfg: dict):
    path = Path(cache) / f"vl-llava-{name}-{cache_key(dict(cfg, v=CACHE_VERSION))}.safetensors"
    if path.exists():
        return path, load_weights(path), json.loads(path.with_suffix(".json").read_text())
    return path, None, None


def _save(path: Path, state: dict, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(state, path)
    path.with_suffix(".json").write_text(json.dumps(meta))


def encoder(P: dict, cache: Path):
    """The shared image encoder: a CNN trained on the digit labels (seed 0), cached."""
    E = P["encoder"]
    cfg = dict(E, images=P["images"], limit=P["limit"])
    path, state, meta = _cached(cache, "encoder", cfg)
    if state is not None:
        return state, meta
    t0 = time.time()
    tr, va, _ = data(P, "caption")
    cls = [cd.data.Dataset.classification(d.tensors["x"], d.tensors["y"], d.tensors["idx"])
           for d in (tr, va)]
    torch.manual_seed(0)
    model = cd.models.create("cnn", num_classes=10, in_channels=1, img_size=8,
                             channels=tuple(E["channels"]))
    t = cd.Trainer(cd.Distiller(model, None, [cd.Term("ce")]), cls[0], cls[1],
                   epochs=E["epochs"], lr=E["lr"], batch_size=P["batch_size"], progress=False,
                   seed=0)
    res = t.fit()
    meta = {"val_acc": res["best_val_acc"], "seconds": time.time() - t0}
    _save(path, model.state_dict(), meta)
    return model.state_dict(), meta


def lm(P: dict, size: str, cache: Path, enc: dict):
    """The ``size`` model's LLM pre-trained on the train split's text alone (seed 0)."""
    cfg = dict(size=P[size], epochs=P["lm_epochs"], lr=P["lm_lr"], bs=P["batch_size"],
               warmup=P["warmup"],
               data=[P["images"], P["kinds"], P["questions"], P["captions"], P["limit"]])
    path, state, meta = _cached(cache, f"lm-{size}", cfg)
    if state is not None:
        return state, meta
    t0 = time.time()
    tr, va, _ = data(P, "text")
    m = vlm(P, size, 0, {"encoder": enc})
    m.requires_grad_(False)
    m.llm.requires_grad_(True)
    d = cd.Distiller(m, None, [cd.Term("ce")], task=task(P, text_only=True))
    res = cd.Trainer(d, tr, va, epochs=P["lm_epochs"], lr=P["lm_lr"], seed=0,
                     **train_kw(P)).fit()
    meta = {"val_loss": res["best_val_loss"], "seconds": time.time() - t0}
    _save(path, m.llm.state_dict(), meta)
    return m.llm.state_dict(), meta


def stages(P: dict, names, epochs: dict, lrs: dict, params: dict, last_test: bool = True):
    """The Stage list of ``names``: captions for pt / dpt (no val: the last epoch, as LLaVA's
    one-epoch pre-training keeps it), QA for the others (best epoch on val); the test split
    only for the last stage."""
    qa, cap = data(P, "qa"), data(P, "caption")
    out = []
    for i, name in enumerate(names):
        tr, va, te = cap if name in ("pt", "dpt") else qa
        out.append(Stage(RECIPE_STAGE[name], tr, None if name in ("pt", "dpt") else va,
                         te if last_test and i == len(names) - 1 else None,
                         epochs=epochs[name], lr=lrs[name],
                         params=params if name in ("dpt", "dft") else {}))
    return out


def teacher_model(P: dict, cache: Path, train: bool = True):
    """(the trained teacher, its meta): PT then SFT without distillation (seed 0), cached."""
    enc, enc_meta = encoder(P, cache)
    llm, lm_meta = lm(P, "teacher", cache, enc)
    cfg = {k: P[k] for k in ("images", "kinds", "questions", "captions", "limit", "batch_size",
                             "warmup", "encoder", "teacher", "lm_epochs", "lm_lr",
                             "teacher_epochs", "teacher_lr")}
    path, state, meta = _cached(cache, "teacher", cfg)
    m = vlm(P, "teacher", 0, {"encoder": enc, "llm": llm})
    if state is not None:
        m.load_state_dict(state)
        return m, meta
    if not train:
        return None, None
    t0 = time.time()
    res = pipeline(m, None, stages(P, ("pt", "sft"), P["teacher_epochs"], P["teacher_lr"], {}),
                   task=task(P), seed=0, **train_kw(P))
    last = res[-1]
    meta = {**{k: v for k, v in last.items() if k.startswith("test_")},
            "val_acc": last["best_val_acc"], "val_curve": last["val_curve"],
            "epochs": sum(P["teacher_epochs"].values()),
            "seconds": time.time() - t0, "encoder": enc_meta, "lm": lm_meta,
            "params": sum(p.numel() for p in m.parameters())}
    _save(path, m.state_dict(), meta)
    return m, meta


# -- the block interface -----------------------------------------------------------------
def teachers(P: dict, cache: Path) -> dict:
    """Train (seed 0) or load every shared part: encoder, the two pre-trained LLMs, teacher."""
    cache = Path(cache)
    with quiet():
        _, t_meta = teacher_model(P, cache)
        enc, _ = encoder(P, cache)
        _, s_meta = lm(P, "student", cache, enc)
    return {"teacher": t_meta, "student-lm": s_meta}


def run(method: str, seed: int, P: dict, cache: Path) -> dict:
    """One cell: the student's stages for ``method`` with ``seed`` (module docstring)."""
    cache = Path(cache)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; one of {', '.join(METHODS)}")
    with quiet():
        teacher, t_meta = teacher_model(P, cache)
        if method == "teacher":
            return dict({k: v for k, v in t_meta.items() if k.startswith("test_")},
                        val_acc=t_meta["val_acc"], val_curve=t_meta["val_curve"],
                        epochs=t_meta["epochs"], params=t_meta["params"])
        enc, _ = encoder(P, cache)
        llm, _ = lm(P, "student", cache, enc)
        student = vlm(P, "student", 100 + seed, {"encoder": enc, "llm": llm})
        params = dict(P["method"])
        for suffix, off in ABLATIONS.items():
            if method.endswith(suffix):
                params.update(off)
        t0 = time.time()
        res = pipeline(student, teacher, stages(P, ARMS[method], P["epochs"], P["lr"], params),
                       task=task(P), seed=seed, **train_kw(P))
    last = res[-1]
    return dict(
        {k: v for k, v in last.items() if k.startswith("test_")},
        val_acc=last["best_val_acc"], val_curve=last["val_curve"],
        epochs=sum(P["epochs"][s] for s in ARMS[method]),
        stages={name: {"val_curve": r["val_curve"], "best_epoch": r["best_epoch"],
                       **{k: v for k, v in r.items() if k.startswith("best_val_")}}
                for name, r in zip(ARMS[method], res)},
        seconds=time.time() - t0, params=sum(p.numel() for p in student.parameters()),
    )


def main(profile: str = "quick", cache: str = "runs/cache/vl", seeds=None) -> dict:
    """Every row of the block (a plain loop, for a look by hand)."""
    P = PROFILES[profile]
    seeds = seeds if seeds is not None else ([0] if profile == "quick" else [0, 1, 2])
    t0 = time.time()
    out = {"teachers": teachers(P, Path(cache)), "rows": {}}
    for m in METHODS:
        out["rows"][m] = [run(m, s, P, Path(cache)) for s in seeds]
        accs = [r["test_acc"] for r in out["rows"][m]]
        print(f"{m:18s} test acc {100 * sum(accs) / len(accs):.1f}  ({time.time() - t0:.0f} s)")
    out["seconds"] = time.time() - t0
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="quick", choices=list(PROFILES))
    ap.add_argument("--cache", default="runs/cache/vl")
    a = ap.parse_args()
    print(json.dumps(main(a.profile, a.cache), indent=1, default=str)[:4000])
