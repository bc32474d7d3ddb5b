"""Benchmark block ``transenc`` (issue 14): Trans-Encoder self- and mutual distillation.

Setting. Pairs of tiny Shakespeare turns (``crossdistill.data.paraphrase``, cut to their first
16 words; contiguous blocks of turns decide the split): a line vs its word-dropout (0.6) +
shuffle perturbation is a positive, a line vs another line (half random, half the turn that
answers it) a negative. The unsupervised train split's labels are hidden; the val split's
synthetic labels select every run's best epoch (the official code selects on a *gold* dev set
instead); the test split is read once per reported model.

- Bi-encoder: all-MiniLM-L6-v2, frozen (its sentence embeddings of every text computed once,
  cut to 32 tokens, cached by ``teachers``), with a trainable residual head that starts as the
  identity; the ``minilm`` row is the start point (no head). Its text->text retrieval
  (a turn -> the turn that answers it, ``shakespeare_turns`` test split, every second pair so
  that no query's own text is in the gallery) is reported as R@k.
- Cross-encoder: a 2-layer, 128-wide BERT over ``[CLS] a [SEP] b [SEP]`` with MiniLM's
  vocabulary, random init, its token-embedding table frozen (no MiniLM inheritance: sliced
  MiniLM weights learnt the pairs worse in our trials, see the report).
- Cycles (``trans_encoder_cycles``): bi -> cross (BCE on clamp(cos, 0, 1), both orders), then
  cross -> bi (MSE of cos on the cross-encoder's sigmoid), 3 cycles, each receiver restarted
  from its start weights (``--init_with_new_models``, as in the official scripts).
- Mutual: "two different PLMs" do not exist at this size, so the second pair is MiniLM fine-
  tuned differently: a second bi-encoder on the same frozen MiniLM with a linear head (the
  first has the residual MLP head) and a second cross-encoder of the same shape from another
  random init. Each hand-off labels with the mean of both teachers and trains both
  receivers; rows report the MLP-head bi-encoder and the first cross-encoder, the members
  comparable to the self rows. (Tried first: MiniLM's last-layer ``[CLS]`` state as the
  second bi-encoder, as good alone on val, but its cosines sit at 0.71-0.86 where the mean
  pooling's sit at 0.22-0.57, so the averaged labels were offset and the bi-encoder that
  regressed on them fell to 90.7 test AUC; and a MiniLM-inherited second cross-encoder,
  which learnt the pairs much worse, 0.77 val AUC.)
- Control ``minilm-centred``: MiniLM's embeddings minus their mean over the train texts (no
  labels, no teacher): removing the common direction alone raises MiniLM's pair AUC, and a
  trained head can learn it with its bias, so the distilled bi-encoders are also compared
  with it.

Schedules: cross-encoder 4 epochs per hand-off (the paper: 1 epoch of a much larger pair set),
batch 32, AdamW 1e-3, 10 % warm-up, cosine; bi-encoder head 10 epochs, batch 128, AdamW 3e-4.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path

import torch

import crossdistill as cd

BLOCK = "transenc"
SELF_ROWS = [f"self-c{c}-{k}" for c in (1, 2, 3) for k in ("cross", "bi")]
METHODS = ["minilm", "minilm-centred", *SELF_ROWS, "self-best-bi", "mutual-c3-cross",
           "mutual-c3-bi"]
BASELINE = None  # no supervised baseline: MiniLM is the (untrained) start point
METRIC = ("test_auc", "pair AUC", 100.0)
EXTRA = [("val_auc", "val AUC"), ("test_r@1", "R@1"), ("test_r@5", "R@5"),
         ("test_r@10", "R@10")]
VERSION = 3

_DATA = dict(drop=0.6, negatives="mixed", max_words=16, min_words=4, max_tokens=32, seed=0)
PROFILES = {
    "full": dict(
        seeds=3, data=_DATA, lines={"train": 500, "val": 300, "test": 500},
        retrieval_pairs=None, max_chars=None, cycles=3, mutual_cycles=3,
        cross=dict(layers=2, hidden=128, heads=4, dropout=0.0, inherit="none",
                   freeze_word_embeddings=True),
        cross2=dict(layers=2, hidden=128, heads=4, dropout=0.0, inherit="none",
                    freeze_word_embeddings=True),
        cross_fit=dict(epochs=4, batch_size=32, lr=1e-3, warmup_epochs=0.1),
        bi_fit=dict(epochs=10, batch_size=128, lr=3e-4),
        heads={"bi": "mlp", "bi2": "linear"}, views={"bi": "mean6", "bi2": "mean6"},
        init_with_new_models=True,
    ),
    "quick": dict(
        seeds=1, data=_DATA, lines={"train": 48, "val": 40, "test": 40},
        retrieval_pairs=60, max_chars=None, cycles=2, mutual_cycles=1,
        cross=dict(layers=2, hidden=64, heads=2, dropout=0.0, inherit="none",
                   freeze_word_embeddings=True),
        cross2=dict(layers=2, hidden=64, heads=2, dropout=0.0, inherit="none",
                    freeze_word_embeddings=True),
        cross_fit=dict(epochs=1, batch_size=32, lr=1e-3, warmup_epochs=0.1),
        bi_fit=dict(epochs=2, batch_size=128, lr=3e-4),
        heads={"bi": "mlp", "bi2": "linear"}, views={"bi": "mean6", "bi2": "mean6"},
        init_with_new_models=True,
    ),
}
CLAIMS = [
    dict(name="Trans-Encoder cross->bi", pairs=[("self-c1-bi", "minilm"),
                                               ("self-c2-bi", "self-c1-bi"),
                                               ("self-c3-bi", "self-c2-bi")],
         text="each cross -> bi hand-off improves the bi-encoder (pair AUC)", metric=None,
         higher=True),
    dict(name="Trans-Encoder bi->cross", pairs=[("self-c2-cross", "self-c1-cross"),
                                               ("self-c3-cross", "self-c2-cross")],
         text="each later bi -> cross hand-off improves the cross-encoder (pair AUC)",
         metric=None, higher=True),
    dict(name="Trans-Encoder cross > teacher", pairs=[("self-c1-cross", "minilm")],
         text="the cross-encoder surpasses the bi-encoder that labelled its pairs (paper)",
         metric=None, higher=True),
    dict(name="Trans-Encoder vs isotropy", pairs=[("self-c3-bi", "minilm-centred")],
         text="the distilled bi-encoder beats MiniLM with its mean removed (what a head's "
         "bias alone reaches)", metric=None, higher=True),
    dict(name="Trans-Encoder mutual", pairs=[("mutual-c3-bi", "self-c3-bi"),
                                            ("mutual-c3-cross", "self-c3-cross")],
         text="mutual > self distillation after the same cycles", metric=None, higher=True),
]


def _hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _register() -> None:
    """The block's modules (registrations), until the package __init__ files import them."""
    import crossdistill.data.paraphrase  # noqa: F401
    import crossdistill.losses.pairs  # noqa: F401
    import crossdistill.methods.trans_encoder  # noqa: F401
    import crossdistill.models.cross_text  # noqa: F401
    import crossdistill.tasks.pair_auc  # noqa: F401


