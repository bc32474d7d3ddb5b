"""Re-ranking: recall@k of a scorer over fixed candidate lists (a cross-encoder's retrieval).

A cross-encoder scores pairs, so searching a whole gallery costs one forward per pair; the
usual protocol (ViLT, ALBEF, METER) lets a cheap first-stage retriever propose ``K``
candidates per query and the cross-encoder re-rank them. Each evaluation sample is one
query's list: the model's output holds its (K,) candidate scores, ``pos`` says where the
true match is in the list (``-1``: the first stage missed it, a miss here too) and ``dir``
the direction (0: query -> gallery, reported as ``q2g_r@k``; 1: gallery -> query,
``g2q_r@k``), so the columns line up with the ``retrieval`` task's. A candidate ties with
the match only when scored strictly higher counts against it (as in ``retrieval``).
"""

from __future__ import annotations

import torch

from ..adapters import select
from ..errors import ConfigError
from ..registry import TASKS
from .base import Task


@TASKS.register("rerank", description="recall@1/5/10 of re-ranked candidate lists, both "
                "directions; selects on mean recall")
class Rerank(Task):
    name = "rerank"
    select, mode = "mean_recall", "max"
    columns = (("q2g_r@1", "q->g R@1"), ("g2q_r@1", "g->q R@1"), ("mean_recall", "mean R"))

    def __init__(self, target: str = "pos", direction: str = "dir", inputs=None, scores=None,
                 ks=(1, 5, 10)):
        self.target, self.direction, self.scores, self.ks = target, direction, scores, tuple(ks)
        self.inputs = inputs if inputs is not None else {"xa": "xa", "xb": "xb"}
        if not self.ks or not all(isinstance(k, int) and k >= 1 for k in self.ks):
            raise ConfigError("task.ks", ks, "positive integers")

    def default_terms(self):
        return []

    def update(self, sums, logits, batch, keep=None, out=None):
        z = (logits if self.scores is None else select(out, self.scores, "task.scores"))
        z = z.detach().float()
        for key in (self.target, self.direction):  # (training batches need not hold them)
            if key not in batch:
                raise ConfigError("task.target", key, "a key of the evaluation batch "
                                  f"(candidate lists: pos, dir); it has {', '.join(sorted(batch))}")
        pos, d = batch[self.target].to(z.device), batch[self.direction].to(z.device)
        if z.dim() != 2 or z.shape[0] != len(pos):
            raise ConfigError("task.scores", tuple(z.shape), f"(B, K) scores of {len(pos)} lists")
        if max(self.ks) > z.shape[1]:
            raise ConfigError("task.ks", max(self.ks),
                              f"recall@k needs lists of >= k candidates (has {z.shape[1]})")
        own = z.gather(1, pos.clamp_min(0)[:, None])
        rank = (z > own).sum(1)
        found = pos >= 0
        ok = torch.ones_like(found) if keep is None else keep.to(z.device)
        for name, which in (("q2g", 0), ("g2q", 1)):
            rows = ok & (d == which)
            self.add(sums, f"{name}_n", rows.sum(dtype=torch.float32))
            for k in self.ks:
                hits = rows & found & (rank < k)
                self.add(sums, f"{name}_r@{k}", hits.sum(dtype=torch.float32))

    def compute(self, sums):
        out = {}
        for name in ("q2g", "g2q"):
            n = float(sums.get(f"{name}_n", 0.0))
            for k in self.ks:
                out[f"{name}_r@{k}"] = float(sums.get(f"{name}_r@{k}", 0.0)) / max(n, 1.0)
        out["mean_recall"] = sum(out.values()) / len(out)
        out["n"] = int(sums.get("q2g_n", 0.0) + sums.get("g2q_n", 0.0))
        return out
