"""Visual question answering with short generated answers: exact-match answer accuracy.

Targets are the response tokens ``labels`` (``-100`` on the prompt and the padding; see
:mod:`crossdistill.data.digit_vqa`), aligned with the logits' positions. A sample's answer
is right when the argmax at *every* scored position equals its label, the answer's end token
included. Under teacher forcing this is exactly greedy decoding's exact match: if every
argmax along the gold prefix is the gold token, greedy decoding reproduces the gold answer
token by token and stops at the same end; if one is not, greedy decoding leaves the gold
answer at the first such position (``tests/test_llava_kd.py`` checks the two agree). Also:
token accuracy, the response tokens' mean CE, and per question kind (batch key ``qtype``,
names ``kinds``) the answer accuracy ``acc_<kind>``. Selects on val answer accuracy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..registry import TASKS
from .base import Task, valid_targets


@TASKS.register("vqa", description="exact-match answer accuracy of short generated answers "
                "(teacher-forced argmax = greedy decoding), token accuracy, response CE; "
                "selects on val answer accuracy")
class VQA(Task):
    name = "vqa"
    select, mode = "acc", "max"
    columns = (("acc", "answer accuracy"), ("token_acc", "token accuracy"), ("loss", "CE"))

    def __init__(self, target: str = "labels", inputs=None, kinds=None, kind_key: str = "qtype",
                 select: str = "acc"):
        if select not in ("acc", "token_acc", "loss"):
            raise ConfigError("task.select", select, "acc, token_acc or loss")
        self.target, self.kind_key = target, kind_key
        self.select, self.mode = select, "min" if select == "loss" else "max"
        self.inputs = inputs if inputs is not None else {"x": "x", "input_ids": "input_ids"}
        self.kinds = list(kinds) if kinds is not None else None

    def check_batch(self, batch) -> None:
        if self.target not in batch:
            raise ConfigError("task.target", self.target,
                              f"a key of the batch (keys: {', '.join(sorted(batch))})")
        if batch[self.target].dim() != 2:
            raise ConfigError("task.target", tuple(batch[self.target].shape),
                              "(B, T) response labels, -100 off the response")

    def loss_mask(self, batch):
        return batch[self.target] != -100

    def update(self, sums, logits, batch, keep=None, out=None):
        y = batch[self.target].to(logits.device)
        ok = valid_targets(y, keep)
        z = logits.detach().float()
        hit = (z.argmax(-1) == y) & ok
        scored = ok.any(-1)  # samples with a response (and kept)
        exact = (hit | ~ok).all(-1) & scored
        self.add(sums, "correct", exact.sum(dtype=torch.float32))
        self.add(sums, "samples", scored.sum(dtype=torch.float32))
        self.add(sums, "tok_correct", hit.sum(dtype=torch.float32))
        self.add(sums, "tokens", ok.sum(dtype=torch.float32))
        if keep is not None:  # evaluation: the response CE (training keeps its own loss sums)
            ce = F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1).clamp_min(0),
                                 reduction="none").view_as(y)
            self.add(sums, "nll", (ce * ok).sum())
        if self.kinds is not None and self.kind_key in batch:
            k = batch[self.kind_key].to(logits.device).long()
            n = len(self.kinds) + 1  # the last slot: anything else (a caption)
            k = k.clamp(0, n - 1)
            self.add(sums, "kind_correct", torch.zeros(n, device=z.device).index_add_(
                0, k, exact.float()))
            self.add(sums, "kind_samples", torch.zeros(n, device=z.device).index_add_(
                0, k, scored.float()))

    def compute(self, sums):
        n = max(float(sums.get("samples", 0.0)), 1.0)
        out = {"acc": float(sums.get("correct", 0.0)) / n,
               "token_acc": float(sums.get("tok_correct", 0.0)) / max(
                   float(sums.get("tokens", 0.0)), 1.0)}
        if "nll" in sums:
            out["loss"] = float(sums["nll"]) / max(float(sums.get("tokens", 0.0)), 1.0)
        if self.kinds is not None and "kind_samples" in sums:
            c, m = torch.as_tensor(sums["kind_correct"]), torch.as_tensor(sums["kind_samples"])
            for i, name in enumerate(self.kinds):
                if float(m[i]) > 0:
                    out[f"acc_{name}"] = float(c[i]) / float(m[i])
        out["n"] = int(sums.get("samples", 0.0))
        return out
