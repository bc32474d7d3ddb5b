"""Retrieval: recall@k in both directions over a gallery of paired embeddings.

The model's output holds two embeddings per sample (``query`` and ``gallery`` selectors: a
tuple index, dict key or attribute); sample i's query matches sample i's gallery item.
Embeddings are collected over the whole split (``cat:`` sums, gathered under DDP) and
scored by cosine similarity, or by the plain dot product (``similarity: dot``: a model whose
outputs already carry its metric, e.g. a learned bilinear one as ``(x, M y)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..adapters import select
from ..errors import ConfigError
from ..registry import TASKS
from .base import Task

SIMILARITIES = ("cosine", "dot")


def recall_at_k(q: torch.Tensor, g: torch.Tensor, ks=(1, 5, 10),
                similarity: str = "cosine") -> dict[str, float]:
    """Share of queries whose own gallery item (same row) is among the k most similar."""
    if len(g) < max(ks):
        raise ConfigError(
            "task.ks", max(ks), f"recall@k needs a gallery of >= k items (has {len(g)})"
        )
    if similarity not in SIMILARITIES:
        raise ConfigError("task.similarity", similarity, f"one of {', '.join(SIMILARITIES)}")
    if similarity == "dot":
        sim = q.float() @ g.float().T
    else:
        sim = F.normalize(q.float(), dim=-1) @ F.normalize(g.float(), dim=-1).T
    own = sim.diagonal()[:, None]
    rank = (sim > own).sum(1)  # items strictly more similar than the right one
    return {f"r@{k}": float((rank < k).float().mean()) for k in ks}


@TASKS.register("retrieval", description="recall@1/5/10 both ways; selects on mean recall")
class Retrieval(Task):
    name = "retrieval"
    select, mode = "mean_recall", "max"
    columns = (("q2g_r@1", "q->g R@1"), ("g2q_r@1", "g->q R@1"), ("mean_recall", "mean R"))

    def __init__(self, target: str = "idx", inputs=None, query=0, gallery=1, ks=(1, 5, 10),
                 similarity: str = "cosine"):
        self.target, self.query, self.gallery, self.ks = target, query, gallery, tuple(ks)
        if similarity not in SIMILARITIES:
            raise ConfigError("task.similarity", similarity, f"one of {', '.join(SIMILARITIES)}")
        self.similarity = similarity
        self.inputs = inputs if inputs is not None else ["x"]

    def default_terms(self):
        return []

    def check_split(self, data, name: str) -> None:
        if name == "train":  # only evaluation splits are ranked
            return
        n = len(data) if hasattr(data, "__len__") else None
        if n is not None and n < max(self.ks):
            raise ConfigError("task.ks", list(self.ks), f"k <= the {name} split's gallery of {n} "
                              "items (recall@k needs at least k candidates)")

    def update(self, sums, logits, batch, keep=None, out=None):
        src = out if out is not None else logits
        q = select(src, self.query, "task.query").detach().float()
        g = select(src, self.gallery, "task.gallery").detach().float()
        if keep is not None:
            q, g = q[keep.to(q.device)], g[keep.to(g.device)]
        for key, v in (("cat:query", q), ("cat:gallery", g)):
            sums[key] = torch.cat([sums[key], v]) if key in sums else v

    def compute(self, sums):
        q, g = sums["cat:query"], sums["cat:gallery"]
        sim = self.similarity
        out = {f"q2g_{k}": v for k, v in recall_at_k(q, g, self.ks, sim).items()}
        out.update({f"g2q_{k}": v for k, v in recall_at_k(g, q, self.ks, sim).items()})
        rs = [v for k, v in out.items()]
        out["mean_recall"] = sum(rs) / len(rs)
        out["n"] = len(q)
        return out
