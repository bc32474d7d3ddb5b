"""Language modelling: next-token CE, perplexity and bits per byte on held-out text.

Targets are aligned with positions (``labels[t]`` is the token after ``input_ids[t]``;
-100 = none), so nothing here shifts. Bits per byte divides the summed NLL (in bits) by the
UTF-8 bytes the scored tokens cover (batch key ``token_bytes``), which makes models with
different tokenizers comparable; perplexity is per token and only compares equal tokenizers.
"""

from __future__ import annotations

import math

import torch.nn.functional as F

from ..registry import TASKS
from .base import Task, valid_targets


@TASKS.register("lm", description="token CE, perplexity, bits per byte; selects on val bpb")
class LanguageModeling(Task):
    name = "lm"
    select, mode = "bpb", "min"
    columns = (("bpb", "bits/byte"), ("ppl", "perplexity"), ("loss", "token CE"))

    def __init__(self, target: str = "labels", inputs=None, bytes_key: str = "token_bytes"):
        self.target, self.bytes_key = target, bytes_key
        self.inputs = inputs if inputs is not None else {"input_ids": "input_ids"}

    def for_io(self, io):
        """A model reading its tokens from ``<prefix>input_ids`` (a teacher of a paired
        cross-tokenizer source reads ``teacher_input_ids``) is scored on its own
        ``<prefix>labels`` and ``<prefix>token_bytes``, so its bits per byte stay exact."""
        inputs = getattr(io, "inputs", None)
        key = inputs.get("input_ids") if isinstance(inputs, dict) else None
        if not key or key == "input_ids" or not key.endswith("input_ids"):
            return self
        prefix = key[: -len("input_ids")]
        return LanguageModeling(prefix + "labels", inputs, prefix + "token_bytes")

    def loss_mask(self, batch):
        return batch[self.target] != -100

    def update(self, sums, logits, batch, keep=None, out=None):
        y = batch[self.target].to(logits.device)
        ok = valid_targets(y, keep)
        z = logits.detach().float()
        nll = F.cross_entropy(
            z.reshape(-1, z.shape[-1]), y.reshape(-1).clamp_min(0), reduction="none"
        ).view_as(y)
        self.add(sums, "nll", (nll * ok).sum().double())
        self.add(sums, "tokens", ok.sum().double())
        if self.bytes_key in batch:
            nbytes = batch[self.bytes_key].to(logits.device)
            self.add(sums, "bytes", (nbytes * ok).sum().double())

    def compute(self, sums):
        tokens = max(sums.get("tokens", 0.0), 1.0)
        loss = sums.get("nll", 0.0) / tokens
        out = {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "n": int(sums.get("tokens", 0))}
        if sums.get("bytes"):
            out["bpb"] = sums["nll"] / math.log(2) / sums["bytes"]
        else:
            out["bpb"] = loss / math.log(2)  # no byte counts: bits per token
        return out
