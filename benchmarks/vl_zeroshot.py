"""Block ``zeroshot`` of benchmarks/vl.py: a CLIP-style teacher trained here and the
classification methods that distil it (VLM-OOD, SgVA-CLIP, MaKD).

Data: MNIST (the 10k set shipped offline: train 6,000 / val 2,000 / test 2,000) as
``digit_captions`` (3 template + attribute captions per image) with ``zero_shot: true``:
train / val hold the digits 0-4, test the unseen 5-9. The sklearn 8x8 digits are not used:
540 zero-shot train images, and at 8x8 the measured loops are unreliable (a 0's loop is
found in 46 % of the images, against 84 % on MNIST).

Teacher (seed 0, cached by a hash of the profile): a CNN image tower (16-32-64) + the frozen
all-MiniLM-L6-v2 text tower, projected to 64 dims, trained with CLIP's ``clip`` loss. The
text tower is frozen, so its caption embeddings are computed once
(:class:`crossdistill.text.embed_cache.TextEmbedCache`, saved beside the teacher) and
training runs the image tower only. Besides the three ``digit_captions`` captions each
image gets one *shape caption* naming measured aspects ("a digit with a closed loop and a
long vertical stroke", :mod:`crossdistill.data.digit_aspects`): on digit names alone the
image tower has nothing that transfers from 0-4 to 5-9 (zero-shot accuracy near chance,
reported as row ``teacher-plain``). Zero-shot: class-name prompts ("a handwritten seven":
``teacher-names``) or the names with hand-written attribute descriptions
(``teacher-attr``: mean of the unit text embeddings).

Rows (3 seeds each; the teacher rows repeat the one teacher):

- ``vlmood-*``: a CNN student (8-16-32 -> 64) on the 0-4 train images; checkpoint on the 0-4
  val split; test = 5-way accuracy on the unseen 5-9 with their class texts swapped in.
  ``cls`` = L-cls alone, ``full`` = L-cls + L-vlalign (teacher-correct images only) + L-mse
  + L-im-cst; ``-attr``: class texts with attribute descriptions (else names only).
- ``sgva-*-K``: SgVA-CLIP few-shot on the digits the teacher never saw (5-9): K shots per
  class from the (non zero-shot) train split, the mix ratio and the checkpoint on the 5-9
  images of the val split, test = the 5-9 test images (5-way). ``zs`` = the teacher
  zero-shot with the same class texts (names + attributes), ``ce`` = the residual adapter
  with CE only, ``full`` = supervised contrastive + cross-modal contrastive + implicit KD,
  its KD weight (unknown in the paper) chosen on val from ``kd_grid``. The tower is frozen,
  so its embeddings are computed once and the adapter trains on them (as Tip-Adapter caches
  CLIP features): the same numbers as running the tower each step, checked once.
- ``makd-*``: 10-way MNIST with ``labels`` (100) labelled training images, the student
  trained on those only (MaKD is supervised); ``ce`` vs CE + 4 x aspect BCE, the aspects
  answered by an aspect CNN (no MLLM offline) trained with BCE (seed 0) on the measured
  aspects of the whole train split (no digit labels).

Metric: ``test_acc`` (5-way on 5-9 for the teacher, VLM-OOD and SgVA rows; 10-way for MaKD).

    python benchmarks/vl_zeroshot.py [--quick] [--seeds 0 1 2]   # standalone check
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

import crossdistill as cd
import crossdistill.methods.makd  # noqa: F401  (registers; the lead adds them to __init__)
import crossdistill.methods.sgva  # noqa: F401
import crossdistill.methods.vlm_ood  # noqa: F401
from crossdistill.io import load_weights, save_weights

BLOCK = "zeroshot"
METHODS = [
    "teacher-plain", "teacher-names", "teacher-attr",
    "vlmood-cls", "vlmood-cls-attr", "vlmood-full", "vlmood-full-attr",
    "sgva-zs", "sgva-ce-4", "sgva-full-4", "sgva-ce-16", "sgva-full-16",
    "makd-ce", "makd-aspects",
]
BASELINE = "vlmood-cls"
METRIC = ("test_acc", "test acc (5-9 / MNIST)", 100.0)
EXTRA = [("val_acc", "val acc")]
CACHE_VERSION = 1

FULL = dict(
    seeds=3,
    images="mnist",
    limit=None,
    captions=3,
    shape_captions=1,
    max_tokens=24,
    attr_mode="mean",
    teacher=dict(channels=(16, 32, 64), dim=64, epochs=10, lr=3e-3, batch_size=64),
    vlmood=dict(channels=(8, 16, 32), epochs=15, lr=3e-3, batch_size=64, k=256,
                correct_only=True, temperature=0.07),
    sgva=dict(epochs=100, lr=1e-2, batch_size=32, temperature=0.01, ratio=0.2, attr=True,
              val_limit=1000, kd_grid=(0.1, 0.3, 1.0)),
    # batch 50 divides the 100 labels (no 4-image last batch) and BN statistics are
    # recomputed on them before each validation: else val swung by 1-3 points at the end
    makd=dict(labels=100, channels=(8, 16, 32), epochs=120, lr=3e-3, batch_size=50,
              precise_bn=100,
              teacher_channels=(16, 32, 64), teacher_epochs=8, val_limit=1000,
              aspect_weight=4.0),
)
QUICK = dict(
    seeds=1,
    images="mnist",
    limit={"train": 600, "val": 200, "test": 200},
    captions=3,
    shape_captions=1,
    max_tokens=24,
    attr_mode="mean",
    teacher=dict(channels=(8, 16, 32), dim=32, epochs=2, lr=3e-3, batch_size=64),
    vlmood=dict(channels=(8, 16), epochs=2, lr=3e-3, batch_size=64, k=256,
                correct_only=True, temperature=0.07),
    sgva=dict(epochs=5, lr=1e-2, batch_size=32, temperature=0.01, ratio=0.2, attr=True,
              val_limit=100, kd_grid=(0.3,)),
    makd=dict(labels=50, channels=(8, 16), epochs=3, lr=3e-3, batch_size=32,
              teacher_channels=(8, 16), teacher_epochs=1, val_limit=100, aspect_weight=4.0),
)
PROFILES = {"full": FULL, "quick": QUICK}

CLAIMS = [
    dict(name="VLM-OOD", pairs=[("vlmood-full-attr", "vlmood-cls"),
                                ("vlmood-full", "vlmood-cls"),
                                ("vlmood-full-attr", "vlmood-full")],
         text="L-vlalign + L-mse + L-im-cst (+ attribute texts) raise unseen-class (5-9) "
              "accuracy over L-cls alone", metric=None, higher=True),
    dict(name="SgVA-CLIP", pairs=[("sgva-full-4", "sgva-ce-4"), ("sgva-ce-4", "sgva-zs"),
                                  ("sgva-full-16", "sgva-ce-16"), ("sgva-ce-16", "sgva-zs")],
         text="adapter with all three losses > adapter with CE only > zero-shot (4 and 16 "
              "shots)", metric=None, higher=True),
    dict(name="MaKD", pairs=[("makd-aspects", "makd-ce")], text="CE + aspect BCE > CE alone "
         "(100 labels)", metric=None, higher=True),
]

SEEN, UNSEEN = list(range(5)), list(range(5, 10))


def cache_key(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _kw(P: dict, seed: int, **extra) -> dict:
    return dict(epochs=P["epochs"], batch_size=P["batch_size"], lr=P["lr"], optimizer="adamw",
                weight_decay=0.0, schedule="cosine", progress=False, seed=seed, **extra)


def _curve(trainer, key: str = "val_acc") -> list[float]:
    return [float(r[key]) for r in trainer.log.rows if key in r]


# -- data --------------------------------------------------------------------------------------
_MEMO: dict = {}


def _memo(key, make):
    if key not in _MEMO:
        _MEMO[key] = make()
    return _MEMO[key]


def _limit(P, split):
    lim = P.get("limit")
    return None if lim is None else lim.get(split)


def caption_data(P: dict):
    """(train, val, test) zero-shot digit_captions + aspects + shape captions."""
    from crossdistill.data.digit_aspects import (
        aspect_cuts,
        measure_shapes,
        raw_images,
        with_aspects,
    )

    def make():
        kw = dict(images=P["images"], captions=P["captions"], zero_shot=True,
                  max_tokens=P["max_tokens"])
        raw = [cd.data.load_split("digit_captions", s, limit=_limit(P, s), **kw)
               for s in ("train", "val", "test")]
        cuts = aspect_cuts(measure_shapes(raw_images(raw[0])))
        return tuple(with_aspects(d, shape_captions=P["shape_captions"], cuts=cuts)
                     for d in raw)

    return _memo(("captions", json.dumps(P, sort_keys=True, default=str)), make)


def plain_split(P: dict, split: str, classes=None, limit=None):
    """A split of the image source (all classes unless ``classes``), standardised as
    digit_captions does (the whole train split's mean / std), labels remapped to positions
    in ``classes``."""
    def make():
        from crossdistill.data.dataset import Dataset

        tr = cd.data.load(P["images"], "train", normalize=False)
        mean, std = float(tr.x.mean()), float(tr.x.std())
        d = cd.data.load(P["images"], split, normalize=False, limit=_limit(P, split))
        x, y = (d.x - mean) / std, d.y
        keep = torch.arange(len(y))
        if classes is not None:
            keep = torch.isin(y, torch.tensor(classes)).nonzero().flatten()
        if limit is not None:
            g = torch.Generator().manual_seed(0)
            keep = keep[torch.randperm(len(keep), generator=g)[:limit]].sort().values
        y = y[keep]
        if classes is not None:
            y = torch.tensor([classes.index(int(c)) for c in y])
        return Dataset({"x": x[keep], "y": y, "idx": d.idx[keep]},
                       {"x": "image", "y": "label", "idx": "id"}, name=P["images"],
                       split=split, num_classes=10 if classes is None else len(classes),
                       info={"mean": mean, "std": std, "train_mean": mean, "train_std": std})

    return _memo(("plain", P["images"], split, str(classes), limit,
                  json.dumps(P.get("limit"), default=str)), make)


def shots(data, k: int, seed: int):
    """k images per class of ``data`` drawn with ``seed``."""
    g = torch.Generator().manual_seed(1000 + seed)
    ids = []
    for c in sorted(set(data.y.tolist())):
        pool = (data.y == c).nonzero().flatten()
        if len(pool) < k:
            raise cd.errors.ConfigError("sgva.shots", k, f"<= {len(pool)} images of class {c}")
        ids.append(pool[torch.randperm(len(pool), generator=g)[:k]])
    return data.subset(torch.cat(ids).sort().values)


def remap(data, classes):
    y = torch.tensor([classes.index(int(c)) for c in data.y])
    tensors = dict(data.tensors)
    tensors["y"] = y
    out = cd.data.Dataset(tensors, data.kinds, name=data.name, split=data.split,
                          num_classes=len(classes), info=data.info)
    return out


# -- the teacher --------------------------------------------------------------------------------
def _teacher_cfg(P: dict, shape: bool) -> dict:
    keys = ("images", "limit", "captions", "shape_captions", "max_tokens", "teacher")
    cfg = {k: P[k] for k in keys}
    if not shape:
        cfg["shape_captions"] = 0
    return dict(kind="vl-teacher", P=cfg, v=CACHE_VERSION)


def _dual(P: dict, cache_obj, seed: int = 0):
    from crossdistill.models.dual import DualEncoder
    from crossdistill.text.embed_cache import CachedTextTower

    T = P["teacher"]
    torch.manual_seed(seed)
    img = cd.models.create("cnn", num_classes=10, in_channels=1, img_size=28 if P["images"]
                           == "mnist" else 8, channels=tuple(T["channels"]))
    return DualEncoder(img, CachedTextTower(cache_obj, T["dim"]), T["dim"])


def class_texts(P: dict, tokenizer, dual, classes, attr: bool):
    from crossdistill.data.digit_aspects import class_descriptions
    from crossdistill.methods.vlm_ood import class_text_embeddings

    desc = class_descriptions(classes)
    if not attr:
        desc = [d[:1] for d in desc]
    return class_text_embeddings(dual, desc, tokenizer, mode=P["attr_mode"],
                                 max_tokens=P["max_tokens"])


def _all_class_strings():
    from crossdistill.data.digit_aspects import class_descriptions

    d = class_descriptions(range(10))
    return [t for ts in d for t in ts] + [" . ".join(ts) for ts in d]


def _train_teacher(P: dict, cache: Path, shape: bool, text_cache, path: Path) -> dict:
    from crossdistill.methods.vlm_ood import TextClassifier

    tr, va, te = caption_data(P)
    if not shape:  # the digit_captions captions only
        tr, va, te = (_drop_shape(d, P) for d in (tr, va, te))
    t0 = time.time()
    m = _dual(P, text_cache, 0)
    io = m.io()
    task = {"name": "retrieval", "inputs": list(io["inputs"]), "ks": [1, 5, 10]}
    d = cd.Distiller(m, None, [cd.Term("clip", student=[m.image_tap, m.text_tap],
                                       teacher=None)],
                     io=io, task=task, prepare=[{"name": "pick_caption"}])
    t = cd.Trainer(d, tr, va, **_kw(P["teacher"], 0))
    res = t.fit()
    m.eval()
    meta = {"seconds": time.time() - t0, "best_val_mean_recall": res["best_val_mean_recall"],
            "best_epoch": res["best_epoch"], "val_curve": _curve(t, "val_mean_recall")}
    tok = tr.tokenizer
    for attr in (False, True):
        name = "attr" if attr else "names"
        tc = TextClassifier(m.image, class_texts(P, tok, m, SEEN, attr), 0.01).eval()
        meta[f"val_acc_{name}"] = cd.evaluate(tc, va)["acc"]
        tc.set_texts(class_texts(P, tok, m, UNSEEN, attr))
        meta[f"test_acc_{name}"] = cd.evaluate(tc, remap(te, UNSEEN))["acc"]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(m.state_dict(), path)
    path.with_suffix(".json").write_text(json.dumps(meta))
    return meta


def _drop_shape(d, P):
    c = P["captions"]
    t = dict(d.tensors)
    t["caption_ids"], t["caption_mask"] = t["caption_ids"][:, :c], t["caption_mask"][:, :c]
    out = cd.data.Dataset(t, d.kinds, name=d.name, split=d.split, num_classes=d.num_classes,
                          info=d.info)
    out.texts, out.tokenizer = [x[:c] for x in d.texts], d.tokenizer
    return out


def _text_cache_path(P: dict, cache: Path) -> Path:
    cfg = {k: P[k] for k in ("images", "limit", "captions", "shape_captions", "max_tokens")}
    return cache / f"vl-minilm-texts-{cache_key([cfg, CACHE_VERSION])}.safetensors"


def text_cache(P: dict, cache: Path, encode: bool = True):
    """The MiniLM caption-embedding cache of every caption and class text the block uses:
    loaded from disk, or (``encode``) computed once with MiniLM and saved."""
    from crossdistill.data.turns import _ids
    from crossdistill.text.embed_cache import TextEmbedCache

    path = _text_cache_path(P, cache)
    if path.exists():
        return _memo(("tc", str(path)), lambda: TextEmbedCache.load(path, name="minilm"))
    if not encode:
        raise cd.errors.ConfigError("cache", str(path), "the block's teachers() run first")
    from crossdistill.models.dual import minilm_tower

    tc = TextEmbedCache(minilm_tower(), name="minilm")
    tr, va, te = caption_data(P)
    for d in (tr, va, te):
        tc.fill(d["caption_ids"], d["caption_mask"])
    ids, mask = _ids(tr.tokenizer, _all_class_strings(), P["max_tokens"])
    tc.fill(ids, mask)
    tc.save(path)
    tc.encoder = None  # nothing new to embed: keep the cache read-only from here
    _MEMO[("tc", str(path))] = tc
    return tc


def _teacher_path(P: dict, cache: Path, shape: bool) -> Path:
    return cache / f"vl-teacher-{cache_key(_teacher_cfg(P, shape))}.safetensors"


def teachers(P: dict, cache: Path) -> dict:
    """The CLIP-style teachers (with / without shape captions) and MaKD's aspect CNN,
    trained with seed 0 or loaded from ``cache``."""
    cache = Path(cache)
    t0 = time.time()
    tc = text_cache(P, cache)
    out = {"minilm_texts": {"n": len(tc), "seconds": time.time() - t0}}
    for shape in (True, False):
        path = _teacher_path(P, cache, shape)
        name = "vl-teacher" if shape else "vl-teacher-plain"
        if path.exists():
            out[name] = json.loads(path.with_suffix(".json").read_text())
        else:
            out[name] = _train_teacher(P, cache, shape, tc, path)
    out["aspect-teacher"] = aspect_teacher(P, cache)[1]
    return out


def load_teacher(P: dict, cache: Path, shape: bool = True):
    key = ("teacher", str(_teacher_path(P, cache, shape)))

    def make():
        path = _teacher_path(P, cache, shape)
        if not path.exists():
            raise cd.errors.ConfigError("cache", str(path), "the block's teachers() run first")
        m = _dual(P, text_cache(P, cache, encode=False), 0)
        m.load_state_dict(load_weights(path))
        m.eval().requires_grad_(False)
        return m, json.loads(path.with_suffix(".json").read_text())

    return _memo(key, make)


# -- MaKD's aspect teacher -----------------------------------------------------------------------
def aspect_data(P: dict, split: str, limit=None):
    """A plain split with its measured aspects (cut points from the train split)."""
    from crossdistill.data.digit_aspects import aspect_cuts, aspects, measure_shapes

    def make():
        d = plain_split(P, split, limit=limit)
        tr = plain_split(P, "train")
        raw = lambda s: s.x * s.info["std"] + s.info["mean"]  # noqa: E731
        cuts = _memo(("cuts", P["images"], json.dumps(P.get("limit"), default=str)),
                     lambda: aspect_cuts(measure_shapes(raw(tr))))
        t = dict(d.tensors)
        t["aspects"] = aspects(measure_shapes(raw(d)), cuts)
        return cd.data.Dataset(t, {**d.kinds, "aspects": "value"}, name=d.name, split=split,
                               num_classes=10, info=d.info)

    return _memo(("aspects", split, limit, json.dumps(P.get("limit"), default=str)), make)


def aspect_teacher(P: dict, cache: Path):
    """The aspect CNN ("the MLLM"): BCE on the measured aspects of the whole train split,
    Adam, seed 0; (model, meta)."""
    from crossdistill.data.digit_aspects import ASPECTS
    from crossdistill.registry import LOSSES

    M = P["makd"]
    cfg = dict(kind="aspect-teacher", images=P["images"], limit=P.get("limit"),
               channels=M["teacher_channels"], epochs=M["teacher_epochs"], v=CACHE_VERSION)
    path = Path(cache) / f"vl-aspects-{cache_key(cfg)}.safetensors"
    torch.manual_seed(0)
    model = cd.models.create("cnn", num_classes=len(ASPECTS), in_channels=1,
                             img_size=28 if P["images"] == "mnist" else 8,
                             channels=tuple(M["teacher_channels"]))
    if path.exists():
        model.load_state_dict(load_weights(path))
        return model.eval(), json.loads(path.with_suffix(".json").read_text())
    t0 = time.time()
    tr, va = aspect_data(P, "train"), aspect_data(P, "val")
    bce = LOSSES.get("aspect_bce")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    big = 20.0  # logit of a hard 0/1 target: BCE to sigmoid(+-20) is BCE to the 0/1 label
    for _ in range(M["teacher_epochs"]):
        model.train()
        for ids in torch.randperm(len(tr), generator=g).split(64):
            loss = bce(model(tr["x"][ids]), (2 * tr["aspects"][ids] - 1) * big).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        agree = ((model(va["x"]) > 0).float() == va["aspects"]).float().mean(0)
    meta = {"seconds": time.time() - t0, "val_agreement": agree.mean().item(),
            "per_aspect": dict(zip(ASPECTS, agree.tolist()))}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(model.state_dict(), path)
    path.with_suffix(".json").write_text(json.dumps(meta))
    return model, meta


# -- cells ---------------------------------------------------------------------------------------
def run(method: str, seed: int, P: dict, cache: Path) -> dict:
    if method not in METHODS:
        raise cd.errors.ConfigError("method", method, f"one of {', '.join(METHODS)}")
    cache = Path(cache)
    if method.startswith("teacher"):
        return run_teacher(method, P, cache)
    if method.startswith("vlmood"):
        return run_vlmood(method, seed, P, cache)
    if method.startswith("sgva"):
        return run_sgva(method, seed, P, cache)
    return run_makd(method, seed, P, cache)


def run_teacher(method: str, P: dict, cache: Path) -> dict:
    _, meta = load_teacher(P, cache, shape=method != "teacher-plain")
    which = "attr" if method == "teacher-attr" else "names"
    return {"test_acc": meta[f"test_acc_{which}"], "val_acc": meta[f"val_acc_{which}"],
            "val_curve": meta["val_curve"],
            "epochs": len(meta["val_curve"]), "teacher_seconds": meta["seconds"]}


def run_vlmood(method: str, seed: int, P: dict, cache: Path) -> dict:
    from crossdistill.methods import build
    from crossdistill.methods.vlm_ood import TextClassifier, embedder

    V = P["vlmood"]
    tr, va, te = caption_data(P)
    dual, _ = load_teacher(P, cache)
    attr = method.endswith("-attr")
    seen = class_texts(P, tr.tokenizer, dual, SEEN, attr)
    unseen = class_texts(P, tr.tokenizer, dual, UNSEEN, attr)
    teacher = TextClassifier(copy.deepcopy(dual.image), seen, V["temperature"]).eval()
    torch.manual_seed(100 + seed)
    img = cd.models.create("cnn", num_classes=10, in_channels=1, img_size=tr["x"].shape[-1],
                           channels=tuple(V["channels"]))
    student = TextClassifier(embedder(img, P["teacher"]["dim"]), seen, V["temperature"])
    full = "-full" in method
    params = dict(k=V["k"], correct_only=V["correct_only"])
    if not full:
        params.update(vlalign_weight=0.0, mse_weight=0.0, im_cst_weight=0.0)
    recipe = build("vlm-ood", student, teacher, **params)
    io = {"inputs": ["x"]}
    d = cd.Distiller(student, teacher, recipe.terms, io=io, teacher_io=io, seed=seed)
    t = cd.Trainer(d, tr, va, **_kw(V, seed))
    res = t.fit()
    student.eval()
    student.set_texts(unseen)
    test = cd.evaluate(student, remap(te, UNSEEN))["acc"]
    return {"test_acc": test, "val_acc": res["best_val_acc"],
            "best_epoch": res["best_epoch"], "val_curve": _curve(t), "epochs": V["epochs"]}


def features(P: dict, cache: Path, split: str, classes, limit=None):
    """A plain split with ``x`` replaced by the frozen teacher's image embeddings (the tower
    is frozen, so SgVA's adapter trains on features computed once, as Tip-Adapter caches
    them)."""
    def make():
        dual, _ = load_teacher(P, cache)
        d = plain_split(P, split, classes, limit=limit)
        with torch.no_grad():
            f = torch.cat([dual.image(x) for x in d.x.split(512)])
        t = dict(d.tensors)
        t["x"] = f
        return cd.data.Dataset(t, {**d.kinds, "x": "value"}, name=d.name, split=split,
                               num_classes=d.num_classes, info=d.info)

    return _memo(("features", str(_teacher_path(P, cache, True)), split, str(classes), limit),
                 make)


def run_sgva(method: str, seed: int, P: dict, cache: Path) -> dict:
    from crossdistill.methods.vlm_ood import TextClassifier

    S = P["sgva"]
    tr_cap = caption_data(P)[0]
    dual, _ = load_teacher(P, cache)
    texts = class_texts(P, tr_cap.tokenizer, dual, UNSEEN, S["attr"])
    # the frozen image tower ran once (features()): both models start from its embeddings
    teacher = TextClassifier(torch.nn.Identity(), texts, S["temperature"]).eval()
    va = features(P, cache, "val", UNSEEN, limit=S["val_limit"])
    te = features(P, cache, "test", UNSEEN)
    if method == "sgva-zs":
        return {"test_acc": cd.evaluate(teacher, te)["acc"],
                "val_acc": cd.evaluate(teacher, va)["acc"], "val_curve": [], "epochs": 0}
    k = int(method.rsplit("-", 1)[1])
    tr = shots(features(P, cache, "train", UNSEEN), k, seed)
    if method.startswith("sgva-ce"):
        return _sgva_cell(S, seed, tr, va, te, texts, teacher, dict(
            supcon_weight=0.0, cross_modal_weight=0.0, kd_weight=0.0, ce_weight=1.0))
    # the implicit-KD weight (the paper's is not known) is chosen on val from kd_grid
    cells = [_sgva_cell(S, seed, tr, va, te, texts, teacher, {"kd_weight": w})
             for w in S["kd_grid"]]
    best = max(cells, key=lambda c: c["val_acc"])  # ties: the first (smallest) weight
    best["kd_val"] = {str(c["kd_weight"]): c["val_acc"] for c in cells}
    return best


def _sgva_cell(S, seed, tr, va, te, texts, teacher, weights) -> dict:
    from crossdistill.methods import build
    from crossdistill.methods.sgva import AdaptedClassifier, ChooseRatio

    torch.manual_seed(100 + seed)
    student = AdaptedClassifier(torch.nn.Identity(), texts, S["temperature"], S["ratio"])
    recipe = build("sgva-clip", student, teacher, **weights)
    io = {"inputs": ["x"]}
    d = cd.Distiller(student, teacher, recipe.terms, io=io, teacher_io=io, seed=seed)
    chooser = ChooseRatio(student, va)
    bs = min(S["batch_size"], len(tr))
    t = cd.Trainer(d, tr, va, te, callbacks=[chooser], **_kw({**S, "batch_size": bs}, seed))
    res = t.fit()
    return {"test_acc": res["test_acc"], "val_acc": res["best_val_acc"],
            "best_epoch": res["best_epoch"], "mix": float(student.mix),
            "kd_weight": weights.get("kd_weight", 1.0), "val_curve": _curve(t),
            "epochs": S["epochs"]}


def run_makd(method: str, seed: int, P: dict, cache: Path) -> dict:
    from crossdistill.data.digit_aspects import ASPECTS
    from crossdistill.methods import build
    from crossdistill.methods.makd import AspectHead

    M = P["makd"]
    full = plain_split(P, "train")
    g = torch.Generator().manual_seed(2000 + seed)
    per = max(1, M["labels"] // 10)
    ids = torch.cat([(full.y == c).nonzero().flatten()[torch.randperm(
        int((full.y == c).sum()), generator=g)[:per]] for c in range(10)]).sort().values
    tr = full.subset(ids)
    va = plain_split(P, "val", limit=M["val_limit"])
    te = plain_split(P, "test")
    torch.manual_seed(100 + seed)
    img = cd.models.create("cnn", num_classes=10, in_channels=1, img_size=tr["x"].shape[-1],
                           channels=tuple(M["channels"]))
    student = AspectHead(img, len(ASPECTS))
    teacher = aspect_teacher(P, cache)[0]
    if method == "makd-ce":
        recipe = build("makd", student, teacher, aspect_weight=0.0)
        teacher = None
    else:
        recipe = build("makd", student, teacher, aspect_weight=M["aspect_weight"])
    d = cd.Distiller(student, teacher, recipe.terms, seed=seed)
    t = cd.Trainer(d, tr, va, te, **_kw(M, seed, precise_bn=M.get("precise_bn", 0)))
    res = t.fit()
    return {"test_acc": res["test_acc"], "val_acc": res["best_val_acc"],
            "best_epoch": res["best_epoch"], "val_curve": _curve(t), "epochs": M["epochs"]}


def main(argv=None) -> int:
    import argparse
    import statistics

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="*")
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--cache", default="runs/cache/vl")
    a = ap.parse_args(argv)
    P = PROFILES["quick" if a.quick else "full"]
    seeds = a.seeds if a.seeds is not None else list(range(P["seeds"]))
    t0 = time.process_time()
    meta = teachers(P, Path(a.cache))
    print(json.dumps(meta, indent=1, default=str))
    print(f"teachers: {time.process_time() - t0:.1f} s CPU")
    for m in a.methods:
        t1 = time.process_time()
        rows = [run(m, s, P, Path(a.cache)) for s in seeds]
        accs = [r["test_acc"] for r in rows]
        sd = statistics.pstdev(accs) if len(accs) > 1 else 0.0
        tails = [r["val_curve"][-max(1, len(r["val_curve"]) // 5):] for r in rows
                 if r["val_curve"]]
        plateau = max((100 * (max(t) - min(t)) for t in tails), default=0.0)
        print(f"{m:18s} test {100 * statistics.mean(accs):6.2f} +- {100 * sd:4.2f}  val "
              f"{100 * statistics.mean(r['val_acc'] for r in rows):6.2f}  plateau "
              f"{plateau:4.2f} pts  {time.process_time() - t1:.1f} s")
    print(f"total: {time.process_time() - t0:.1f} s CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
