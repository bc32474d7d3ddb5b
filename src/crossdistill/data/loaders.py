"""Batches from any source, under one contract: ``epoch(e, start)`` yields dict batches of
epoch ``e`` from batch ``start`` on, and the order is a function of (seed, epoch), so a
resumed run continues exactly where it stopped.

* :class:`~crossdistill.data.Dataset` (in memory): tensor slicing, the fast path.
* a map-style ``torch.utils.data.Dataset`` or a Hugging Face ``datasets.Dataset`` whose
  items are dicts: our seeded order, read through a ``DataLoader`` (workers, streaming from
  disk; nothing is loaded whole).
* a user's ``DataLoader`` as it is (its sampler, workers and collate): each epoch's sampler
  randomness is drawn under a generator seeded by (seed, epoch), ``set_epoch`` is called when
  the sampler has it, and a resume skips the batches already done.
"""

from __future__ import annotations

import itertools

import torch
from torch.utils.data import DataLoader

from ..errors import ConfigError
from .augment import augment_batch
from .dataset import Batches, Dataset, epoch_order, guess_kind


def _as_batch(b) -> dict:
    if isinstance(b, dict):
        return {k: torch.as_tensor(v) for k, v in b.items()}
    if isinstance(b, (tuple, list)) and len(b) in (2, 3):  # (x, y[, idx]) convenience
        return dict(zip(("x", "y", "idx"), b))
    raise ConfigError("data", type(b).__name__, "batches must be dicts of tensors (or (x, y))")


def collate_dicts(samples: list) -> dict:
    """Stack dict samples key by key (HF rows of lists/ints become tensors)."""
    if not isinstance(samples[0], dict):
        raise ConfigError(
            "data", type(samples[0]).__name__, "dataset items must be dicts of named values"
        )
    return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in samples[0]}


class MapBatches(Batches):
    """Seeded batches over a map-style dataset with dict items (see the module docstring);
    the same order, length and augmentation rules as the in-memory :class:`Batches`."""

    def __init__(self, data, batch_size, *, num_workers=0, **kw):
        super().__init__(data, batch_size, **kw)
        self.num_workers = num_workers
        self.kinds = dict(getattr(data, "kinds", {}) or {})

    def epoch(self, epoch: int = 0, start: int = 0):
        order = epoch_order(len(self.data), epoch, self.seed, self.shuffle, self.rank, self.world)
        chunks = [
            order[b * self.batch_size : (b + 1) * self.batch_size].tolist()
            for b in range(start, len(self))
        ]
        loader = DataLoader(
            self.data, batch_sampler=chunks, collate_fn=collate_dicts, num_workers=self.num_workers
        )
        with torch.random.fork_rng(devices=[]):  # the iterator draws its base seed here:
            torch.manual_seed(self.seed * 100_003 + epoch)  # not from the training RNG
            it = iter(loader)
        for b, (ids, batch) in enumerate(zip(chunks, it), start=start):
            batch.setdefault("idx", torch.as_tensor(ids))
            if self.augmenting:
                kinds = {k: self.kinds.get(k) or guess_kind(k, v) for k, v in batch.items()}
                g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 10_007 + b)
                augment_batch(batch, kinds, shift=self.shift, flip=self.flip, gen=g)
            yield batch


class LoaderBatches:
    """A user's DataLoader, made resumable (see the module docstring)."""

    augmenting = False

    def __init__(self, loader: DataLoader, seed: int = 0):
        self.loader, self.seed = loader, seed

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int = 0, start: int = 0):
        sampler = getattr(self.loader, "batch_sampler", None)
        for s in (getattr(self.loader, "sampler", None), getattr(sampler, "sampler", None)):
            if hasattr(s, "set_epoch"):
                s.set_epoch(epoch)
        done = object()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 100_003 + epoch)
            it = iter(self.loader)  # workers draw their base seed here, samplers (lazily,
            first = next(it, done)  # e.g. RandomSampler) on the first batch: both seeded
        if first is done:
            return
        for b, batch in enumerate(itertools.chain([first], it)):
            if b >= start:
                yield _as_batch(batch)


def make_batches(data, batch_size: int, **kw):
    """The batcher for ``data`` (our Dataset, a map-style dataset, or a DataLoader)."""
    if isinstance(data, Dataset):
        kw.pop("num_workers", None)
        return Batches(data, batch_size, **kw)
    if isinstance(data, DataLoader):
        if kw.get("shift") or kw.get("flip"):
            raise ConfigError("data.augment", "shift/flip", "augment inside your own DataLoader")
        return LoaderBatches(data, kw.get("seed", 0))
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        return MapBatches(data, batch_size, **kw)
    raise ConfigError(
        "data",
        type(data).__name__,
        "a crossdistill Dataset, a map-style torch Dataset / HF datasets.Dataset, or a DataLoader",
    )


def eval_batches(data, batch_size: int, rank: int = 0, world: int = 1):
    """(batch, keep) over a whole split, sharded across ranks; ``keep`` drops the padding
    that equalises shard lengths (collective forwards such as FSDP's stay in step)."""
    if isinstance(data, DataLoader):
        for batch in data:
            yield _as_batch(batch), None
        return
    n = len(data)
    ids = epoch_order(n, 0, 0, False, rank, world)
    real = torch.arange(len(ids)) * world + rank < n
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        if isinstance(data, Dataset):
            batch = data.batch(chunk)
        else:
            batch = collate_dicts([data[int(i)] for i in chunk])
            batch.setdefault("idx", chunk)
        yield batch, real[start : start + batch_size]
