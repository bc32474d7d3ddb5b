"""Sequence recognition: the error rate of greedy decoding (CER; here a digit error rate).

``cer = sum of edit distances (hypothesis vs reference) / sum of reference lengths`` over
the split, lower is better; ``ser`` is the share of strings not exactly right; ``loss`` the
teacher-forced token CE. The hypothesis is the model output's ``pred`` (greedy tokens, see
:mod:`crossdistill.models.seq`), else the arg-max of the logits; both are cut at the first
EOS. References are the target rows (``labels``: symbols, EOS, -100) cut the same way.
Decoding happens only in evaluation, so nothing is reported on the training batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..adapters import select
from ..errors import ConfigError
from ..losses.libs import symbols
from ..registry import TASKS
from .base import Task, valid_targets


def edit_distance(a: list, b: list) -> int:
    """Levenshtein distance: the fewest insertions, deletions and substitutions turning
    ``a`` into ``b`` (one row of the dynamic programme at a time)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, z in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != z)))
        prev = cur
    return prev[-1]


@TASKS.register("cer", description="greedy-decoding error rate (edit distance / length); "
                "selects on val cer")
class ErrorRate(Task):
    name = "cer"
    select, mode = "cer", "min"
    columns = (("cer", "error rate"), ("ser", "string error rate"), ("loss", "token CE"))

    def __init__(self, target: str = "labels", inputs=None, pred: str = "pred", eos: int = 10):
        if isinstance(eos, bool) or not isinstance(eos, int) or eos < 0:
            raise ConfigError("task.eos", eos, "the end-of-string token id (an int >= 0)")
        self.target, self.pred, self.eos = target, pred, eos
        self.inputs = (
            inputs if inputs is not None
            else {"x": "video", "lengths": "video_len", "labels": "labels"}
        )

    def check_batch(self, batch) -> None:
        if self.target not in batch:
            raise ConfigError("task.target", self.target, f"batch keys: {', '.join(sorted(batch))}")

    def _hypotheses(self, logits, out) -> torch.Tensor:
        if isinstance(out, dict) and self.pred in out:
            return select(out, self.pred, f"task.pred {self.pred!r}")
        return logits.argmax(-1)

    def update(self, sums, logits, batch, keep=None, out=None):
        y = batch[self.target].to(logits.device)
        ok = valid_targets(y, keep)
        z = logits.detach().float()
        if z.shape[:-1] == y.shape:
            nll = F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1).clamp_min(0),
                                  reduction="none").view_as(y)
            self.add(sums, "nll", (nll * ok).sum().double())
            self.add(sums, "tokens", ok.sum().double())
        hyp = self._hypotheses(z, out).detach().cpu().tolist()
        rows = range(len(y)) if keep is None else keep.nonzero().flatten().tolist()
        refs = y.cpu().tolist()
        edits = ref_len = wrong = 0
        for b in rows:
            h, r = symbols(hyp[b], self.eos), symbols(refs[b], self.eos)
            d = edit_distance(h, r)
            edits, ref_len, wrong = edits + d, ref_len + len(r), wrong + (h != r)
        for k, v in (("edits", edits), ("ref_len", ref_len), ("wrong", wrong),
                     ("strings", len(rows))):
            self.add(sums, k, torch.tensor(float(v), dtype=torch.float64))

    def compute(self, sums):
        n = max(sums.get("strings", 0.0), 1.0)
        out = {
            "cer": sums.get("edits", 0.0) / max(sums.get("ref_len", 0.0), 1.0),
            "ser": sums.get("wrong", 0.0) / n,
            "n": int(sums.get("strings", 0.0)),
        }
        if sums.get("tokens"):
            out["loss"] = sums["nll"] / sums["tokens"]
        return out
