"""Teacher store: run a teacher once per sample id, read its signals back by ``batch["idx"]``.

Layout of a store directory::

    manifest.json              teacher-weights hash, dataset fingerprint, transform, dtype,
                               top-k settings, taps and their shapes, bytes per sample
    shard-00000.safetensors    idx (int64) + one tensor per tap, rows in the same order

Logits may be stored **top-k**: the k largest logits (fp16 values, uint8/int16 indices) plus
the logsumexp of all logits (fp16). Reconstruction rule (documented, tested): the k stored
classes keep their exact probabilities ``exp(z_i - lse)``; the remaining mass
``m = 1 - sum_topk p_i`` is spread uniformly over the other ``C - k`` classes, whose logits
become ``lse + log(m / (C - k))``. At T = 1 the L1 error of the reconstructed distribution
is at most ``2 m`` (plus fp16 rounding); KD at other temperatures re-tempers these logits.

Stored signals are only valid for the exact inputs the teacher saw, so a store made by
another teacher, dataset or transform is refused, naming what differs, and training refuses a
store together with random augmentation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import Batches, Dataset
from ..errors import ConfigError
from ..io import load_weights, save_weights
from ..taps import Capture, Tap
from .fingerprint import transform_description, weights_hash

FORMAT = "crossdistill-teacher-store/1"
LOGITS = "logits"


def _topk_encode(z: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    z = z.float()
    vals, ids = z.topk(k, dim=1)
    idx_dtype = torch.uint8 if z.shape[1] <= 256 else torch.int16
    return {
        "logits.values": vals.half(),
        "logits.indices": ids.to(idx_dtype),
        "logits.lse": torch.logsumexp(z, 1).half(),
    }


def topk_decode(
    vals: torch.Tensor, ids: torch.Tensor, lse: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Full (B, C) logits from top-k values/indices and the logsumexp (the rule above)."""
    vals, lse = vals.float(), lse.float()[:, None]
    k = vals.shape[1]
    mass = (1 - torch.exp(vals - lse).sum(1, keepdim=True)).clamp_min(1e-8)
    rest = lse + torch.log(mass / max(num_classes - k, 1))
    out = rest.expand(-1, num_classes).clone()
    return out.scatter(1, ids.long(), vals)