# -- data and the frozen MiniLM features ----------------------------------------------------------
_MEMO: dict = {}


def _data_kw(P: dict) -> dict:
    return {**P["data"], "max_chars": P.get("max_chars")}


def _raw(P: dict) -> dict:
    """Token-level splits (no features): train one order (labels hidden) and both orders,
    val and test with their synthetic labels, and the turns test split for retrieval."""
    from crossdistill.data.paraphrase import paraphrase_dataset

    key = ("raw", _hash([P["lines"], _data_kw(P), P.get("retrieval_pairs")]))
    if key in _MEMO:
        return _MEMO[key]
    kw, n = _data_kw(P), P["lines"]
    out = {s: paraphrase_dataset(s, n_lines=n[s], hide_labels=s == "train", **kw)
           for s in ("train", "val", "test")}
    out["both"] = paraphrase_dataset("train", n_lines=n["train"], orders="both",
                                     hide_labels=True, **kw)
    turns = cd.data.load_split("shakespeare_turns", "test", max_tokens=kw["max_tokens"],
                               max_chars=kw["max_chars"])
    # every second pair: consecutive pairs share a turn (one's answer is the next one's
    # query), which would put each query's own text in the gallery
    keep = list(range(0, len(turns), 2))[:P.get("retrieval_pairs") or None]
    texts = {k: [v[i] for i in keep] for k, v in turns.texts.items()}
    turns = turns.subset(keep)
    turns.texts = texts
    out["turns"] = turns
    _MEMO[key] = out
    return out


def _texts(raw: dict) -> list[str]:
    seen = dict.fromkeys(t for d in raw.values() for side in d.texts.values() for t in side)
    return list(seen)


