"""Block ``peer`` of benchmarks/vl.py: embedding distillation of all-MiniLM-L6-v2, crossdistill
and sentence-transformers side by side (the optional ``peers`` extra).

The recipe is sentence-transformers' own model distillation: a student that keeps layers
0 and 3 of the 6-layer MiniLM (full width, mean pooling) is trained to the teacher's
(normalised) sentence embeddings with MSE, on the lines of tiny Shakespeare's train turns
(each pair gives its line and its answer: two columns, the loss the mean over both, as
sentence-transformers' ``MSELoss`` reduces columns). Both frameworks get the same
initial weights, teacher targets (computed once), batches of 64 pairs, AdamW (lr 1e-4,
weight decay 0.01), a cosine schedule without warm-up and 2 epochs; the last epoch is
kept (sentence-transformers' default: no selection). Both students are then scored by one
piece of code: text -> text retrieval on the test turns (a line -> its answer, R@1/5/10, over
every second pair: consecutive pairs share a turn),
and the human-judged tier (Lee documents Spearman, WordSim353, SimLex-999, polarity
linear probe) with MiniLM itself beside them.

Speed: the two trainings of a seed run back to back in one cell (one worker, one thread),
which gives both rows; ``speed`` is sentence-transformers' training seconds /
crossdistill's (>= 1: crossdistill is as fast or faster). Claim: quality within noise of
the peer, speed >= 1.0x.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import crossdistill as cd

BLOCK = "peer"
METHODS = ["teacher", "crossdistill"]  # the crossdistill cell also trains the peer
ROWS = ["teacher", "crossdistill", "sentence-transformers"]
COST = {"crossdistill": 520.0}  # both trainings of a seed (scheduled first)
BASELINE = None
METRIC = ("test_q2g_r@1", "line->answer R@1", 100.0)
EXTRA = [("test_q2g_r@10", "R@10"), ("lee", "Lee rho"), ("wordsim353", "WS353 rho"),
         ("simlex999", "SimLex rho"), ("polarity", "polarity acc"), ("test_mse", "test MSE x1e3"),
         ("train_seconds", "train s"), ("speed", "ST s / cd s")]
SCALES = {"lee": 1.0, "wordsim353": 1.0, "simlex999": 1.0, "test_mse": 1000.0,
          "train_seconds": 1.0, "speed": 1.0}
PROFILES = {
    "full": dict(limit=None, max_tokens=48, eval_tokens=128, epochs=2, batch_size=64, lr=1e-4,
                 weight_decay=0.01, layers=[0, 3]),
    "quick": dict(limit={"train": 256, "test": 200}, max_tokens=32, eval_tokens=64, epochs=1,
                  batch_size=64, lr=1e-4, weight_decay=0.01, layers=[0, 3]),
}
CLAIMS = [
    dict(name="peer quality", pairs=[("crossdistill", "sentence-transformers")], parity=True,
         text="crossdistill's embedding distillation is within noise of sentence-transformers' "
         "(line->answer R@1)"),
    dict(name="peer quality (Lee)", pairs=[("crossdistill", "sentence-transformers")],
         parity=True,
         metric="lee", text="... and on the human-judged Lee documents (Spearman)"),
]
_MEMO: dict = {}


class TextPair(nn.Module):
    """One text tower applied to both columns of a pair (a siamese bi-encoder)."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower
        self.query_out, self.gallery_out = nn.Identity(), nn.Identity()

    def forward(self, query_ids, query_mask, gallery_ids, gallery_mask):
        return (self.query_out(self.tower(query_ids, query_mask)),
                self.gallery_out(self.tower(gallery_ids, gallery_mask)))


IO = {"inputs": {"query_ids": "query_ids", "query_mask": "query_mask",
                 "gallery_ids": "gallery_ids", "gallery_mask": "gallery_mask"}}


