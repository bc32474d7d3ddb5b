"""Raw dataset readers: each returns uint8/float images (N, C, H, W) in [0, 1] and labels.

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images), embedded, offline.
* ``mnist``: the standard IDX files (``*-images-idx3-ubyte[.gz]``, ``*-labels-idx1-ubyte[.gz]``)
  in a directory the user gives; by default ``$CROSSDISTILL_DATA/mnist-t10k``, else
  ``../shared/data/mnist-t10k`` relative to the project (not the working directory).
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from ..errors import ConfigError

MNIST_DEFAULT_ROOTS = (  # relative ones resolve against the project (the repo checkout)
    "$CROSSDISTILL_DATA/mnist-t10k",
    "../shared/data/mnist-t10k",
    "data/mnist-t10k",
)
PROJECT = Path(__file__).resolve().parents[3]  # src/crossdistill/data/sources.py -> repo
MAX_IDX_BYTES = 1 << 30  # 1 GiB decompressed: MNIST's largest file is 47 MB
PIXEL_MAX = {"digits": 16, "mnist": 255}  # raw pixel range of each image source (x / max)
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / float(PIXEL_MAX["digits"]))[:, None]  # (1797, 1, 8, 8)
    return x, d.target.astype(np.int64)


def _read(path: Path, field: str) -> bytes:
    """The (decompressed) bytes of ``path``; a bad or truncated gzip is one ConfigError."""
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            data = f.read(MAX_IDX_BYTES + 1)
    except EOFError:
        raise ConfigError(field, str(path), "truncated gzip file (it ends mid-stream)") from None
    except (OSError, zlib.error) as err:
        why = getattr(err, "strerror", None) or str(err) or type(err).__name__
        raise ConfigError(field, str(path), f"not a readable gzip/IDX file ({why})") from None
    if len(data) > MAX_IDX_BYTES:
        raise ConfigError(field, str(path), f"larger than {MAX_IDX_BYTES:,} bytes; not MNIST")
    return data


def read_idx(path: Path, field: str = "data.root") -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format), gzipped or not: magic ``00 00 TYPE NDIM``,
    NDIM big-endian uint32 sizes, then the values. Every defect is one ConfigError."""
    path = Path(path)
    data = _read(path, field)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ConfigError(
            field, str(path), f"not an IDX file (bad magic number {data[:4].hex() or 'empty'})"
        )
    if data[2] not in IDX_DTYPES:
        raise ConfigError(field, str(path), f"not an IDX file (unknown data type 0x{data[2]:02x})")
    ndim = data[3]
    if ndim == 0:
        raise ConfigError(field, str(path), "IDX header declares 0 dimensions")
    start = 4 + 4 * ndim
    if len(data) < start:
        raise ConfigError(
            field, str(path), f"short IDX header: {ndim} sizes need {start} bytes, file has "
            f"{len(data)}"
        )
    dims = struct.unpack(">" + "I" * ndim, data[4:start])
    dtype = np.dtype(IDX_DTYPES[data[2]])
    want, have = math.prod(dims) * dtype.itemsize, len(data) - start
    if have != want:
        what = "truncated IDX file" if have < want else "IDX file with trailing bytes"
        raise ConfigError(
            field, str(path), f"{what}: header says {dims} ({want:,} bytes), body has {have:,}"
        )
    return np.frombuffer(data, dtype=dtype, offset=start).reshape(dims)


def _find(root: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem, stem.replace("-idx", ".idx")):
        if (root / name).is_file():
            return root / name
    return None


def _default_roots() -> list[Path]:
    """The default MNIST places, as real paths: ``$CROSSDISTILL_DATA`` (when set), then
    paths relative to the project, not to the working directory."""
    out = []
    for r in MNIST_DEFAULT_ROOTS:
        if "$" in r:
            if not os.environ.get("CROSSDISTILL_DATA"):
                continue
            r = os.path.expandvars(r)
        p = Path(r)
        out.append(p if p.is_absolute() else (PROJECT / p).resolve())
    return out


def find_mnist_root(root: str | None) -> Path:
    candidates = [Path(root)] if root else _default_roots()
    for p in candidates:
        if _find(p, "t10k-images-idx3-ubyte") or _find(p, "train-images-idx3-ubyte"):
            return p
    tried = ", ".join(str(p if p.is_absolute() else p.resolve()) for p in candidates)
    raise ConfigError(
        "data.root",
        root,
        f"no MNIST IDX files there (tried {tried}); give a directory holding "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz "
        "(and optionally train-*), or set $CROSSDISTILL_DATA",
    )


def mnist(root: str | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every MNIST part present under ``root``: {"t10k": (x, y)} and, if present, {"train": ...}."""
    r = find_mnist_root(root)
    parts = {}
    for part in ("train", "t10k"):
        ximg, ylab = _find(r, f"{part}-images-idx3-ubyte"), _find(r, f"{part}-labels-idx1-ubyte")
        if bool(ximg) != bool(ylab):
            have, want = (ximg, "labels-idx1") if ximg else (ylab, "images-idx3")
            raise ConfigError(
                "data.root", str(r), f"has {Path(have).name} but no {part}-{want}-ubyte[.gz] "
                "beside it; MNIST needs both the images and the labels file"
            )
        if ximg and ylab:
            x, y = read_idx(ximg), read_idx(ylab)
            if x.ndim != 3 or y.ndim != 1:
                bad, arr = (ximg, x) if x.ndim != 3 else (ylab, y)
                raise ConfigError(
                    "data.root", str(bad), f"IDX file of shape {arr.shape}; MNIST images are "
                    "(N, H, W) and labels (N,)"
                )
            x, y = x.astype(np.float32)[:, None] / float(PIXEL_MAX["mnist"]), y.astype(np.int64)
            if len(x) != len(y):
                raise ConfigError(
                    "data.root", str(r), f"{part}: {len(x)} images but {len(y)} labels"
                )
            parts[part] = (x, y)
    return parts
