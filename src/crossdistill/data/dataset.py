"""In-memory datasets: dicts of named tensors with declared kinds, and a seeded batcher.

A :class:`Dataset` holds one tensor per key (first dimension = samples) and a *kind* per
key: ``image``, ``label``, ``label_map``, ``tokens``, ``mask``, ``audio``, ``boxes``, ``id``
or ``value``. Kinds tell the pipeline what a key is: random spatial transforms move every
``image``, ``label_map`` and spatial ``mask`` key together, and a label map must match its
image's size. Image classification is the two-key case ``{"x": image, "y": label}``.

Batches are tensor slices rather than per-sample collation: fast on CPU, and the order of
every epoch is a pure function of (seed, epoch), which makes resuming mid-epoch exact and
sharding across DDP ranks trivial. Data that does not fit in memory goes through
:mod:`crossdistill.data.loaders` instead (same epoch/resume contract).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch

from ..errors import ConfigError
from .augment import augment_batch

IGNORE_INDEX = -100  # targets to leave out (unlabelled samples, padding, void pixels)
KINDS = ("image", "label", "label_map", "tokens", "mask", "audio", "boxes", "id", "value")
SPATIAL = ("image", "label_map", "mask")  # kinds a random shift/flip moves jointly


def guess_kind(key: str, t: torch.Tensor) -> str:
    """A sensible kind for an undeclared key (declare kinds to be explicit)."""
    if key == "idx":
        return "id"
    if key in ("y", "label", "labels") and t.dim() == 1:
        return "label"
    if (
        key in ("y", "label", "labels", "mask", "seg")
        and t.dim() == 3
        and not t.is_floating_point()
    ):
        return "label_map"
    if "mask" in key:
        return "mask"
    if key in ("input_ids", "tokens"):
        return "tokens"
    if key == "audio":
        return "audio"
    if t.dim() == 4 and t.is_floating_point():
        return "image"
    return "value"


class Dataset:
    """Tensors of one split, by key, with kinds. ``idx`` holds the sample ids (stable across
    splits and runs; made as 0..N-1 when not given); label ``-100`` marks an unlabelled
    sample or an ignored position (PyTorch's and Hugging Face's ignore index)."""

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        kinds: Mapping[str, str] | None = None,
        *,
        name: str = "data",
        split: str = "train",
        num_classes: int | None = None,
        info: dict | None = None,
    ):
        tensors = {k: torch.as_tensor(v) for k, v in tensors.items()}
        if not tensors:
            raise ConfigError("data", {}, "a dataset needs at least one tensor")
        n = len(next(iter(tensors.values())))
        for k, v in tensors.items():
            if v.dim() == 0 or len(v) != n:
                raise ConfigError(
                    f"data.{k}", tuple(v.shape), f"every key needs {n} samples on dim 0"
                )
        tensors.setdefault("idx", torch.arange(n))
        kinds = dict(kinds or {})
        for k, kind in kinds.items():
            if k not in tensors:
                raise ConfigError(
                    f"data.kinds.{k}", kind, f"no such key; keys: {', '.join(tensors)}"
                )
            if kind not in KINDS:
                raise ConfigError(f"data.kinds.{k}", kind, f"allowed: {', '.join(KINDS)}")
        self.tensors = tensors
        self.kinds = {k: kinds.get(k) or guess_kind(k, v) for k, v in tensors.items()}
        self.name, self.split, self.info = name, split, dict(info or {})
        self.num_classes = num_classes if num_classes is not None else 10
        self._check_spatial()

    @classmethod
    def classification(cls, x, y, idx=None, name="data", split="train", num_classes=10, info=None):
        """The image-classification layout: ``{"x": images, "y": labels, "idx": ids}``."""
        t = {"x": x, "y": y} if idx is None else {"x": x, "y": y, "idx": idx}
        return cls(
            t,
            {"x": "image", "y": "label"},
            name=name,
            split=split,
            num_classes=num_classes,
            info=info,
        )

    def _check_spatial(self) -> None:
        images = [k for k, kd in self.kinds.items() if kd == "image"]
        if not images:
            return
        hw = tuple(self.tensors[images[0]].shape[-2:])
        for k, kd in self.kinds.items():
            if kd in ("label_map", "mask") and self.tensors[k].dim() >= 3:
                if tuple(self.tensors[k].shape[-2:]) != hw:
                    raise ConfigError(
                        f"data.{k}",
                        tuple(self.tensors[k].shape[1:]),
                        f"a {kd} must have its image's size {hw} "
                        f"(image key {images[0]!r} is {tuple(self.tensors[images[0]].shape[1:])})",
                    )

    # -- the classification view and generic access ---------------------------------------
    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    @property
    def x(self) -> torch.Tensor:
        return self.tensors["x"]

    @property
    def y(self) -> torch.Tensor:
        return self.tensors["y"]

    @property
    def idx(self) -> torch.Tensor:
        return self.tensors["idx"]

    def __len__(self) -> int:
        return len(self.tensors["idx"])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Per-sample shape of ``x`` (or of the first image key)."""
        key = (
            "x"
            if "x" in self.tensors
            else next(
                (k for k, kd in self.kinds.items() if kd == "image"), next(iter(self.tensors))
            )
        )
        return tuple(self.tensors[key].shape[1:])

    @property
    def spatial_keys(self) -> list[str]:
        return [k for k, kd in self.kinds.items() if kd in SPATIAL and self.tensors[k].dim() >= 3]

    def batch(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v[ids] for k, v in self.tensors.items()}

    def subset(self, ids) -> Dataset:
        ids = torch.as_tensor(ids, dtype=torch.long)
        return Dataset(
            {k: v[ids] for k, v in self.tensors.items()},
            self.kinds,
            name=self.name,
            split=self.split,
            num_classes=self.num_classes,
            info=dict(self.info),
        )

    def fingerprint(self) -> str:
        """Content hash of the split (every key), for caches and stores. The classification
        layout hashes ids, labels and pixels in that order (stable across versions)."""
        import hashlib

        h = hashlib.sha256()
        order = (
            ["idx", "y", "x"] if set(self.tensors) == {"idx", "y", "x"} else sorted(self.tensors)
        )
        for k in order:
            h.update(self.tensors[k].contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        keys = ", ".join(
            f"{k}: {self.kinds[k]} {tuple(v.shape[1:])}" for k, v in self.tensors.items()
        )
        return f"Dataset({self.name}/{self.split}, n={len(self)}, {keys})"


class Batches:
    """Seeded mini-batches over a :class:`Dataset`.

    ``epoch(e)`` yields the batches of epoch ``e``; ``start`` skips the first batches (resume).
    With ``world > 1`` each rank takes every ``world``-th sample of the shared permutation.
    Random shifts/flips move every spatial key of a batch together (see ``augment_batch``).
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
        return epoch_order(len(self.data), epoch, self.seed, self.shuffle, self.rank, self.world)

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
                augment_batch(batch, self.data.kinds, shift=self.shift, flip=self.flip, gen=g)
            yield batch

    def __iter__(self):
        return self.epoch(0)


def epoch_order(n: int, epoch: int, seed: int, shuffle: bool, rank: int = 0, world: int = 1):
    """The sample order of one epoch on one rank: a pure function of its arguments."""
    if not shuffle:
        order = torch.arange(n)
    else:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=g)
    if world > 1:
        per = math.ceil(n / world)
        order = torch.cat([order, order[: per * world - n]])  # pad like DistributedSampler
        order = order[rank::world]
    return order