@torch.no_grad()
def cache_teacher(
    teacher: nn.Module,
    data: Dataset,
    out_dir: str | Path,
    *,
    taps: list[str] = (),
    topk: int | None = None,
    dtype: str = "float16",
    batch_size: int = 256,
    shard_size: int = 50_000,
    device: str = "cpu",
    progress: bool = True,
) -> Path:
    """Run ``teacher`` once over ``data`` (no augmentation) and write a store to ``out_dir``."""
    if dtype not in ("float16", "bfloat16", "float32"):
        raise ConfigError("store.dtype", dtype, "allowed: float16, bfloat16, float32")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    teacher = teacher.to(device).eval()
    tap_objs = {str(Tap.parse(t)): Tap.parse(t) for t in taps if t != LOGITS}
    cap = Capture(teacher, tap_objs, "store.taps")
    torch_dtype = getattr(torch, dtype)
    rows: dict[str, list[torch.Tensor]] = {}
    shards, count, n_shard = [], 0, 0
    num_classes = None

    def flush():
        nonlocal rows, n_shard
        if not rows:
            return
        name = f"shard-{n_shard:05d}.safetensors"
        save_weights({k: torch.cat(v) for k, v in rows.items()}, out / name)
        shards.append(name)
        rows, n_shard = {}, n_shard + 1

    for batch in tqdm(
        Batches(data, batch_size, shuffle=False).epoch(0),
        desc="caching teacher",
        disable=not progress,
        total=math.ceil(len(data) / batch_size),
    ):
        cap.clear()
        cap.active = True
        logits = teacher(batch["x"].to(device)).float()
        cap.active = False
        num_classes = logits.shape[1]
        if topk is not None and not 0 < topk < num_classes:
            raise ConfigError("store.topk", topk, f"must be in 1..{num_classes - 1} (or null)")
        sig = {"idx": batch["idx"]}
        sig.update(_topk_encode(logits, topk) if topk else {LOGITS: logits.to(torch_dtype)})
        sig.update({k: cap.get(k).to(torch_dtype).cpu() for k in tap_objs})
        for k, v in sig.items():
            rows.setdefault(k, []).append(v.cpu())
        count += len(batch["idx"])
        if sum(len(x) for x in rows["idx"]) >= shard_size:
            flush()
    flush()
    cap.remove()
    sample = load_weights(out / shards[0])
    per_sample = {k: v[0].numel() * v.element_size() for k, v in sample.items()}
    manifest = {
        "format": FORMAT,
        "teacher_hash": weights_hash(teacher),
        "teacher_class": type(teacher).__name__,
        "data_fingerprint": data.fingerprint(),
        "transform": transform_description(data),
        "num_samples": count,
        "num_classes": num_classes,
        "dtype": dtype,
        "topk": topk,
        "taps": [LOGITS, *tap_objs],
        "shapes": {k: list(v.shape[1:]) for k, v in sample.items()},
        "shards": shards,
        "bytes_per_sample": sum(per_sample.values()),
        "bytes_per_sample_signals": sum(v for k, v in per_sample.items() if k != "idx"),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


class TeacherStore(nn.Module):
    """A read-only teacher: signals looked up by sample id. Holds no parameters.

    Pass it wherever a teacher goes (``Distiller(student, TeacherStore(path), terms)``);
    terms may only tap what was stored (``store.taps``).
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
        self.manifest = json.loads(mpath.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ConfigError(field, self.manifest.get("format"), f"expected format {FORMAT}")
        parts = [load_weights(self.path / s, field) for s in self.manifest["shards"]]
        data = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        ids = data.pop("idx").long()
        row = torch.full((int(ids.max()) + 1,), -1, dtype=torch.long)
        row[ids] = torch.arange(len(ids))
        # non-persistent buffers: `.to(device)` moves the signals next to the student (lookups
        # stay on the GPU), and they never enter a state dict or checkpoint
        self.register_buffer("_row", row, persistent=False)
        self._keys = {}
        for i, (k, v) in enumerate(data.items()):
            self._keys[k] = f"_sig{i}"
            self.register_buffer(f"_sig{i}", v, persistent=False)
        self.taps = list(self.manifest["taps"])
        self._checked = False

    @property
    def bytes_per_sample(self) -> int:
        return int(self.manifest["bytes_per_sample"])

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
            ids = data.idx.to(self._row.device)
            if int(ids.max()) >= len(self._row) or (self._row[ids] < 0).any():
                raise ConfigError(
                    self.field,
                    str(self.path),
                    "made for another dataset: "
                    f"sample ids of {data.name}/{data.split} are missing from it",
                )
            self._checked = True  # every id of this split is present: lookups skip the check

    def _sig(self, key: str) -> torch.Tensor:
        return getattr(self, self._keys[key])

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        idx = idx.to(self._row.device).long()
        if self._checked:  # ids validated once against the split: no per-step host sync
            return self._row[idx]
        if int(idx.max()) >= len(self._row) or (r := self._row[idx]).lt(0).any():
            raise ConfigError(self.field, str(self.path), "sample ids not in the teacher store")
        return r

    def lookup(self, idx: torch.Tensor, tap: str) -> torch.Tensor:
        """The stored signal of ``tap`` for sample ids ``idx`` (float32, on the store's device)."""
        r = self.rows(idx)
        if tap == LOGITS and self.manifest["topk"]:
            return topk_decode(
                self._sig("logits.values")[r],
                self._sig("logits.indices")[r],
                self._sig("logits.lse")[r],
                self.manifest["num_classes"],
            )
        if tap not in self._keys:
            raise ConfigError(
                "terms.teacher",
                tap,
                f"not in the teacher store; stored taps: {', '.join(self.taps)}",
            )
        return self._sig(tap)[r].float()

    def forward(self, *args, **kwargs):
        raise RuntimeError("a TeacherStore is read by sample id, not called on inputs")
