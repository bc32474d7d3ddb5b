"""File corruptions applied to a case directory once the fixtures exist.

A case names its corruptions as ``(op, kwargs)`` pairs at generation time (so generation
needs no files); :func:`apply` runs them in the parent before the case is forked. Every op
is deterministic in its kwargs.
"""

from __future__ import annotations

import gzip
import json
import random
import shutil
from pathlib import Path

import numpy as np

from .bases import idx_bytes


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)


def _flip(path: Path, seed: int, start: int = 0, n: int = 8, end: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    rng = random.Random(seed)
    end = len(data) if end is None else end
    for _ in range(n):
        i = rng.randrange(min(start, end - 1), end)
        data[i] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


def _st_header_len(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


# -- weights (teacher.checkpoint) ----------------------------------------------------------------
def checkpoint(case: Path, fx: Path, *, dst: str, src: str, how: str, seed: int = 0) -> None:
    """``dst`` (in the case dir) made from the fixture weights ``src`` and broken by ``how``."""
    out, real = case / dst, fx / src
    out.parent.mkdir(parents=True, exist_ok=True)
    if how == "missing":
        return
    if how == "directory":
        out.mkdir()
        return
    if how == "empty":
        out.write_bytes(b"")
    elif how == "random":
        out.write_bytes(random.Random(seed).randbytes(4096))
    elif how == "truncated":
        data = real.read_bytes()
        out.write_bytes(data[: random.Random(seed).randrange(1, len(data))])
    elif how == "header-flip":
        _copy(real, out)
        _flip(out, seed, 8, 4, end=_st_header_len(out))
    elif how == "data-flip":
        _copy(real, out)
        _flip(out, seed, _st_header_len(out), 16)
    elif how == "huge-header":
        out.write_bytes((2**62).to_bytes(8, "little") + b"{}")
    elif how == "json-garbage":
        body = b'{"a": {"dtype": "F32", "shape": [1e30], "data_offsets": [0, -4]}}'
        out.write_bytes(len(body).to_bytes(8, "little") + body)
    elif how in ("nan", "inf"):
        from safetensors.numpy import load_file, save_file

        state = load_file(str(real))
        bad = np.nan if how == "nan" else np.inf
        state = {k: np.full_like(v, bad) if v.dtype.kind == "f" else v for k, v in state.items()}
        save_file(state, str(out))
    elif how == "other-model":
        from safetensors.numpy import save_file

        save_file({"layers.0.0.weight": np.zeros((3, 3), np.float32)}, str(out))
    elif how == "pickle":
        import torch

        torch.save({"w": torch.zeros(2)}, str(out))
    elif how == "yaml":
        out.write_text("student: {model: cnn}\n")
    else:
        raise ValueError(how)


# -- MNIST IDX folders (data.root) ------------------------------------------------------------
IMG, LAB = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"


def mnist(case: Path, fx: Path, *, dst: str, how: str, seed: int = 0) -> None:
    root = case / dst
    if how == "missing":
        return
    if how == "file":
        root.parent.mkdir(parents=True, exist_ok=True)
        root.write_bytes(b"not a folder")
        return
    root.mkdir(parents=True, exist_ok=True)
    if how == "empty-dir":
        return
    _copy(fx / "mnist", root)
    img, lab = root / IMG, root / LAB
    raw = gzip.decompress(img.read_bytes())
    rng = random.Random(seed)
    if how == "bad-magic":
        img.write_bytes(gzip.compress(b"\x12\x34" + raw[2:]))
    elif how == "short-header":
        img.write_bytes(gzip.compress(raw[:6]))
    elif how == "magic-only":
        img.write_bytes(gzip.compress(raw[:4]))
    elif how == "truncated-gzip":
        z = img.read_bytes()
        img.write_bytes(z[: len(z) // 2])
    elif how == "not-gzip":
        img.write_bytes(raw[:1000])
    elif how == "empty-gzip":
        img.write_bytes(b"")
    elif how == "dtype-code":
        img.write_bytes(gzip.compress(raw[:2] + b"\x0f" + raw[3:]))
    elif how == "ndim-0":
        img.write_bytes(gzip.compress(b"\x00\x00\x08\x00" + raw[16:]))
    elif how == "ndim-255":
        img.write_bytes(gzip.compress(b"\x00\x00\x08\xff" + raw[4:]))
    elif how == "huge-dims":
        img.write_bytes(gzip.compress(raw[:4] + (2**32 - 1).to_bytes(4, "big") + raw[8:]))
    elif how == "one-dim":
        img.write_bytes(gzip.compress(idx_bytes(np.zeros(300, np.uint8))))
    elif how == "labels-count":
        y = np.frombuffer(gzip.decompress(lab.read_bytes())[8:], np.uint8)
        lab.write_bytes(gzip.compress(idx_bytes(y[:-7])))
    elif how == "labels-255":
        y = np.frombuffer(gzip.decompress(lab.read_bytes())[8:], np.uint8).copy()
        y[rng.randrange(len(y))] = 255
        lab.write_bytes(gzip.compress(idx_bytes(y)))
    elif how == "labels-missing":
        lab.unlink()
    elif how == "float-nan":
        x = np.full((300, 28, 28), np.nan, ">f4")
        head = bytes([0, 0, 0x0D, 3]) + (300).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
        img.write_bytes(gzip.compress(head + x.tobytes()))
    elif how == "one-nan":  # the real images as float32 IDX, one pixel NaN
        x = np.frombuffer(raw[16:], np.uint8).astype(">f4").reshape(-1, 28, 28)
        x[rng.randrange(len(x)), 14, 14] = np.nan
        head = bytes([0, 0, 0x0D, 3]) + b"".join(d.to_bytes(4, "big") for d in x.shape)
        img.write_bytes(gzip.compress(head + x.tobytes()))
    elif how == "bitflip":
        z = bytearray(img.read_bytes())
        for _ in range(4):
            z[rng.randrange(10, len(z))] ^= 0xFF
        img.write_bytes(bytes(z))
    else:
        raise ValueError(how)


# -- teacher stores (teacher.store) -------------------------------------------------------------
def store(case: Path, fx: Path, *, dst: str, how: str, seed: int = 0) -> None:
    root = case / dst
    _copy(fx / "store", root)
    mpath = root / "manifest.json"
    m = json.loads(mpath.read_text())
    shard = root / m["shards"][0]
    rng = random.Random(seed)
    if how == "bad-json":
        mpath.write_text(mpath.read_text()[:-40])
    elif how == "no-manifest":
        mpath.unlink()
    elif how == "manifest-list":
        mpath.write_text("[1, 2, 3]")
    elif how == "no-shards":
        m["shards"] = []
    elif how.startswith("del:"):
        m.pop(how[4:], None)
    elif how.startswith("set:"):
        key, val = how[4:].split("=", 1)
        m[key] = json.loads(val)
    elif how == "shard-escape":
        outside = case / "outside.safetensors"
        _copy(shard, outside)
        m["shards"] = ["../outside.safetensors"]
    elif how == "shard-absolute":
        m["shards"] = ["/etc/hostname"]
    elif how == "shard-missing":
        shard.unlink()
    elif how == "shard-truncated":
        data = shard.read_bytes()
        shard.write_bytes(data[: rng.randrange(9, len(data) - 1)])
    elif how == "shard-bitflip":
        _flip(shard, seed, _st_header_len(shard), 32)
    elif how in ("nan-rows", "permuted-rows", "other-teacher"):
        from safetensors.numpy import load_file, save_file

        t = load_file(str(shard))
        lg = t["logits"].copy()
        if how == "nan-rows":
            lg[rng.sample(range(len(lg)), 45)] = np.nan
        elif how == "permuted-rows":
            lg = lg[np.random.default_rng(seed).permutation(len(lg))]
        else:
            lg = (np.random.default_rng(seed).standard_normal(lg.shape) * 3).astype(lg.dtype)
        t["logits"] = lg
        save_file(t, str(shard))
    else:
        raise ValueError(how)
    if mpath.exists() and how not in ("bad-json", "manifest-list"):
        mpath.write_text(json.dumps(m, indent=2))


# -- finished run directories (--resume) ---------------------------------------------------------
def run_dir(case: Path, fx: Path, *, dst: str, how: str, seed: int = 0) -> None:
    root = case / dst
    _copy(fx / "teacher", root)
    rng = random.Random(seed)
    ckpt, metrics = root / "last.ckpt", root / "metrics.jsonl"
    if how == "torn-metrics":
        with open(metrics, "a") as f:
            f.write('{"epoch": 1, "train_lo')
    elif how == "metrics-garbage":
        metrics.write_bytes(b"\xff\xfe garbage\n" + metrics.read_bytes())
    elif how == "ckpt-garbage":
        ckpt.write_bytes(random.Random(seed).randbytes(2048))
    elif how == "ckpt-empty":
        ckpt.write_bytes(b"")
    elif how == "ckpt-truncated":
        data = ckpt.read_bytes()
        ckpt.write_bytes(data[: rng.randrange(1, len(data))])
    elif how == "ckpt-missing":
        ckpt.unlink()
    elif how == "config-garbage":
        (root / "config.yaml").write_bytes(b"\x00\x01\x02")
    elif how == "tmp-leftover":
        (root / ".last.ckpt.abc.tmp").write_bytes(b"partial")
    elif how != "intact":
        raise ValueError(how)


# -- tokenizer caches and plain files -----------------------------------------------------------
def tokenizer(case: Path, fx: Path, *, dst: str, cache: str, how: str, seed: int = 0) -> None:
    """A copy of the shared tokenizer cache with every ``tokenizer.json`` broken."""
    src = Path(cache) / "tokenizers"
    if src.is_dir():
        _copy(src, case / dst)
    for tj in (case / dst).glob("*/tokenizer.json"):
        if how == "garbage":
            tj.write_bytes(random.Random(seed).randbytes(300))
        elif how == "empty":
            tj.write_text("")
        elif how == "wrong-json":
            tj.write_text('{"model": {"type": "Nope"}}')
        else:
            raise ValueError(how)


def synthetic(case: Path, fx: Path, *, dst: str, how: str, seed: int = 0) -> None:
    """A condense run dir with a broken ``synthetic.safetensors``."""
    root = case / dst
    root.mkdir(parents=True, exist_ok=True)
    data = b"" if how == "empty" else random.Random(seed).randbytes(512)
    (root / "synthetic.safetensors").write_bytes(data)


OPS = {
    "checkpoint": checkpoint,
    "mnist": mnist,
    "store": store,
    "run_dir": run_dir,
    "tokenizer": tokenizer,
    "synthetic": synthetic,
}


def apply(ops, case: Path, fx: Path, cache: Path) -> None:
    for name, kw in ops:
        kw = dict(kw)
        if name == "tokenizer":
            kw["cache"] = str(cache)
        OPS[name](case, fx, **kw)
