import gzip
import struct

import numpy as np
import pytest
import torch

import crossdistill as cd
from crossdistill import ConfigError
from crossdistill.data import Batches, stratified_split


def test_digits_splits_fixed_disjoint_stratified():
    parts = {s: cd.data.load("digits", s) for s in cd.data.SPLITS}
    assert [len(parts[s]) for s in cd.data.SPLITS] == [1077, 360, 360]
    ids = [set(parts[s].idx.tolist()) for s in cd.data.SPLITS]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    counts = parts["test"].y.bincount()
    assert counts.max() - counts.min() <= 3
    again = cd.data.load("digits", "test")
    assert torch.equal(again.idx, parts["test"].idx) and torch.equal(again.x, parts["test"].x)
    assert abs(float(parts["train"].x.mean())) < 1e-4


def test_stratified_split_exact_sizes():
    y = np.repeat(np.arange(3), [50, 30, 20])
    s = stratified_split(y, {"a": 10, "b": 40}, seed=1)
    assert len(s["a"]) == 10 and len(s["b"]) == 40 and not set(s["a"]) & set(s["b"])
    assert list(np.bincount(y[s["a"]])) == [5, 3, 2]


def _write_idx(path, arr, code):
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, code, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape))
        f.write(arr.tobytes())


def test_mnist_reader_user_path(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (100, 28, 28), dtype=np.uint8)
    y = np.repeat(np.arange(10), 10).astype(np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", x, 0x08)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", y, 0x08)
    tr = cd.data.load("mnist", "train", root=str(tmp_path))
    te = cd.data.load("mnist", "test", root=str(tmp_path))
    assert tr.x.shape[1:] == (1, 28, 28) and len(tr) == 60 and len(te) == 20
    raw = x[te.idx[0].item()].astype(np.float32) / 255
    assert np.allclose(te.x[0, 0].numpy() * te.info["std"] + te.info["mean"], raw, atol=1e-5)


def test_mnist_missing_path_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="data.root"):
        cd.data.load("mnist", root=str(tmp_path / "nope"))


def test_labelled_subset_and_batches(digits):
    d = cd.data.load("digits", "train", labelled=50)
    assert (d.y >= 0).sum() == 50
    b = Batches(digits["train"], 32, seed=3, shift=1)
    e0 = list(b.epoch(0))
    assert sum(len(x["y"]) for x in e0) == 200
    assert set(e0[0]) == {"x", "y", "idx"}
    resumed = list(b.epoch(0, start=2))
    assert torch.equal(resumed[0]["x"], e0[2]["x"])
    r0 = Batches(digits["train"], 32, world=2, rank=0)
    r1 = Batches(digits["train"], 32, world=2, rank=1)
    ids = torch.cat([x["idx"] for x in r0.epoch(0)] + [x["idx"] for x in r1.epoch(0)])
    assert set(ids.tolist()) == set(digits["train"].idx.tolist())


def test_mnist_shared_copy_if_present():
    try:
        d = cd.data.load("mnist", "val")
    except ConfigError:
        pytest.skip("../shared/data/mnist-t10k not present")
    assert len(d) == 2000
