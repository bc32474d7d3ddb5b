"""Block ``tinyclip`` of benchmarks/vl.py: CLIP distillation on digit image-caption pairs.

Teacher (seed 0): a CNN image tower (32, 64 channels) + the frozen pretrained
all-MiniLM-L6-v2 text tower (its caption embeddings cached: a frozen tower is a fixed
function of the tokens) with trainable projections to 128 dims, trained with CLIP's
symmetric InfoNCE on sklearn digits with 3 captions per image (templates + attributes
measured on the image). Students: a CNN of 8, 16 channels + a 2-layer BERT of width 128 (4
heads of 32, MiniLM's vocabulary), projections to 128:

- ``clip``: contrastive training alone, no teacher;
- ``emb-mse``: feature KD, the MSE of each tower's embedding to the teacher's (what
  sentence-transformers' distillation does for one tower);
- ``affinity``: TinyCLIP's affinity mimicking (alpha = 1), random init;
- ``affinity-inherit``: the same with the text tower's weights inherited from MiniLM
  (layers 0 and 3, the leading 128 channels and 4 heads);
- ``affinity-auto``: automatic inheritance: MiniLM's layers 0 and 3 at full width, L0
  gates on heads and FFN channels pruned in two stages to 35 % and then 12 % of the gated
  weights (about the manual student's 11 %) over the first 30 % of training.

Metric: caption retrieval on the test split (image -> text and text -> image R@1/5/10, a
test image's captions averaged into one text embedding); the epoch is chosen on val mean
recall. Claims: affinity > feature KD (emb-mse) at equal budget; inherited weights converge
faster (epochs for the val mean recall to reach 90 % of the random-init run's best).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import crossdistill as cd
from crossdistill.io import load_weights, save_weights

BLOCK = "tinyclip"
METHODS = ["clip", "emb-mse", "affinity", "affinity-inherit", "affinity-auto"]
BASELINE = "clip"
COST = {"affinity-auto": 125.0, "clip": 55.0, "emb-mse": 55.0, "affinity": 55.0,
        "affinity-inherit": 55.0}
METRIC = ("test_mean_recall", "test mean R", 100.0)
EXTRA = [("test_q2g_r@1", "i->t R@1"), ("test_q2g_r@10", "i->t R@10"),
         ("test_g2q_r@1", "t->i R@1"), ("test_g2q_r@10", "t->i R@10"),
         ("epochs_to_90", "epochs to 90 %"), ("text_params_m", "text M params")]
SCALES = {"epochs_to_90": 1.0, "text_params_m": 1.0}
PROFILES = {
    "full": dict(images="digits", limit=None, max_tokens=32, teacher_epochs=40, epochs=40,
                 batch_size=64, lr=3e-3, dim=128, auto_targets=[0.35, 0.12],
                 auto_until=0.3),
    "quick": dict(images="digits", limit={"train": 300, "val": 120, "test": 120},
                  max_tokens=32, teacher_epochs=3, epochs=2, batch_size=64, lr=3e-3, dim=128,
                  auto_targets=[0.35, 0.12], auto_until=0.5),
}
CLAIMS = [
    dict(name="TinyCLIP (affinity)", pairs=[("affinity", "emb-mse"), ("affinity-inherit",
                                                                      "emb-mse")],
         text="affinity mimicking > feature-only distillation (embedding MSE), equal budget"),
    dict(name="TinyCLIP (inheritance)", pairs=[("affinity-inherit", "affinity")],
         metric="epochs_to_90", higher=False,
         text="inherited text weights converge faster than random init (fewer epochs to 90 % "
         "of the random-init run's best val)"),
]
_MEMO: dict = {}


def _key(P: dict, *names) -> str:
    from hetero import cache_key

    return cache_key({k: P[k] for k in names})


def data(P: dict):
    key = ("data", _key(P, "images", "limit", "max_tokens"))
    if key not in _MEMO:
        kw = dict(images=P["images"], tokenizer="minilm", max_tokens=P["max_tokens"])
        lim = P["limit"] or {}
        _MEMO[key] = [cd.data.load_split("digit_captions", s, limit=lim.get(s), **kw)
                      for s in ("train", "val", "test")]
    return _MEMO[key]


def minilm():
    if "minilm" not in _MEMO:
        from crossdistill.models.dual import minilm_tower

        _MEMO["minilm"] = minilm_tower()
    return _MEMO["minilm"]


def text_cache(P: dict, cache: Path):
    """MiniLM's embedding of every caption of every split (and the class prompts)."""
    from crossdistill.data.captions import class_prompts
    from crossdistill.text.embed_cache import TextEmbedCache

    path = cache / f"vl-minilm-captions-{_key(P, 'images', 'limit', 'max_tokens')}.safetensors"
    if ("text", path) in _MEMO:
        return _MEMO[("text", path)]
    splits = data(P)
    if path.exists():
        c = TextEmbedCache.load(path, name="all-MiniLM-L6-v2")
    else:
        c = TextEmbedCache(minilm(), name="all-MiniLM-L6-v2")
        for d in splits:
            c.fill(d["caption_ids"], d["caption_mask"])
        c.fill(*class_prompts(splits[0].tokenizer, range(10), P["max_tokens"]))
        c.encoder = None
        c.save(path)
    _MEMO[("text", path)] = c
    return c


