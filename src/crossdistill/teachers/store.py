"""Teacher store: run a teacher once per sample id, read its signals back by ``batch["idx"]``.

Layout of a store directory::

    manifest.json              teacher-weights hash, inputs fingerprint, transform, dtype,
                               top-k settings, taps and their shapes, bytes per sample/token,
                               every shard's row count and SHA-256, and ``complete``
    shard-00000.safetensors    idx (int64) + one tensor per tap, rows in the same order

Logits are class-last with any leading dims: ``(B, K)`` per sample, ``(B, L, V)`` per token,
``(B, H, W, K)`` per pixel. They may be stored **top-k** over the last dim: the k largest
logits (fp16 values; indices uint8 / uint16 / int32, the smallest type that holds the
vocabulary) plus the logsumexp of all logits (fp16). Reconstruction rule (documented,
tested): the k stored classes keep their exact probabilities ``exp(z_i - lse)``; the remaining
mass ``m = 1 - sum_topk p_i`` is spread uniformly over the other ``C - k`` classes, whose
logits become ``lse + log(m / (C - k))``. At T = 1 the L1 error of the reconstructed
distribution is at most ``2 m`` (plus fp16 rounding); KD at other temperatures re-tempers
these logits.

Shards are memory-mapped, never loaded whole: a per-token store of a large vocabulary can be
far bigger than RAM, and a lookup reads only the rows of its batch (from the page cache).
Lookups return CPU tensors; the caller moves them next to the student.

Stored signals are only valid for the exact inputs the teacher saw, so a store made by
another teacher, dataset or transform is refused, naming what differs, and training refuses a
store together with random augmentation.

Integrity: on open every manifest field is checked (``manifest.py``), shard names must be
plain files of the store directory, and every shard header must match the manifest's keys,
dtypes and shapes. Each shard's bytes are hashed (SHA-256 against the manifest) and its values
checked finite before its first lookup, all at once on open when the store is at most
``EAGER_VERIFY_BYTES`` (so a damaged small store is refused before training starts). Hashes
cannot tell rows put in another order or a shard from another teacher whose hash was copied
too: with the teacher at hand, :meth:`TeacherStore.verify_against` runs it on a few seeded
samples and compares (``crossdistill train`` does when the config names the store's model
and checkpoint).
"""

from __future__ import annotations

import json
import struct
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..adapters import ModelIO
from ..data import Dataset
from ..errors import ConfigError
from ..signals import TOPK, TopK
from .fingerprint import inputs_fingerprint, transform_description
from .manifest import (
    FORMAT,
    LOGITS,
    MANIFEST,
    OBSERVED,
    RERUN,
    TOPK_KEYS,
    file_sha256,
    index_dtype,
    read_manifest,
    signal_dtypes,
)
from .writer import cache_teacher

__all__ = ["FORMAT", "TeacherStore", "cache_teacher", "index_dtype", "topk_decode"]

EAGER_VERIFY_BYTES = 256 << 20  # stores up to this size are hashed whole on open
_CHECK_PIECE_BYTES = 64 << 20  # values are checked in pieces of about this size
_FLOATS = ("F16", "BF16", "F32")

# safetensors dtype -> numpy dtype of the raw bytes (bf16 has no numpy type: read as 16 bits)
_NP_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.int16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "U16": np.uint16,
    "U32": np.uint32,
    "BOOL": np.bool_,
}


