"""Block ``dho`` of benchmarks/vl.py: semi-supervised KD from a vision-language teacher.

Teacher: the ``tinyclip`` block's CLIP-style teacher (CNN image tower + frozen MiniLM text
tower, trained contrastively on digit captions) used zero-shot: logits ``cos(image,
"a handwritten <digit>") / 0.01`` over the ten class prompts. Student: a CNN of 8, 16
channels on sklearn digits with 10 or 100 labelled training images (stratified; the rest
of the 1,077 unlabelled) at 40 epochs:

- ``ce-<k>``: CE on the labelled images only;
- ``kd-<k>``: one head, ``0.5 * CE + 0.5 * T^2 KL`` (T = 2), KD on every image;
- ``dho-<k>``: DHO's two heads with the same losses, the test-time mix ``(a, b)`` chosen on
  val before every validation (so the best epoch is picked with its own mix).

Claim: DHO > single-head CE+KD with the same trunk and losses, at each label count.
"""

from __future__ import annotations

from pathlib import Path

import torch
import vl_tinyclip as TC

import crossdistill as cd

BLOCK = "dho"
LABELS = (10, 100)
METHODS = [f"{m}-{k}" for k in LABELS for m in ("ce", "kd", "dho")]
BASELINE = "kd-100"
METRIC = ("test_acc", "test acc", 100.0)
EXTRA = [("mix_a", "mix a"), ("mix_b", "mix b")]
SCALES = {"mix_a": 1.0, "mix_b": 1.0}
PROFILES = {
    "full": dict(clip=TC.PROFILES["full"], epochs=40, batch_size=64, lr=3e-3,
                 temperature=2.0, limit=None),
    "quick": dict(clip=TC.PROFILES["quick"], epochs=2, batch_size=64, lr=3e-3,
                  temperature=2.0, limit={"train": 300, "val": 120, "test": 120}),
}
CLAIMS = [dict(name="DHO", pairs=[(f"dho-{k}", f"kd-{k}") for k in LABELS],
               text="dual heads > single-head CE+KD with the same trunk and losses "
               f"(few labels: {', '.join(map(str, LABELS))})")]


def teachers(P: dict, cache: Path) -> dict:
    m, meta = TC.teacher(P["clip"], cache)
    return {"zero_shot_teacher": {"clip_test_mean_recall": meta["test_mean_recall"],
                                  "zero_shot_test_acc": meta["zero_shot_test_acc"],
                                  "zero_shot_val_acc": TC.zero_shot_acc(m, P["clip"], cache, 1)}}


def splits(P: dict, labels: int):
    """digits with ``labels`` labelled train images; the images are those the teacher saw
    in ``digit_captions`` (the same split and standardisation)."""
    lim = P["limit"] or {}
    out = []
    for s in ("train", "val", "test"):
        kw = {"labelled": labels} if s == "train" else {}
        out.append(cd.data.load("digits", s, limit=lim.get(s), **kw))
    ref = TC.data(P["clip"])[0]
    if P["limit"] is None and not torch.allclose(out[0].x, ref["x"], atol=1e-5):
        raise RuntimeError("digits and digit_captions disagree on the train images")
    return out


def cnn(seed: int):
    torch.manual_seed(seed)
    return cd.models.create("cnn", num_classes=10, in_channels=1, img_size=8, channels=(8, 16))


def run(method: str, seed: int, P: dict, cache: Path) -> dict:
    from crossdistill.methods import build
    from crossdistill.methods.dho import ChooseMix, DualHead

    arm, k = method.rsplit("-", 1)
    tr, va, te = splits(P, int(k))
    dual, _ = TC.teacher(P["clip"], cache, train=False)
    teacher = TC.zero_shot(dual, P["clip"])
    callbacks, row = [], {}
    if arm == "ce":
        s, t, terms = cnn(seed), None, [cd.Term("ce")]
    elif arm == "kd":
        s, t = cnn(seed), teacher
        terms = [cd.Term("ce", weight=0.5), cd.Term("kd", weight=0.5,
                                                    temperature=P["temperature"])]
    else:
        s, t = DualHead(cnn(seed)), teacher
        terms = build("dho", s, teacher, temperature=P["temperature"]).terms
        callbacks = [ChooseMix(s, va)]
    d = cd.Distiller(s, t, terms, seed=seed)
    tt = cd.Trainer(d, tr, va, te, epochs=P["epochs"], batch_size=P["batch_size"], lr=P["lr"],
                    optimizer="adamw", seed=seed, progress=False, callbacks=callbacks)
    res = tt.fit()
    if arm == "dho":
        row.update(mix_a=float(s.mix_a), mix_b=float(s.mix_b))
    row.update(test_acc=res["test_acc"], val_curve=[r["val_acc"] for r in tt.log.rows],
               epochs=P["epochs"], best_epoch=res["best_epoch"])
    return row