def _features(P: dict, cache: Path) -> tuple[dict, dict]:
    """({view: (N, 384)} MiniLM embeddings of every text of the block, meta), computed once
    and cached under ``cache`` by a hash of what defines them."""
    from crossdistill.io import load_weights, save_weights
    from crossdistill.models.cross_text import minilm_features

    raw = _raw(P)
    views = sorted(set(P["views"].values()))
    spec = dict(kind="minilm-features", lines=P["lines"], data=_data_kw(P), views=views,
                retrieval=P.get("retrieval_pairs"), v=VERSION)
    path = Path(cache) / f"vl-transenc-features-{_hash(spec)}.safetensors"
    key = ("features", str(path))
    if key in _MEMO:
        return _MEMO[key]
    texts = _texts(raw)
    if path.exists() and path.with_suffix(".json").exists():
        saved = json.loads(path.with_suffix(".json").read_text())
        if saved.get("texts") == texts:
            _MEMO[key] = (load_weights(path), {**saved["meta"], "cached": True})
            return _MEMO[key]
    t0, c0 = time.time(), time.process_time()
    feats = minilm_features(texts, max_tokens=P["data"]["max_tokens"], views=views)
    meta = {"texts_encoded": len(texts), "seconds": time.time() - t0,
            "cpu_seconds": time.process_time() - c0}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights({k: v.contiguous() for k, v in feats.items()}, path)
    path.with_suffix(".json").write_text(json.dumps({"texts": texts, "meta": meta}))
    _MEMO[key] = (feats, meta)
    return _MEMO[key]


def teachers(P: dict, cache: Path) -> dict:
    """The frozen MiniLM (the start bi-encoder and every bi-encoder's trunk): its sentence
    embeddings of every text, cached; its val / test scores. Returns {"minilm": meta}."""
    _register()
    _, meta = _features(P, cache)
    return {"minilm": {**meta, **{k: v for k, v in _start_row(P, cache).items()
                                  if k.startswith(("val_auc", "test_"))}}}


def splits(P: dict, cache: Path) -> dict:
    """Every split with the features of both bi-encoder views attached (``emb_*``,
    ``emb2_*``)."""
    from crossdistill.data.paraphrase import with_features

    key = ("splits", _hash([P["lines"], _data_kw(P), P["views"], P.get("retrieval_pairs")]))
    if key in _MEMO:
        return _MEMO[key]
    feats, _ = _features(P, cache)
    raw = _raw(P)
    where = {t: i for i, t in enumerate(_texts(raw))}

    def view(name):
        return lambda ts: feats[name][torch.tensor([where[t] for t in ts])]

    out = {}
    for s, d in raw.items():
        d = with_features(d, view(P["views"]["bi"]), "emb")
        out[s] = with_features(d, view(P["views"]["bi2"]), "emb2")
    _MEMO[key] = out
    return out


# -- models -----------------------------------------------------------------------------------
def _bi(P: dict, seed: int, head: str | None = None, member: str = "bi"):
    torch.manual_seed(200 + seed + (7 if member == "bi2" else 0))
    return cd.models.create("bi-encoder", trunk="features", head=head or P["heads"][member])


def _cross(P: dict, seed: int, which: str = "cross"):
    torch.manual_seed(100 + seed + (50 if which == "cross2" else 0))
    return cd.models.create("cross-encoder", **P[which])


BI_IO = {"bi": {"inputs": {"a": "emb_a", "b": "emb_b"}},
         "bi2": {"inputs": {"a": "emb2_a", "b": "emb2_b"}}}


def _scores(model, kind: str, member: str, D: dict) -> dict:
    """Test pair AUC (and, for a bi-encoder, turn -> next-turn R@k), read once."""
    io = model.io() if kind == "cross" else BI_IO[member]
    out = {"test_auc": cd.evaluate(model, D["test"], io=io, task="pair_auc")["auc"]}
    if kind == "bi":
        task = {"name": "retrieval", "query": "a", "gallery": "b", "ks": [1, 5, 10]}
        r = cd.evaluate(model, D["turns"], io=io, task=task)
        out.update({f"test_r@{k}": r[f"q2g_r@{k}"] for k in (1, 5, 10)})
    return out