def image_tower(channels, seed: int):
    torch.manual_seed(seed)
    return cd.models.create("cnn", num_classes=10, in_channels=1, img_size=8,
                            channels=tuple(channels))


def teacher_model(P: dict, cache: Path):
    from crossdistill.models.dual import DualEncoder
    from crossdistill.text.embed_cache import CachedTextTower

    torch.manual_seed(0)
    return DualEncoder(image_tower((32, 64), 0), CachedTextTower(text_cache(P, cache),
                                                                 P["dim"]), P["dim"])


def task_of(model) -> dict:
    return {"name": "retrieval", "inputs": list(model.io()["inputs"]), "ks": [1, 5, 10]}


def fit(model, teacher, terms, P, seed, epochs, hooks=()):
    io = model.io()
    d = cd.Distiller(model, teacher, terms, io=io, hooks=list(hooks),
                     teacher_io=teacher.io() if teacher is not None else None,
                     task=task_of(model), prepare=[{"name": "pick_caption"}], seed=seed)
    tr, va, te = data(P)
    t = cd.Trainer(d, tr, va, te, epochs=epochs, batch_size=P["batch_size"], lr=P["lr"],
                   optimizer="adamw", seed=seed, progress=False,
                   warmup_epochs=P.get("warmup_epochs", 0))
    res = t.fit()
    return d, res, [r["val_mean_recall"] for r in t.log.rows]


def teacher(P: dict, cache: Path, train: bool = True):
    """The CLIP-style teacher (cached): ``(model in eval mode, meta)``."""
    path = cache / f"vl-clip-teacher-{_key(P, 'images', 'limit', 'max_tokens', 'dim', 'teacher_epochs', 'lr', 'batch_size')}.safetensors"  # noqa: E501
    if ("teacher", path) in _MEMO:
        return _MEMO[("teacher", path)]
    m = teacher_model(P, cache)
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists():
        m.load_state_dict(load_weights(path))
        meta = json.loads(meta_path.read_text())
    elif not train:
        return None, None
    else:
        terms = [cd.Term("clip", student=[m.image_tap, m.text_tap], teacher=None)]
        _, res, curve = fit(m, None, terms, P, 0, P["teacher_epochs"])
        meta = {"test_mean_recall": res["test_mean_recall"],
                "best_val_mean_recall": res["best_val_mean_recall"],
                "zero_shot_test_acc": zero_shot_acc(m, P, cache), "val_curve": curve}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_weights(m.state_dict(), path)
        meta_path.write_text(json.dumps(meta))
    m.eval()
    _MEMO[("teacher", path)] = (m, meta)
    return m, meta


