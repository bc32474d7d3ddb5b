"""Pair scoring: ROC AUC of a model's per-pair score against binary labels.

The model returns one score per pair as its logits (a cross-encoder's logit, a bi-encoder's
cosine: :mod:`crossdistill.models.cross_text`), or ``score`` selects it in the output. Scores
and labels of every labelled pair (``y`` of 0 / 1; ``-100`` = no label) are collected over the
split (``cat:`` sums, gathered under DDP) and scored by scikit-learn's ``roc_auc_score``: the
chance that a random positive pair outscores a random negative one, ties counting half.
"""

from __future__ import annotations

import torch

from ..adapters import select
from ..data.dataset import IGNORE_INDEX
from ..errors import ConfigError
from ..registry import TASKS
from .base import Task


def pair_auc(scores, labels) -> float:
    """ROC AUC of ``scores`` for binary ``labels`` (both classes needed)."""
    from sklearn.metrics import roc_auc_score

    y = torch.as_tensor(labels).reshape(-1).long()
    s = torch.as_tensor(scores).reshape(-1).double()
    if len(s) != len(y):
        raise ConfigError("task.score", tuple(s.shape), f"one score per pair ({len(y)})")
    if not ((y == 0) | (y == 1)).all():
        raise ConfigError("task.target", sorted(set(y.tolist()))[:5], "labels 0 / 1")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
        raise ConfigError("task.target", {"pairs": len(y), "positive": n_pos},
                          "pair AUC needs both positive and negative labelled pairs")
    return float(roc_auc_score(y.numpy(), s.numpy()))


@TASKS.register("pair_auc", description="sentence-pair scoring: ROC AUC of the pair score "
                "against 0/1 labels; selects on AUC")
class PairAUC(Task):
    name = "pair_auc"
    select, mode = "auc", "max"
    columns = (("auc", "pair AUC"),)

    def __init__(self, target: str = "y", inputs=None, score=None):
        self.target, self.score = target, score
        self.inputs = inputs if inputs is not None else ["pair_ids", "pair_mask", "pair_types"]

    def default_terms(self):
        return []

    def check_batch(self, batch) -> None:
        if self.target not in batch:
            raise ConfigError("task.target", self.target,
                              f"not a key of the batch; it has: {', '.join(sorted(batch))}")

    def update(self, sums, logits, batch, keep=None, out=None):
        s = logits if self.score is None else select(out, self.score, "task.score")
        y = batch[self.target]
        s = s.detach().float()
        if s.numel() != len(y):
            raise ConfigError("task.score", tuple(s.shape), f"one score per pair ({len(y)})")
        s = s.reshape(-1)
        ok = y != IGNORE_INDEX
        if keep is not None:
            ok = ok & keep.to(ok.device)
        for key, v in (("cat:score", s[ok]), ("cat:y", y[ok].float())):
            sums[key] = torch.cat([sums[key], v]) if key in sums else v

    def compute(self, sums):
        if "cat:y" not in sums or len(sums["cat:y"]) == 0:
            raise ConfigError("task.target", 0, "pair AUC needs labelled pairs (y of 0 / 1)")
        y, s = sums["cat:y"].cpu(), sums["cat:score"].cpu()
        return {"auc": pair_auc(s, y), "n": len(y), "positives": int(y.sum())}