def data(P: dict):
    if "data" not in _MEMO:
        lim = P["limit"] or {}
        out = []
        for s in ("train", "test"):
            d = cd.data.load_split("shakespeare_turns", s, tokenizer="minilm",
                                   max_tokens=P["max_tokens"])
            tok = d.tokenizer
            if lim.get(s):
                d = d.subset(torch.arange(lim[s]))
                d.texts = {k: v[:lim[s]] for k, v in _texts(s, P).items()}
            d.tokenizer = tok
            out.append(d)
        _MEMO["data"] = out
    return _MEMO["data"]


def _texts(split: str, P: dict):
    from crossdistill.data.turns import turn_pairs

    pairs = turn_pairs(split)
    return {"query": [a for a, _ in pairs], "gallery": [b for _, b in pairs]}


def texts(d, split: str, P: dict):
    t = getattr(d, "texts", None)
    return t if t and len(t["query"]) == len(d) else {
        k: v[:len(d)] for k, v in _texts(split, P).items()}


def minilm():
    if "minilm" not in _MEMO:
        from crossdistill.models.dual import minilm_tower

        _MEMO["minilm"] = minilm_tower().eval()
    return _MEMO["minilm"]


class Unit(nn.Module):
    """MiniLM's sentence embedding as sentence-transformers returns it (unit length)."""

    def __init__(self, tower):
        super().__init__()
        self.tower = tower

    def forward(self, ids, mask):
        return nn.functional.normalize(self.tower(ids, mask), dim=-1)


def text_cache(P: dict, cache: Path):
    """MiniLM's unit embedding of every train / test line, computed once (a frozen teacher
    is a fixed function of its tokens)."""
    from hetero import cache_key

    from crossdistill.text.embed_cache import TextEmbedCache

    path = cache / f"vl-peer-minilm-{cache_key([P['limit'], P['max_tokens']])}.safetensors"
    if "cache" in _MEMO:
        return _MEMO["cache"]
    if path.exists():
        c = TextEmbedCache.load(path, name="all-MiniLM-L6-v2 (unit)")
    else:
        c = TextEmbedCache(Unit(minilm()).requires_grad_(False), name="all-MiniLM-L6-v2 (unit)",
                           hidden=384)
        for d in data(P):
            for col in ("query", "gallery"):
                c.fill(d[f"{col}_ids"], d[f"{col}_mask"])
        c.encoder = None
        c.save(path)
    _MEMO["cache"] = c
    return c


def targets(P: dict, cache: Path):
    """The teacher's embeddings of the train and test pairs, ``(N, 2, 384)`` each."""
    c = text_cache(P, cache)
    return tuple(torch.stack([c.lookup(d[f"{col}_ids"], d[f"{col}_mask"])
                              for col in ("query", "gallery")], 1) for d in data(P))


def teachers(P: dict, cache: Path) -> dict:
    tr, te = targets(P, cache)
    return {"minilm_targets": {"train_lines": 2 * len(tr), "test_lines": 2 * len(te)}}


def student_bert(P: dict):
    """MiniLM's layers ``P['layers']`` at full width (sentence-transformers' recipe)."""
    from transformers import BertModel

    from crossdistill.methods.inherit import inherit_bert

    t = minilm().encoder
    cfg = t.config.__class__(**{**t.config.to_dict(), "num_hidden_layers": len(P["layers"])})
    s = BertModel(cfg, add_pooling_layer=False)
    inherit_bert(t, s, "interval_front" if P["layers"] == [0, 3] else "front")
    return s


def train_crossdistill(bert, P: dict, cache: Path, seed: int) -> float:
    from crossdistill.models.dual import TextTower
    from crossdistill.text.embed_cache import CachedTextTower

    tr, _ = data(P)
    model = TextPair(TextTower(bert))
    teacher = TextPair(CachedTextTower(text_cache(P, cache)))
    terms = [cd.Term("mse", student="query_out", teacher="query_out", weight=0.5, name="q"),
             cd.Term("mse", student="gallery_out", teacher="gallery_out", weight=0.5,
                     name="g")]
    d = cd.Distiller(model, teacher, terms, io=IO, teacher_io=IO, seed=seed,
                     task={"name": "retrieval", "inputs": list(IO["inputs"])})
    t0 = time.time()
    cd.Trainer(d, tr, None, epochs=P["epochs"], batch_size=P["batch_size"], lr=P["lr"],
               weight_decay=P["weight_decay"], optimizer="adamw", warmup_epochs=0,
               seed=seed, progress=False).fit()
    return time.time() - t0


