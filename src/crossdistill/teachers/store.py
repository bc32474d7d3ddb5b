"""Teacher store: run a teacher once per sample id, read its signals back by ``batch["idx"]``.

Layout of a store directory::

    manifest.json              teacher-weights hash, dataset fingerprint, transform, dtype,
                               top-k settings, taps and their shapes, bytes per sample/token
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
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters import ModelIO
from ..data import Batches, Dataset
from ..errors import ConfigError
from ..io import save_weights
from ..taps import Capture, Tap
from .fingerprint import transform_description, weights_hash

FORMAT = "crossdistill-teacher-store/1"
LOGITS = "logits"
TOPK_KEYS = ("logits.values", "logits.indices", "logits.lse")

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


def index_dtype(vocab: int) -> torch.dtype:
    """The smallest integer type holding class ids ``0..vocab-1`` (int16 would wrap past
    32,767, which silently corrupts large-vocabulary top-k stores)."""
    if vocab <= 256:
        return torch.uint8
    if vocab <= 65536:
        return torch.uint16
    return torch.int32


def _topk_encode(z: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    z = z.float()
    vals, ids = z.topk(k, dim=-1)
    return {
        "logits.values": vals.half(),
        "logits.indices": ids.to(index_dtype(z.shape[-1])),
        "logits.lse": torch.logsumexp(z, -1).half(),
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


@torch.no_grad()
def cache_teacher(
    teacher: nn.Module,
    data: Dataset,
    out_dir: str | Path,
    *,
    io: ModelIO | None = None,
    taps: list[str] = (),
    topk: int | None = None,
    dtype: str = "float16",
    batch_size: int = 256,
    shard_size: int = 50_000,
    device: str = "cpu",
    progress: bool = True,
) -> Path:
    """Run ``teacher`` once over ``data`` (no augmentation) and write a store to ``out_dir``.

    ``io`` says how the teacher is called on a batch and where its (class-last) logits are;
    the default is ``teacher(batch["x"])``. Shards hold exactly ``shard_size`` rows (the last
    one fewer), so a shard's size is predictable whatever the batch size.
    """
    if dtype not in ("float16", "bfloat16", "float32"):
        raise ConfigError("store.dtype", dtype, "allowed: float16, bfloat16, float32")
    if shard_size < 1:
        raise ConfigError("store.shard_size", shard_size, "must be >= 1")
    if len(data) == 0:
        raise ConfigError("store.data", f"{data.name}/{data.split}", "the split has no samples")
    io = io if io is not None else ModelIO(field="teacher")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    teacher = teacher.to(device).eval()
    tap_objs = {str(Tap.parse(t)): Tap.parse(t) for t in taps if t != LOGITS}
    cap = Capture(teacher, tap_objs, "store.taps")
    torch_dtype = getattr(torch, dtype)
    pending: dict[str, list[torch.Tensor]] = {}
    n_pending, count, shards = 0, 0, []
    logit_shape = per_sample = None

    def write(n_rows: int) -> None:
        nonlocal pending, n_pending
        cat = {k: torch.cat(v) for k, v in pending.items()}
        name = f"shard-{len(shards):05d}.safetensors"
        save_weights({k: v[:n_rows] for k, v in cat.items()}, out / name)
        shards.append(name)
        pending = {k: [v[n_rows:]] for k, v in cat.items()}
        n_pending -= n_rows

    for batch in tqdm(
        Batches(data, batch_size, shuffle=False).epoch(0),
        desc="caching teacher",
        disable=not progress,
        total=math.ceil(len(data) / batch_size),
    ):
        ids = batch["idx"].cpu()
        batch = {k: v.to(device) for k, v in batch.items()}
        if logit_shape is None:
            io.check_batch(batch)
        cap.clear()
        cap.active = True
        try:
            raw = io.call(teacher, batch)
        finally:
            cap.active = False
        logits = (io.check(raw) if logit_shape is None else io.logits(raw)).float()
        if logit_shape is None:
            logit_shape = tuple(logits.shape[1:])
            vocab = logit_shape[-1] if logit_shape else 0
            if not logit_shape or len(logits) != len(ids):
                raise ConfigError(
                    "store.logits",
                    tuple(logits.shape),
                    f"expected ({len(ids)}, ..., classes): one row per sample, classes last",
                )
            if topk is not None and not 0 < topk < vocab:
                raise ConfigError("store.topk", topk, f"must be in 1..{vocab - 1} (or null)")
        elif tuple(logits.shape[1:]) != logit_shape:
            raise ConfigError(
                "store.logits",
                tuple(logits.shape),
                f"every batch needs per-sample shape {logit_shape} (pad inputs to one length)",
            )
        sig = {"idx": ids}
        sig.update(_topk_encode(logits, topk) if topk else {LOGITS: logits.to(torch_dtype)})
        sig.update({k: cap.get(k).to(torch_dtype) for k in tap_objs})
        if per_sample is None:
            per_sample = {k: v[0].numel() * v.element_size() for k, v in sig.items()}
            shapes = {k: list(v.shape[1:]) for k, v in sig.items()}
        for k, v in sig.items():
            pending.setdefault(k, []).append(v.cpu())
        count += len(ids)
        n_pending += len(ids)
        while n_pending >= shard_size:
            write(shard_size)
    if n_pending:
        write(n_pending)
    cap.remove()
    positions = math.prod(logit_shape[:-1])
    signal_bytes = sum(v for k, v in per_sample.items() if k != "idx")
    manifest = {
        "format": FORMAT,
        "teacher_hash": weights_hash(teacher),
        "teacher_class": type(teacher).__name__,
        "inputs": io.keys,
        "data_fingerprint": data.fingerprint(),
        "transform": transform_description(data),
        "num_samples": count,
        "num_classes": vocab,
        "vocab_size": vocab,
        "positions_per_sample": positions,
        "dtype": dtype,
        "topk": topk,
        "index_dtype": str(index_dtype(vocab)).removeprefix("torch.") if topk else None,
        "taps": [LOGITS, *tap_objs],
        "shapes": shapes,
        "shards": shards,
        "shard_size": shard_size,
        "bytes_per_sample": sum(per_sample.values()),
        "bytes_per_sample_signals": signal_bytes,
        "bytes_per_token": signal_bytes / positions,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


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
    except (OSError, struct.error, ValueError, KeyError, TypeError) as err:
        raise ConfigError(field, str(path), f"not a readable safetensors shard ({err})") from None
    return arrays, dtypes


def _to_torch(a: np.ndarray, st_dtype: str) -> torch.Tensor:
    if st_dtype == "BF16":
        return torch.from_numpy(a).view(torch.bfloat16)
    if a.dtype.kind == "u" and a.dtype != np.uint8:  # few torch ops take uint16/uint32
        a = a.astype(np.int64)
    return torch.from_numpy(a)


class TeacherStore(nn.Module):
    """A read-only teacher: signals looked up by sample id. Holds no parameters or buffers.

    Pass it wherever a teacher goes (``Distiller(student, TeacherStore(path), terms)``);
    terms may only tap what was stored (``store.taps``). Shards stay memory-mapped, so
    ``.to(device)`` copies nothing and lookups return CPU tensors.
    """

    is_store = True

    def __init__(self, path: str | Path, field: str = "teacher.store"):
        super().__init__()
        self.path, self.field = Path(path), field
        mpath = self.path / "manifest.json"
        if not mpath.is_file():
            raise ConfigError(
                field,
                str(self.path),
                "not a teacher store (no manifest.json); "
                "create one with `crossdistill cache-teacher CONFIG`",
            )
        self.manifest = m = json.loads(mpath.read_text())
        if m.get("format") != FORMAT:
            raise ConfigError(field, m.get("format"), f"expected format {FORMAT}")
        opened = [_open_shard(self.path / s, field) for s in m["shards"]]
        if not opened:
            raise ConfigError(field, str(self.path), "the store has no shards")
        self._arrays = [a for a, _ in opened]
        self._dtypes = opened[0][1]
        for s, (a, d) in zip(m["shards"], opened):
            same = d == self._dtypes and all(
                a[k].shape[1:] == self._arrays[0][k].shape[1:] for k in a
            )
            if not same or "idx" not in a:
                raise ConfigError(field, s, "shard disagrees with the first one (keys/shapes)")
        if (
            m.get("topk")
            and self._dtypes.get("logits.indices") == "I16"
            and m["num_classes"] > 32767
        ):
            raise ConfigError(
                field,
                str(self.path),
                "top-k indices were written as int16, which wraps above 32,767 classes; "
                "re-run cache-teacher",
            )
        # per sample id: its shard and its row in that shard (-1: not stored)
        ids = [np.asarray(a["idx"], dtype=np.int64) for a in self._arrays]
        all_ids = np.concatenate(ids)
        if all_ids.size == 0 or all_ids.min() < 0:
            raise ConfigError(field, str(self.path), "shards hold no (or negative) sample ids")
        self._offsets = np.cumsum([0, *map(len, ids)])
        self._shard = np.full(int(all_ids.max()) + 1, -1, dtype=np.int32)
        self._local = np.full(int(all_ids.max()) + 1, -1, dtype=np.int64)
        for s, i in enumerate(ids):
            self._shard[i], self._local[i] = s, np.arange(len(i))
        self._keys = [k for k in self._dtypes if k != "idx"]
        self.taps = list(m["taps"])

    @property
    def bytes_per_sample(self) -> int:
        return int(self.manifest["bytes_per_sample"])

    @property
    def bytes_per_token(self) -> float:
        m = self.manifest
        return m.get("bytes_per_token", m["bytes_per_sample_signals"])

    @property
    def is_topk(self) -> bool:
        return bool(self.manifest.get("topk"))

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
        if data is not None:
            want = transform_description(data)
            diff = [k for k in want if want[k] != m["transform"].get(k)]
            if diff:
                k = diff[0]
                raise ConfigError(
                    self.field,
                    str(self.path),
                    f"made with another transform: "
                    f"{k}={m['transform'].get(k)!r}, this run has {want[k]!r}",
                )
            if not self._present(data.idx.cpu().numpy()):
                raise ConfigError(
                    self.field,
                    str(self.path),
                    "made for another dataset: "
                    f"sample ids of {data.name}/{data.split} are missing from it",
                )

    def _present(self, ids: np.ndarray) -> bool:
        if ids.size == 0:
            return True
        if ids.min() < 0 or ids.max() >= len(self._shard):
            return False
        return bool((self._shard[ids] >= 0).all())

    def _locate(self, idx: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row) of each sample id; checked on every call, since a CPU check is cheap
        and a missing id must never read a neighbour's row."""
        ids = torch.as_tensor(idx).detach().cpu().long().reshape(-1).numpy()
        if not self._present(ids):
            raise ConfigError(self.field, str(self.path), "sample ids not in the teacher store")
        return self._shard[ids], self._local[ids]

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Global row (shard order, then row in shard) of each sample id."""
        shard, local = self._locate(idx)
        return torch.from_numpy(self._offsets[shard] + local)

    def _gather(self, key: str, shard: np.ndarray, local: np.ndarray) -> torch.Tensor:
        """Rows of ``key`` from the mapped shards: only those rows are read."""
        first = self._arrays[0][key]
        out = np.empty((len(shard), *first.shape[1:]), dtype=first.dtype)
        for s in np.unique(shard):
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

    def lookup(self, idx: torch.Tensor, tap: str) -> torch.Tensor:
        """The stored signal of ``tap`` for sample ids ``idx``: float32 ``(n, *shape)`` on the
        CPU (logits ``(n, *lead, V)``, top-k stores decoded by the rule above)."""
        if tap == LOGITS and self.is_topk:
            return topk_decode(*self.lookup_topk(idx), self.manifest["num_classes"])
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
