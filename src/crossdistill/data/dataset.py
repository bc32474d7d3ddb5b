"""In-memory datasets whose batches are dicts ``{"x", "y", "idx"}``, and a seeded batcher.

Everything here fits in memory at the sizes this library targets, so batches are tensor
slices rather than per-sample collation: fast on CPU, and the order of every epoch is a pure
function of (seed, epoch), which makes resuming mid-epoch exact and sharding across DDP ranks
trivial.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .augment import augment


@dataclass
class Dataset:
    """Tensors of one split. ``idx`` holds the sample ids (stable across splits and runs);
    ``y == -1`` marks an unlabelled sample (low-label / semi-supervised settings)."""

    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor
    name: str = "data"
    split: str = "train"
    num_classes: int = 10
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def batch(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"x": self.x[ids], "y": self.y[ids], "idx": self.idx[ids]}

    def subset(self, ids) -> Dataset:
        ids = torch.as_tensor(ids, dtype=torch.long)
        return Dataset(
            self.x[ids],
            self.y[ids],
            self.idx[ids],
            self.name,
            self.split,
            self.num_classes,
            dict(self.info),
        )

    def fingerprint(self) -> str:
        """Content hash of the split (ids, labels and pixels), for caches and stores."""
        import hashlib

        h = hashlib.sha256()
        for t in (self.idx, self.y, self.x):
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


class Batches:
    """Seeded mini-batches over a :class:`Dataset`.

    ``epoch(e)`` yields the batches of epoch ``e``; ``start`` skips the first batches (resume).
    With ``world > 1`` each rank takes every ``world``-th sample of the shared permutation.
    """

    def __init__(
        self,
        data: Dataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        shift: int = 0,
        flip: bool = False,
        rank: int = 0,
        world: int = 1,
    ):
        self.data, self.batch_size, self.shuffle, self.seed = data, batch_size, shuffle, seed
        self.drop_last, self.shift, self.flip = drop_last, shift, flip
        self.rank, self.world = rank, world

    def _order(self, epoch: int) -> torch.Tensor:
        n = len(self.data)
        if not self.shuffle:
            order = torch.arange(n)
        else:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(n, generator=g)
        if self.world > 1:
            per = math.ceil(n / self.world)
            order = torch.cat([order, order[: per * self.world - n]])  # pad like DistributedSampler
            order = order[self.rank :: self.world]
        return order

    def __len__(self) -> int:
        n = math.ceil(len(self.data) / self.world)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    @property
    def augmenting(self) -> bool:
        return self.shift > 0 or self.flip

    def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        order = self._order(epoch)
        for b in range(start, len(self)):
            ids = order[b * self.batch_size : (b + 1) * self.batch_size]
            batch = self.data.batch(ids)
            if self.augmenting:
                g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 10_007 + b)
                batch["x"] = augment(batch["x"], shift=self.shift, flip=self.flip, gen=g)
            yield batch

    def __iter__(self):
        return self.epoch(0)