def _start_row(P: dict, cache: Path, member: str = "bi", centred: bool = False) -> dict:
    """The untrained MiniLM; ``centred``: its embeddings minus their mean over the train
    texts (unlabelled), the isotropy control a learnt head's bias alone could reach."""
    D = splits(P, cache)
    model = _bi(P, 0, head="linear" if centred else "identity")
    if centred:
        tr = D["train"]
        mu = torch.cat([tr[f"{BI_IO[member]['inputs']['a']}"],
                        tr[f"{BI_IO[member]['inputs']['b']}"]]).mean(0)
        with torch.no_grad():
            model.head.bias.copy_(-mu)
    val = cd.evaluate(model, D["val"], io=BI_IO[member], task="pair_auc")["auc"]
    return {"val_auc": val, **_scores(model, "bi", member, D), "val_curve": [], "epochs": 0}


def chain(variant: str, seed: int, P: dict, cache: Path) -> dict:
    """Every hand-off of one run of the cycles (``self`` or ``mutual``) with its test scores,
    cached on disk: the block's rows of one seed share it."""
    from crossdistill.methods.trans_encoder import trans_encoder_cycles

    spec = dict(variant=variant, seed=seed, v=VERSION,
                P={k: P[k] for k in P if k != "seeds"})
    path = Path(cache) / f"vl-transenc-{variant}-s{seed}-{_hash(spec)}.json"
    if path.exists():
        return json.loads(path.read_text())
    D = splits(P, cache)
    mutual = variant == "mutual"
    bi = {"bi": _bi(P, seed)}
    cross = {"cross": _cross(P, seed)}
    if mutual:
        bi["bi2"], cross["cross2"] = _bi(P, seed, member="bi2"), _cross(P, seed, "cross2")
    cross_io = {n: m.io() for n, m in cross.items()}
    t0, c0 = time.time(), time.process_time()
    hand = trans_encoder_cycles(
        bi, cross, D["train"], D["val"], train_cross=D["both"],
        cycles=P["mutual_cycles"] if mutual else P["cycles"],
        bi_io={n: BI_IO[n] for n in bi}, cross_io=cross_io,
        init_with_new_models=P["init_with_new_models"], cross_fit=P["cross_fit"],
        bi_fit=P["bi_fit"], seed=seed)
    rows = {}
    for h in hand:
        kind = "cross" if h.direction == "bi2cross" else "bi"
        for name, model in h.models.items():
            rows[f"c{h.cycle}-{name}"] = {
                "val_auc": h.val_auc[name], "val_curve": h.val_curve[name],
                "epochs": len(h.val_curve[name]), "seconds": h.seconds,
                **_scores(model, kind, name, D)}
    out = {"rows": rows, "seconds": time.time() - t0, "cpu_seconds": time.process_time() - c0}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    return out


def run(method: str, seed: int, P: dict, cache: Path) -> dict:
    """One row of the table for ``seed`` (module docstring)."""
    _register()
    if method not in METHODS:
        from crossdistill.errors import ConfigError

        raise ConfigError("bench.method", method, f"one of {', '.join(METHODS)}")
    if method in ("minilm", "minilm-centred"):
        return _start_row(P, cache, centred=method == "minilm-centred")
    variant, rest = method.split("-", 1)
    rows = chain(variant, seed, P, cache)["rows"]
    if rest == "best-bi":  # the official final pick: the cycle whose bi-encoder is best on val
        cands = [r for k, r in rows.items() if k.endswith("-bi")]
        return dict(max(cands, key=lambda r: r["val_auc"]))
    cycle, kind = rest.split("-")
    if variant == "mutual" and cycle == "c3":
        cycle = f"c{P['mutual_cycles']}"
    if variant == "self" and int(cycle[1:]) > P["cycles"]:
        cycle = f"c{P['cycles']}"  # the quick profile runs fewer cycles: its last one
    return dict(rows[f"{cycle}-{kind}"])


def main(profile: str = "quick", cache: str = "runs/cache/bench") -> dict:
    """Run the whole block (for measuring its budget): {method: [row per seed]}."""
    P, out = copy.deepcopy(PROFILES[profile]), {}
    t0, c0 = time.time(), time.process_time()
    out["_teachers"] = teachers(P, Path(cache))
    for m in METHODS:
        out[m] = [run(m, s, P, Path(cache)) for s in range(P["seeds"])]
        vals = [r["test_auc"] for r in out[m]]
        print(f"{m:18s} test AUC {sum(vals) / len(vals):.4f}  {[round(v, 4) for v in vals]}",
              flush=True)
    out["_seconds"] = {"wall": time.time() - t0, "cpu": time.process_time() - c0}
    print(out["_seconds"])
    return out


if __name__ == "__main__":
    import sys

    main(*sys.argv[1:])