def topk_decode(
    vals: torch.Tensor, ids: torch.Tensor, lse: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Full ``(..., C)`` logits from top-k values/indices ``(..., k)`` and the logsumexp
    ``(...)`` (the rule above, on the last dim; any leading dims)."""
    vals, lse = vals.float(), lse.float().unsqueeze(-1)
    k = vals.shape[-1]
    mass = (1 - torch.exp(vals - lse).sum(-1, keepdim=True)).clamp_min(1e-8)
    rest = lse + torch.log(mass / max(num_classes - k, 1))
    out = rest.expand(*rest.shape[:-1], num_classes).clone()
    return out.scatter(-1, ids.long(), vals)


def _open_shard(path: Path, field: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Memory-map every tensor of one safetensors file: read only its header (8-byte
    little-endian length + JSON), then view the data bytes in place."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if 8 + n > size:
                raise ValueError(f"header length {n} past the end of the file ({size} bytes)")
            header = json.loads(f.read(n))
        buf = np.memmap(path, dtype=np.uint8, mode="r")
        arrays, dtypes = {}, {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if meta["dtype"] not in _NP_DTYPES:
                raise ValueError(f"unsupported dtype {meta['dtype']} of {name!r}")
            begin, end = (8 + n + o for o in meta["data_offsets"])
            if end > size:
                raise ValueError(f"tensor {name!r} runs past the end of the file (truncated?)")
            dt = np.dtype(_NP_DTYPES[meta["dtype"]])
            arrays[name] = buf[begin:end].view(dt).reshape(meta["shape"])
            dtypes[name] = meta["dtype"]
    except (
        OSError,
        struct.error,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        RecursionError,
    ) as err:
        raise ConfigError(field, str(path), f"not a readable safetensors shard ({err})") from None
    return arrays, dtypes


def _to_torch(a: np.ndarray, st_dtype: str) -> torch.Tensor:
    if st_dtype == "BF16":
        return torch.from_numpy(a).view(torch.bfloat16)
    if a.dtype.kind == "u" and a.dtype != np.uint8:  # few torch ops take uint16/uint32
        a = a.astype(np.int64)
    return torch.from_numpy(a)


def _first_bad_row(a: np.ndarray, st_dtype: str, classes: int | None) -> int | None:
    """The first row holding NaN/inf (float tensors) or a class id outside ``0..classes-1``
    (``classes`` given), read in pieces so a shard larger than memory can be checked."""
    if st_dtype not in _FLOATS and classes is None:
        return None
    step = max(1, _CHECK_PIECE_BYTES // max(1, a[:1].nbytes))
    for lo in range(0, len(a), step):
        x = np.asarray(a[lo : lo + step])
        x = x.reshape(len(x), -1)
        if classes is not None:
            bad = (x < 0) | (x >= classes)
        elif st_dtype == "BF16":  # all exponent bits set: inf or NaN
            bad = (x.view(np.uint16) & 0x7F80) == 0x7F80
        else:
            bad = ~np.isfinite(x)
        rows = np.flatnonzero(bad.any(1))
        if rows.size:
            return lo + int(rows[0])
    return None


class TeacherStore(nn.Module):
    """A read-only teacher: signals looked up by sample id. Holds no parameters or buffers.

    Pass it wherever a teacher goes (``Distiller(student, TeacherStore(path), terms)``);
    terms may only tap what was stored (``store.taps``). Shards stay memory-mapped, so
    ``.to(device)`` copies nothing and lookups return CPU tensors. ``verify``: hash every
    shard now (True), before each shard's first lookup (False), or now when the store is
    small (None, see ``EAGER_VERIFY_BYTES``).
    """

    is_store = True

    def __init__(
        self, path: str | Path, field: str = "teacher.store", *, verify: bool | None = None
    ):
        super().__init__()
        self.path, self.field = Path(path), field
        self.manifest = m = read_manifest(self.path, field)
        self._dtypes = signal_dtypes(m)
        self._arrays = [self._open(i) for i in range(len(m["shards"]))]
        self._verified = [False] * len(self._arrays)
        size = sum(self._shard_path(i).stat().st_size for i in range(len(self._arrays)))
        if verify or (verify is None and size <= EAGER_VERIFY_BYTES):
            self.verify()
        self._index()
        self._keys = [k for k in self._dtypes if k != "idx"]
        self.taps = list(m["taps"]) + ([TOPK] if m["topk"] else [])
        self.__dict__["source"] = None  # see attach_source (not a submodule: never saved)

    def attach_source(self, model: nn.Module) -> None:
        """The teacher model this store was checked against, for recipes that read the
        teacher's weights or config when they are built (BiStil's init from the teacher's
        layers); it is never run and is not part of the distiller's modules or state."""
        self.__dict__["source"] = model

    def _refuse(self, where, what: str) -> ConfigError:
        return ConfigError(self.field, str(where), f"{what}; {RERUN}")

    def _shard_path(self, i: int) -> Path:
        """Shard ``i``'s file, which must resolve to a file of the store directory itself."""
        p = self.path / self.manifest["shards"][i]
        if p.resolve().parent != self.path.resolve() or not p.is_file():
            raise self._refuse(p, "not a file of the store directory (a symlink out, or missing)")
        return p

    def _open(self, i: int) -> dict[str, np.ndarray]:
        p, rows = self._shard_path(i), self.manifest["shard_rows"][i]
        arrays, dtypes = _open_shard(p, self.field)
        if dtypes != self._dtypes:
            k = next(iter(sorted(set(dtypes.items()) ^ set(self._dtypes.items()))))
            raise self._refuse(p, f"its tensors differ from what {MANIFEST} describes (at {k})")
        for k, a in arrays.items():
            want = [rows, *self.manifest["shapes"][k]]
            if list(a.shape) != want:
                raise self._refuse(p, f"{k} has shape {list(a.shape)}, {MANIFEST} says {want}")
        return arrays

    def _verify_shard(self, s: int) -> None:
        m, p = self.manifest, self._shard_path(s)
        got, want = file_sha256(p), m["shard_sha256"][s]
        if got != want:
            raise self._refuse(
                p,
                f"content changed since it was written (sha256 {got[:12]}..., "
                f"{MANIFEST} records {want[:12]}...)",
            )
        for key, a in self._arrays[s].items():
            classes = m["num_classes"] if key == "logits.indices" else None
            row = _first_bad_row(a, self._dtypes[key], classes)
            if row is not None:
                what = "class ids out of range" if classes else "NaN or inf"
                sid = int(self._arrays[s]["idx"][row])
                raise self._refuse(p, f"{key} of sample id {sid} holds {what}")
        self._verified[s] = True

    def verify(self) -> None:
        """Hash and check every shard not checked yet (see the module docstring)."""
        for s, done in enumerate(self._verified):
            if not done:
                self._verify_shard(s)

    def _index(self) -> None:
        """Sorted sample ids and their global rows (shard order, then row): a lookup is a
        binary search, and no table is sized by the largest id (a damaged id cannot make one
        huge)."""
        all_ids = np.concatenate([np.asarray(a["idx"]) for a in self._arrays])
        order = np.argsort(all_ids, kind="stable")
        self._ids, self._rows = all_ids[order], order.astype(np.int64)
        dup = np.flatnonzero(np.diff(self._ids) == 0)
        if self._ids[0] < 0 or dup.size:
            what = "negative" if self._ids[0] < 0 else f"{self._ids[dup[0]]} stored twice"
            raise self._refuse(self.path, f"sample id {what} (damaged shard?)")
        self._offsets = np.cumsum([0, *self.manifest["shard_rows"]])

    @property
    def bytes_per_sample(self) -> int:
        return int(self.manifest["bytes_per_sample"])

    @property
    def bytes_per_token(self) -> float:
        return self.manifest["bytes_per_token"]

    @property
    def is_topk(self) -> bool:
        return bool(self.manifest["topk"])

    def check(self, *, teacher_hash: str | None = None, data: Dataset | None = None) -> None:
        """Refuse a store made by another teacher, dataset or transform, naming the difference."""
        m = self.manifest
        if teacher_hash is not None and teacher_hash != m["teacher_hash"]:
            raise ConfigError(
                self.field,
                str(self.path),
                f"made by another teacher: weights "
                f"hash {m['teacher_hash']} != {teacher_hash}; re-run cache-teacher",
            )
        if data is None:
            return
        name = f"{data.name}/{data.split}"
        want = transform_description(data)
        diff = [k for k in want if want[k] != m["transform"].get(k)]
        if diff:
            k = diff[0]
            what = {"tokenizer": "tokenizer", "block": "context length (data.params.block)"}
            raise ConfigError(
                self.field,
                str(self.path),
                f"made with another {what.get(k, 'transform')}: "
                f"{k}={m['transform'].get(k)!r}, this run has {want[k]!r}; {RERUN}",
            )
        if (self._find(data.idx.cpu().numpy()) < 0).any():
            raise ConfigError(
                self.field,
                str(self.path),
                f"made for another dataset: sample ids of {name} are missing from it",
            )
        lacking = [k for k in m["inputs"] if k not in data.tensors]
        if lacking:
            raise ConfigError(
                self.field, str(self.path), f"its teacher read {lacking[0]!r}, which {name} lacks"
            )
        fp = inputs_fingerprint(data, m["inputs"])
        if fp != m["data_fingerprint"]:
            raise ConfigError(
                self.field,
                str(self.path),
                f"made for other inputs: data fingerprint {m['data_fingerprint']} != {fp} of "
                f"{name} (sample ids + the teacher's input tensors); re-run cache-teacher",
            )

    @torch.no_grad()
    def verify_against(
        self, model: nn.Module, data: Dataset, io: ModelIO | None = None, n: int = 32
    ) -> None:
        """Run the live teacher on ``n`` seeded samples (spread over the store, plus one per
        shard for up to ``n`` shards) and refuse the store when its logits differ beyond
        storage rounding: catches reordered rows and another teacher's shard, which content
        hashes cannot. ``io`` defaults to how the store's teacher was called."""
        m = self.manifest
        io = io if io is not None else ModelIO(**m["io"], field=self.field)
        pos = self._spot_positions(data, n)
        if pos.size == 0:
            return
        batch = data.batch(torch.from_numpy(pos))
        dev = next(chain(model.parameters(), model.buffers()), torch.empty(0)).device
        was = model.training
        model.eval()
        try:
            z = io.check(io.call(model, {k: v.to(dev) for k, v in batch.items()}))
        finally:
            model.train(was)
        z, ids = z.float().cpu(), batch["idx"]
        if self.is_topk:
            vals, ind, lse = self.lookup_topk(ids)
            shape_ok = z.shape[:-1] == lse.shape and z.shape[-1] == m["num_classes"]
            pairs = [] if not shape_ok else [(vals, z.gather(-1, ind)), (lse, z.logsumexp(-1))]
            pairs = [(g, w.half().float()) for g, w in pairs]
            rtol = 1e-2
        elif m.get("observed"):  # one log-prob per position: recompute it from the logits
            from .writer import _observed_logprob

            got = self.lookup(ids, OBSERVED)
            target = batch[m["observed"]]
            shape_ok = target.shape == z.shape[:-1] and got.shape == target.shape
            pairs = [(got, _observed_logprob(z, target))] if shape_ok else []
            rtol = 1e-2
        else:
            got = self.lookup(ids, LOGITS)
            shape_ok = got.shape == z.shape
            pairs = [(got, z.to(getattr(torch, m["dtype"])).float())] if shape_ok else []
            rtol = 3e-2 if m["dtype"] == "bfloat16" else 1e-2
        if not shape_ok:
            raise self._refuse(
                self.path,
                f"the teacher's logits have per-sample shape {list(z.shape[1:])}, "
                f"the store's differ: made by another teacher",
            )
        bad = torch.zeros(len(ids), dtype=torch.bool)
        worst = torch.zeros(len(ids))
        for got, want in pairs:
            err = (got - want).abs()
            tol = rtol * (want.abs() + want.abs().mean())
            bad |= (err > tol).reshape(len(ids), -1).any(1)
            worst = torch.maximum(worst, err.reshape(len(ids), -1).amax(1))
        if bad.any():
            i = int(bad.nonzero()[0])
            raise self._refuse(
                self.path,
                f"stored logits do not match the teacher (model + checkpoint) on "
                f"{int(bad.sum())} of {len(ids)} checked samples (sample id {int(ids[i])}: "
                f"off by up to {float(worst[i]):.3g}): made by another teacher, or rows changed",
            )

    def _spot_positions(self, data: Dataset, n: int, seed: int = 0) -> np.ndarray:
        """Positions in ``data`` to check: ``n`` strata over the store's row order (one seeded
        pick each) plus one pick in each of up to ``n`` shards (seeded)."""
        rows = self._find(data.idx.cpu().numpy())
        present = np.flatnonzero(rows >= 0)
        if present.size == 0 or n < 1:
            return present
        order = present[np.argsort(rows[present], kind="stable")]
        sorted_rows = rows[order]
        rng = np.random.default_rng(seed)
        edges = np.linspace(0, len(order), min(n, len(order)) + 1).astype(int)
        picks = [int(rng.integers(a, b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]
        shards = rng.permutation(len(self._arrays))[:n]
        for s in shards:
            lo, hi = np.searchsorted(sorted_rows, self._offsets[s : s + 2])
            if hi > lo:
                picks.append(int(rng.integers(lo, hi)))
        return np.unique(order[picks])

    def _find(self, ids: np.ndarray) -> np.ndarray:
        """Global row of each sample id, -1 where it is not stored."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        pos = np.minimum(np.searchsorted(self._ids, ids), len(self._ids) - 1)
        return np.where(self._ids[pos] == ids, self._rows[pos], -1)

    def _locate(self, idx: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row) of each sample id; checked on every call, since a CPU check is cheap
        and a missing id must never read a neighbour's row."""
        rows = self._find(torch.as_tensor(idx).detach().cpu().long().numpy())
        if (rows < 0).any():
            raise ConfigError(self.field, str(self.path), "sample ids not in the teacher store")
        shard = np.searchsorted(self._offsets, rows, side="right") - 1
        return shard, rows - self._offsets[shard]

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Global row (shard order, then row in shard) of each sample id."""
        shard, local = self._locate(idx)
        return torch.from_numpy(self._offsets[shard] + local)

    def _gather(self, key: str, shard: np.ndarray, local: np.ndarray) -> torch.Tensor:
        """Rows of ``key`` from the mapped shards: only those rows are read (each shard is
        hashed and checked once, before its first read)."""
        first = self._arrays[0][key]
        out = np.empty((len(shard), *first.shape[1:]), dtype=first.dtype)
        for s in np.unique(shard):
            if not self._verified[s]:
                self._verify_shard(s)
            sel = shard == s
            out[sel] = self._arrays[s][key][local[sel]]
        return _to_torch(out, self._dtypes[key])

    def lookup_topk(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The raw top-k logits of sample ids ``idx``: values ``(n, *lead, k)`` float32, class
        indices ``(n, *lead, k)`` int64 and logsumexp ``(n, *lead)`` float32 (CPU), for
        sparse losses that never build the full ``(..., V)`` logits."""
        if not self.is_topk:
            raise ConfigError(
                self.field,
                str(self.path),
                "not a top-k store (made with topk null); read full logits with "
                "lookup(idx, 'logits') or re-run cache-teacher with --topk K",
            )
        shard, local = self._locate(idx)
        vals, ids, lse = (self._gather(k, shard, local) for k in TOPK_KEYS)
        return vals.float(), ids.long(), lse.float()

    def lookup(self, idx: torch.Tensor, tap: str) -> torch.Tensor | TopK:
        """The stored signal of ``tap`` for sample ids ``idx``: float32 ``(n, *shape)`` on the
        CPU (logits ``(n, *lead, V)``, top-k stores decoded by the rule above); tap ``topk``
        of a top-k store: the raw :class:`~crossdistill.signals.TopK` for sparse losses."""
        if tap == LOGITS and self.is_topk:
            return topk_decode(*self.lookup_topk(idx), self.manifest["num_classes"])
        if tap == TOPK:  # sparse losses read the three stored tensors as they are
            return TopK(*self.lookup_topk(idx))
        if tap not in self._keys:
            raise ConfigError(
                "terms.teacher",
                tap,
                f"not in the teacher store; stored taps: {', '.join(self.taps)}",
            )
        return self._gather(tap, *self._locate(idx)).float()

    def extra_repr(self) -> str:
        m = self.manifest
        return f"{self.path}, samples={m['num_samples']}, taps={self.taps}, topk={m['topk']}"

    def forward(self, *args, **kwargs):
        raise RuntimeError("a TeacherStore is read by sample id, not called on inputs")