def zero_shot(m, P: dict):
    """The dual encoder as a 10-class classifier over "a handwritten <digit>" prompts."""
    from crossdistill.data.captions import class_prompts
    from crossdistill.models.dual import ZeroShotClassifier

    ids, mask = class_prompts(data(P)[0].tokenizer, range(10), P["max_tokens"])
    return ZeroShotClassifier(m, ids, mask, classes=range(10)).eval()


def zero_shot_acc(m, P: dict, cache: Path, split: int = 2) -> float:
    d = data(P)[split]
    with torch.no_grad():
        pred = zero_shot(m, P)(d["x"]).argmax(-1)
    return float((pred == d["y"]).float().mean())


def teachers(P: dict, cache: Path) -> dict:
    _, meta = teacher(P, cache)
    return {"clip_teacher": {k: v for k, v in meta.items() if k != "val_curve"}}


def student(P: dict, seed: int, width: int = 128, heads: int = 4):
    from crossdistill.models.dual import DualEncoder, bert_tower

    img = image_tower((8, 16), seed)
    torch.manual_seed(seed)
    text = bert_tower(n_layer=2, hidden=width, heads=heads, max_tokens=P["max_tokens"])
    return DualEncoder(img, text, P["dim"])


def epochs_to(curve: list[float], level: float) -> float:
    """1-based epoch at which ``curve`` first reaches ``level`` (never: ``len + 1``)."""
    for i, v in enumerate(curve):
        if v >= level:
            return float(i + 1)
    return float(len(curve) + 1)


def run(method: str, seed: int, P: dict, cache: Path) -> dict:
    from crossdistill.methods import build
    from crossdistill.methods.inherit import inherit_bert

    t, _ = teacher(P, cache, train=False)
    hooks = []
    if method == "affinity-auto":
        s = student(P, seed, width=384, heads=12)
        inherit_bert(minilm().encoder, s.text.encoder, "interval_front")
    else:
        s = student(P, seed)
    if method == "affinity-inherit":
        inherit_bert(minilm().encoder, s.text.encoder, "interval_front")
    if method == "clip":
        terms, t = [cd.Term("clip", student=[s.image_tap, s.text_tap], teacher=None)], None
    elif method == "emb-mse":
        terms = [cd.Term("mse", student=s.image_tap, teacher=t.image_tap, name="image_mse"),
                 cd.Term("mse", student=s.text_tap, teacher=t.text_tap, name="text_mse")]
    else:
        auto = method == "affinity-auto"
        r = build("tinyclip", s, t, inherit=False, auto=auto, targets=P["auto_targets"],
                  prune_until=P["auto_until"])
        terms, hooks = r.terms, r.hooks
    d, res, curve = fit(s, t, terms, P, seed, P["epochs"], hooks)
    enc = d.student.text.encoder
    row = {k: v for k, v in res.items() if k.startswith("test_")}
    row.update(val_curve=curve, epochs=len(curve), best_epoch=res["best_epoch"],
               text_params_m=sum(p.numel() for p in enc.parameters()) / 1e6,
               zero_shot_test_acc=zero_shot_acc(d.student, P, cache))
    return row


def notes(rows: list[dict], P: dict) -> str:
    """Fill ``epochs_to_90`` (needs every seed of the random-init affinity run) and say how
    it was measured."""
    ref = [max(r["val_curve"]) for r in rows if r["method"] == "affinity"]
    if not ref:
        return ""
    level = 0.9 * sum(ref) / len(ref)
    for r in rows:
        r["epochs_to_90"] = epochs_to(r["val_curve"], level)
    return (f"`epochs to 90 %`: the first epoch whose val mean recall reaches {100 * level:.1f} "
            "(90 % of the random-init affinity run's best, mean over seeds; a run that never "
            "reaches it counts as epochs + 1).")