def train_st(bert, P: dict, cache: Path, seed: int) -> float:
    import datasets
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MSELoss
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    tr, _ = data(P)
    tgt, _ = targets(P, cache)
    tx = texts(tr, "train", P)
    with tempfile.TemporaryDirectory() as tmp:
        bert.save_pretrained(tmp)
        tr.tokenizer.save_pretrained(tmp)
        word = Transformer(tmp, max_seq_length=P["max_tokens"])
        model = SentenceTransformer(modules=[word, Pooling(bert.config.hidden_size, "mean")],
                                    device="cpu")
    ds = datasets.Dataset.from_dict({"query": tx["query"], "gallery": tx["gallery"],
                                     "label": tgt.tolist()})
    with tempfile.TemporaryDirectory() as out:
        args = SentenceTransformerTrainingArguments(
            output_dir=out, num_train_epochs=P["epochs"],
            per_device_train_batch_size=P["batch_size"], learning_rate=P["lr"],
            weight_decay=P["weight_decay"], lr_scheduler_type="cosine", warmup_steps=0,
            seed=seed, save_strategy="no", report_to=[], logging_steps=10 ** 6,
            disable_tqdm=True, use_cpu=True, dataloader_num_workers=0)
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=ds,
                                             loss=MSELoss(model))
        t0 = time.time()
        trainer.train()
        seconds = time.time() - t0
    own = bert.state_dict()
    bert.load_state_dict({k: v for k, v in model[0].auto_model.state_dict().items()
                          if k in own})  # sentence-transformers adds an unused pooler
    return seconds


def score(tower, P: dict, cache: Path) -> dict:
    """One protocol for every encoder: test retrieval, test MSE to the teacher, judged tier."""
    from crossdistill.tasks.judged import judged_scores
    from crossdistill.tasks.retrieval import recall_at_k

    _, te = data(P)
    _, tgt = targets(P, cache)
    tower.eval()
    with torch.no_grad():
        q = torch.cat([tower(te["query_ids"][i:i + 256], te["query_mask"][i:i + 256])
                       for i in range(0, len(te), 256)])
        g = torch.cat([tower(te["gallery_ids"][i:i + 256], te["gallery_mask"][i:i + 256])
                       for i in range(0, len(te), 256)])
    # consecutive pairs share a turn (pair i's answer is pair i+1's line): every second
    # pair, so that no query's own text sits in the gallery
    out = {f"test_q2g_{k}": v for k, v in recall_at_k(q[::2], g[::2]).items()}
    out["test_mse"] = float(0.5 * (((q - tgt[:, 0]) ** 2).mean() + ((g - tgt[:, 1]) ** 2).mean()))
    tok = data(P)[0].tokenizer

    @torch.no_grad()
    def encode(strs):
        outs = []
        for i in range(0, len(strs), 128):
            enc = tok(strs[i:i + 128], padding=True, truncation=True,
                      max_length=P["eval_tokens"], return_tensors="pt")
            outs.append(tower(enc["input_ids"], enc["attention_mask"]))
        return torch.cat(outs)

    out.update(judged_scores(encode))
    return out


def run(method: str, seed: int, P: dict, cache: Path) -> dict:
    from crossdistill.models.dual import TextTower

    if method == "teacher":
        return score(Unit(minilm()), P, cache)
    if method != "crossdistill":
        raise KeyError(method)
    bert, peer = student_bert(P), student_bert(P)  # the same initial weights
    torch.manual_seed(seed)
    row = {"train_seconds": train_crossdistill(bert, P, cache, seed)}
    other = {"method": "sentence-transformers",
             "train_seconds": train_st(peer, P, cache, seed)}  # side by side, same worker
    row["speed"] = other["train_seconds"] / row["train_seconds"]
    row.update(score(TextTower(bert), P, cache))
    other.update(score(TextTower(peer), P, cache))
    row["also"] = [other]
    return row
