"""Teacher signals that are not one tensor: a stored top-k distribution per position.

A top-k teacher store (``cache-teacher --topk K``) keeps, per position, the K largest logits,
their class ids and the logsumexp of all logits. :class:`TopK` carries the three to a sparse
loss unchanged (tap ``topk`` of a store), so the full ``(..., V)`` logits are never rebuilt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

TOPK = "topk"  # the store tap that yields a TopK
OBSERVED = "token_logprob"  # an ``observed`` store's one signal: log p(next token), float32
# taps only a teacher store has: the kind of store, made by the cache-teacher option shown
STORE_ONLY = {TOPK: "top-k teacher store (cache-teacher --topk K)",
              OBSERVED: "observed-token teacher store (cache-teacher --observed KEY)"}


@dataclass
class TopK:
    values: Tensor  # (..., k) the k largest logits
    indices: Tensor  # (..., k) their class ids (int64)
    lse: Tensor  # (...) logsumexp over all classes

    def to(self, device) -> TopK:
        return TopK(*(x.to(device, non_blocking=True) for x in (self.values, self.indices,
                                                                self.lse)))

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def log_probs(self) -> Tensor:
        """Log-probabilities of the k classes over the full vocabulary (T = 1)."""
        return self.values.float() - self.lse.float().unsqueeze(-1)

    def detach(self) -> TopK:
        return self
