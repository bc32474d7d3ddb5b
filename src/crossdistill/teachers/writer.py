"""Write a teacher store (``crossdistill cache-teacher``) so that a kill at any point leaves
either a complete store or one that is refused as incomplete and completed by a re-run.

Each shard goes to a temp name and is renamed into place, then ``manifest.json`` is rewritten
atomically, marked incomplete, with the shards so far and their SHA-256; the last write marks
it complete. A re-run with the same teacher, data and options keeps the shards whose hashes
still match, removes temp files and later shards, and continues from the batch where they end,
so batches are cut exactly as in one uninterrupted run and the store comes out byte for byte
the same.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters import ModelIO
from ..data import Batches, Dataset
from ..errors import ConfigError
from ..io import atomic_path, save_weights
from ..taps import OUTPUT, Capture, Tap
from .fingerprint import inputs_fingerprint, transform_description, weights_hash
from .manifest import (
    FORMAT,
    LOGITS,
    MANIFEST,
    META_KEYS,
    OBSERVED,
    SHARD_RE,
    TEMP_RE,
    file_sha256,
    index_dtype,
    shard_name,
)

Record = tuple[str, int, str]  # shard name, rows, sha256


def _topk_encode(z: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    z = z.float()
    vals, ids = z.topk(k, dim=-1)
    return {
        "logits.values": vals.half(),
        "logits.indices": ids.to(index_dtype(z.shape[-1])),
        "logits.lse": torch.logsumexp(z, -1).half(),
    }


def _io_spec(io: ModelIO) -> dict:
    """How the teacher was called, as JSON, so the store can be checked against it later."""
    inputs = dict(io.inputs) if isinstance(io.inputs, Mapping) else io.inputs
    spec = {"inputs": inputs, "logits": io.logits_sel, "class_dim": io.class_dim}
    try:
        return json.loads(json.dumps({**spec, "kwargs": io.kwargs}))
    except (TypeError, ValueError):
        raise ConfigError(
            "teacher.kwargs", io.kwargs, "a stored teacher's forward kwargs must be JSON values"
        ) from None


def _write_text(path: Path, text: str) -> None:
    tmp = atomic_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_manifest(out: Path, head: dict, meta: dict, records: list[Record], complete: bool):
    m = {
        **head,
        **meta,
        "shards": [r[0] for r in records],
        "shard_rows": [r[1] for r in records],
        "shard_sha256": [r[2] for r in records],
        "complete": complete,
    }
    _write_text(out / MANIFEST, json.dumps(m, indent=2))


def _resume(out: Path, head: dict) -> tuple[list[Record], dict | None]:
    """The intact leading shards of an earlier write of this same store (interrupted or
    finished) and what its first batch showed; every other shard or temp file is removed."""
    records: list[Record] = []
    meta = None
    try:
        old = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        if all(old[k] == v for k, v in head.items()):
            meta = {k: old[k] for k in META_KEYS}
            n, size = head["num_samples"], head["shard_size"]
            shards = zip(old["shards"], old["shard_rows"], old["shard_sha256"], strict=True)
            for i, (name, rows, sha) in enumerate(shards):
                p = out / name
                if (
                    name != shard_name(i)
                    or rows != min(size, n - i * size)
                    or p.is_symlink()
                    or not p.is_file()
                    or file_sha256(p) != sha
                ):
                    break
                records.append((name, rows, sha))
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        records = []
    keep = {r[0] for r in records}
    for p in out.iterdir():
        ours = SHARD_RE.fullmatch(p.name) and p.name not in keep or TEMP_RE.fullmatch(p.name)
        if ours and (p.is_file() or p.is_symlink()):
            p.unlink()
    return records, (meta if records else None)


def _refuse_non_finite(ids: torch.Tensor, raw: dict, stored: dict, dtype: str) -> None:
    """Non-finite teacher outputs, or values that overflow their storage type, never reach a
    store (a NaN row would train the student on NaN without any error)."""
    for what, tensors in (("raw", raw), ("stored", stored)):
        for k, v in tensors.items():
            if k == "idx" or not v.is_floating_point():
                continue
            bad = ~torch.isfinite(v.float()).reshape(len(ids), -1).all(1).cpu()
            if not bad.any():
                continue
            where = f"sample ids {ids[bad][:5].tolist()}"
            if what == "raw":
                raise ConfigError(
                    "teacher", where, f"the teacher's {k} are NaN or inf there; check its weights"
                )
            fix = (
                "top-k values are float16: store full logits (no --topk) with --dtype float32"
                if k.startswith("logits.")
                else "use --dtype float32"
            )
            raise ConfigError("store.dtype", dtype, f"{k} overflows {v.dtype} at {where}; {fix}")


def _observed_logprob(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """log p(target) per position (float32), 0 where the target is -100."""
    if target.shape != logits.shape[:-1]:
        raise ConfigError("store.observed", tuple(target.shape),
                          f"one target per logits position {tuple(logits.shape[:-1])}")
    lp = logits.float().log_softmax(-1).gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return torch.where(target == -100, 0.0, lp)


def _meta(sig: dict[str, torch.Tensor], vocab: int, positions: int, topk: int | None) -> dict:
    per = {k: v[0].numel() * v.element_size() for k, v in sig.items()}
    signal = sum(per.values()) - per["idx"]
    return {
        "num_classes": vocab,
        "vocab_size": vocab,
        "positions_per_sample": positions,
        "index_dtype": str(index_dtype(vocab)).removeprefix("torch.") if topk else None,
        "shapes": {k: list(v.shape[1:]) for k, v in sig.items()},
        "bytes_per_sample": sum(per.values()),
        "bytes_per_sample_signals": signal,
        "bytes_per_token": signal / positions,
    }


def _positive(field: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(field, value, "must be an integer >= 1")


@torch.no_grad()
def cache_teacher(
    teacher: nn.Module,
    data: Dataset,
    out_dir: str | Path,
    *,
    io: ModelIO | None = None,
    taps: list[str] = (),
    topk: int | None = None,
    observed: str | None = None,
    dtype: str = "float16",
    batch_size: int = 256,
    shard_size: int = 50_000,
    device: str = "cpu",
    progress: bool = True,
) -> Path:
    """Run ``teacher`` once over ``data`` (no augmentation) and write a store to ``out_dir``.

    ``io`` says how the teacher is called on a batch and where its (class-last) logits are;
    the default is ``teacher(batch["x"])``. Shards hold exactly ``shard_size`` rows (the last
    one fewer), so a shard's size is predictable whatever the batch size. Re-running after a
    kill completes the store (see the module docstring).

    ``observed`` (a batch key of next-token targets, e.g. ``labels``) keeps one float32 per
    position instead of any logits: the teacher's log-probability of the observed next token
    (0 where the target is -100), tap ``token_logprob``: 4 bytes per token, all that ALM's
    chunk likelihoods need from a teacher.
    """
    if dtype not in ("float16", "bfloat16", "float32"):
        raise ConfigError("store.dtype", dtype, "allowed: float16, bfloat16, float32")
    _positive("store.shard_size", shard_size)
    _positive("store.batch_size", batch_size)
    if len(data) == 0:
        raise ConfigError("store.data", f"{data.name}/{data.split}", "the split has no samples")
    io = io if io is not None else ModelIO(field="teacher")
    io.check_batch(data.tensors)
    if observed is not None:
        if topk is not None:
            raise ConfigError("store.observed", observed, "keeps no logits: drop --topk")
        if observed not in data.tensors:
            raise ConfigError("store.observed", observed,
                              f"not a key of the data; it has: {', '.join(sorted(data.tensors))}")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError("store.out", str(out), f"cannot create the directory ({err})") from None
    teacher = teacher.to(device).eval()
    tap_objs = {str(Tap.parse(t)): Tap.parse(t) for t in taps if t != LOGITS}
    head = {
        "format": FORMAT,
        "teacher_hash": weights_hash(teacher),
        "teacher_class": type(teacher).__name__,
        "inputs": io.keys,
        "io": _io_spec(io),
        "data_fingerprint": inputs_fingerprint(data, io.keys),
        "transform": transform_description(data),
        "num_samples": len(data),
        "dtype": dtype,
        "topk": topk,
        "observed": observed,
        "taps": [OBSERVED if observed else LOGITS, *tap_objs],
        "shard_size": shard_size,
        "batch_size": batch_size,
        "device": str(device),
    }
    records, meta = _resume(out, head)
    if records:
        _write_manifest(out, head, meta, records, complete=False)
    else:
        (out / MANIFEST).unlink(missing_ok=True)
    done = sum(r[1] for r in records)
    batches = Batches(data, batch_size, shuffle=False)
    start, drop = divmod(done, batch_size)
    torch_dtype = getattr(torch, dtype)
    pending: dict[str, list[torch.Tensor]] = {}
    n_pending, logit_shape = 0, None

    def write(n_rows: int) -> None:
        nonlocal pending, n_pending
        cat = {k: torch.cat(v) for k, v in pending.items()}
        path = save_weights({k: v[:n_rows] for k, v in cat.items()}, out / shard_name(len(records)))
        records.append((path.name, n_rows, file_sha256(path)))
        _write_manifest(out, head, meta, records, complete=False)
        pending = {k: [v[n_rows:]] for k, v in cat.items()}
        n_pending -= n_rows

    from ..distiller import output_flags, select_outputs

    hooked = {k: t for k, t in tap_objs.items() if t.path != OUTPUT}  # forward hooks
    out_taps = {k: t for k, t in tap_objs.items() if t.path == OUTPUT}  # output.hidden_states[i]
    flags = output_flags(teacher, out_taps)
    cap = Capture(teacher, hooked, "store.taps")
    try:
        todo = batches.epoch(0, start=start) if done < len(data) else ()
        for batch in tqdm(
            todo, desc="caching teacher", disable=not progress, total=len(batches) - start
        ):
            ids = batch["idx"].cpu()
            batch = {k: v.to(device) for k, v in batch.items()}
            cap.clear()
            cap.active = True
            try:
                raw = io.call(teacher, batch, **flags)
            finally:
                cap.active = False
            first = logit_shape is None
            logits = (io.check(raw) if first else io.logits(raw)).float()
            shape = tuple(logits.shape[1:])
            if first:
                if not shape or len(logits) != len(ids):
                    raise ConfigError(
                        "store.logits",
                        tuple(logits.shape),
                        f"expected ({len(ids)}, ..., classes): one row per sample, classes last",
                    )
                if topk is not None and not 0 < topk < shape[-1]:
                    raise ConfigError(
                        "store.topk", topk, f"must be in 1..{shape[-1] - 1} (or null)"
                    )
                logit_shape = shape
            elif shape != logit_shape:
                raise ConfigError(
                    "store.logits",
                    tuple(logits.shape),
                    f"every batch needs per-sample shape {logit_shape} (pad inputs to one length)",
                )
            feats = {k: cap.get(k) for k in hooked}
            feats.update(select_outputs(raw, out_taps, "store.taps"))
            sig = {"idx": ids}
            if observed:
                sig[OBSERVED] = _observed_logprob(logits, batch[observed]).cpu()
            else:
                sig.update(_topk_encode(logits, topk) if topk else {LOGITS: logits.to(torch_dtype)})
            sig.update({k: v.to(torch_dtype) for k, v in feats.items()})
            _refuse_non_finite(ids, {LOGITS: logits, **feats}, sig, dtype)
            if meta is None:
                meta = _meta(sig, shape[-1], math.prod(shape[:-1]), topk)
            elif [list(v.shape[1:]) for v in sig.values()] != list(meta["shapes"].values()):
                raise ConfigError("store.logits", shape, "differs from the shards already written")
            for k, v in sig.items():
                pending.setdefault(k, []).append(v[drop:].cpu())
            n_pending += len(ids) - drop
            drop = 0
            while n_pending >= shard_size:
                write(shard_size)
        if n_pending:
            write(n_pending)
    finally:
        cap.remove()
    _write_manifest(out, head, meta, records, complete=True)
    return out
