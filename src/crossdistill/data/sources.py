"""Raw dataset readers: each returns uint8/float images (N, C, H, W) in [0, 1] and labels.

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images), embedded, offline.
* ``mnist``: the standard IDX files (``*-images-idx3-ubyte[.gz]``, ``*-labels-idx1-ubyte[.gz]``)
  in a directory the user gives; by default ``../shared/data/mnist-t10k``.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from ..errors import ConfigError

MNIST_DEFAULT_ROOTS = (
    "$CROSSDISTILL_DATA/mnist-t10k",
    "../shared/data/mnist-t10k",
    "data/mnist-t10k",
)


def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]  # (1797, 1, 8, 8)
    return x, d.target.astype(np.int64)


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format), gzipped or not."""
    with _open(path) as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ConfigError("data.root", str(path), "not an IDX file (bad magic number)")
    dtype = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtype[data[2]], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ConfigError(
            "data.root", str(path), f"truncated IDX file: {arr.size} values for {dims}"
        )
    return arr.reshape(dims)


def _find(root: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem, stem.replace("-idx", ".idx")):
        if (root / name).is_file():
            return root / name
    return None


def find_mnist_root(root: str | None) -> Path:
    candidates = [root] if root else [os.path.expandvars(r) for r in MNIST_DEFAULT_ROOTS]
    for c in candidates:
        p = Path(c)
        if _find(p, "t10k-images-idx3-ubyte") or _find(p, "train-images-idx3-ubyte"):
            return p
    raise ConfigError(
        "data.root",
        root or candidates,
        "no MNIST IDX files there; give a directory holding "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz "
        "(and optionally train-*)",
    )


def mnist(root: str | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every MNIST part present under ``root``: {"t10k": (x, y)} and, if present, {"train": ...}."""
    r = find_mnist_root(root)
    parts = {}
    for part in ("train", "t10k"):
        ximg, ylab = _find(r, f"{part}-images-idx3-ubyte"), _find(r, f"{part}-labels-idx1-ubyte")
        if ximg and ylab:
            x = read_idx(ximg).astype(np.float32)[:, None] / 255.0
            y = read_idx(ylab).astype(np.int64)
            if len(x) != len(y):
                raise ConfigError(
                    "data.root", str(r), f"{part}: {len(x)} images but {len(y)} labels"
                )
            parts[part] = (x, y)
    return parts
