"""The MNIST -> sklearn-digits domain pair (cross-domain KD data) and its paired source."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from crossdistill import evaluate
from crossdistill.data import DATASETS, load_split
from crossdistill.data.domains import balanced_pairs, domain_splits, mnist_digits
from crossdistill.data.sources import find_mnist_root
from crossdistill.errors import ConfigError


@pytest.fixture(scope="module")
def mnist_root():
    try:
        return str(find_mnist_root(None))
    except ConfigError:
        pytest.skip("MNIST (../shared/data/mnist-t10k) absent")


@pytest.fixture(scope="module")
def pair(mnist_root):
    return domain_splits("test", root=mnist_root, limit=200)


def test_balanced_pairs_use_every_sample_evenly():
    s, t = balanced_pairs(10, 4, seed=0)
    assert torch.equal(s, torch.arange(10)) and len(t) == 10
    counts = torch.bincount(t, minlength=4)
    assert counts.min() >= 2 and counts.max() <= 3
    s, t = balanced_pairs(3, 7, seed=0)
    assert torch.equal(t, torch.arange(7)) and set(s.tolist()) == {0, 1, 2}
    s, t = balanced_pairs(5, 5, seed=0)
    assert sorted(t.tolist()) == list(range(5))  # equal sizes: a permutation
    assert torch.equal(balanced_pairs(10, 4, 3)[1], balanced_pairs(10, 4, 3)[1])
    assert not torch.equal(balanced_pairs(50, 40, 0)[1], balanced_pairs(50, 40, 1)[1])


def test_domain_splits_formats(pair):
    source, target = pair
    assert source.x.shape == (200, 1, 28, 28) and target.x.shape == (360, 1, 28, 28)
    assert "y" not in target and target["target_y"].shape == (360,)
    assert set(target["target_y"].tolist()) == set(range(10))
    # both standardised with the source's train statistics: one input pipeline
    mean, std = source.info["mean"], source.info["std"]
    assert target.info["mean"] == mean and target.info["std"] == std
    raw = target.x * std + mean
    assert torch.allclose(raw.amax(dim=(1, 2, 3)), torch.ones(360), atol=1e-5)  # peak 1
    assert raw.min() >= -1e-5
    # MNIST's frame: a 20x20 digit box centred, 4 blank (background) pixels each side
    border = raw.clone()
    border[:, :, 4:24, 4:24] = 0
    assert border.abs().max() < 1e-6 and raw[:, :, 4:24, 4:24].amax() > 0.99


def test_fill_frame_is_the_larger_gap(mnist_root, pair):
    source, boxed = pair
    _, filled = domain_splits("test", root=mnist_root, limit=200, target_frame="fill")
    assert filled.x.shape == boxed.x.shape and filled.info["target_frame"] == "fill"
    # digits filling the frame: far more ink than MNIST's; the box is closer to the source
    assert filled.x.mean() > source.x.mean() + 0.3
    assert abs(boxed.x.mean() - source.x.mean()) < abs(filled.x.mean() - source.x.mean())
    with pytest.raises(ConfigError, match="target_frame"):
        domain_splits("test", root=mnist_root, limit=20, target_frame="centre")


def test_mnist_digits_pairs_and_hides_train_target_labels(mnist_root):
    kw = dict(root=mnist_root, limit={"train": 300, "val": 100, "test": 360})
    test = mnist_digits("test", **kw)
    assert test.keys() == ["source", "y", "target", "target_y", "source_idx", "target_idx", "idx"]
    assert test.kinds["target"] == "image" and test.kinds["target_y"] == "label"
    assert len(test) == 360 and sorted(test["target_idx"].tolist()) == sorted(
        set(test["target_idx"].tolist())
    )  # equal sizes: each target test image exactly once
    assert (test["target_y"] >= 0).all()
    train = mnist_digits("train", **kw)
    assert len(train) == 1077  # the larger side (the target's train split) sets the length
    assert (train["target_y"] == -100).all()  # evaluation only
    assert (mnist_digits("train", **kw, train_target_labels=True)["target_y"] >= 0).all()
    assert set(train["idx"].tolist()).isdisjoint(test["idx"].tolist())
    again = mnist_digits("test", **kw)
    assert torch.equal(again["target_idx"], test["target_idx"])
    other = mnist_digits("test", **kw, pair_seed=1)
    assert not torch.equal(other["target_idx"], test["target_idx"])
    assert torch.equal(other["source"], test["source"])


def test_registered_source_and_target_accuracy(mnist_root):
    assert DATASETS.meta("mnist_digits")["splits"]
    data = load_split("mnist_digits", "val", root=mnist_root, limit=50, target_limit=40)
    assert len(data) == 50

    class Oracle(nn.Module):  # "predicts" a label hidden in the image's first pixel
        def forward(self, x):
            return nn.functional.one_hot(x[:, 0, 0, 0].long(), 10).float()

    d = {k: v.clone() for k, v in data.tensors.items()}
    d["source"][:, 0, 0, 0] = d["y"].float()
    d["target"][:, 0, 0, 0] = ((d["target_y"] + 1) % 10).float()  # wrong on every target
    from crossdistill.data import Dataset

    ds = Dataset(d, data.kinds)
    target_task = {"name": "classification", "target": "target_y", "inputs": ["target"]}
    assert evaluate(Oracle(), ds, task=target_task)["acc"] == 0.0
    both = {
        "name": "classification",
        "inputs": ["source"],
        "views": {"target": {"replace": {"source": "target", "y": "target_y"}}},
    }
    m = evaluate(Oracle(), ds, task=both)
    assert m["acc"] == 1.0 and m["target_acc"] == 0.0
    with pytest.raises(ConfigError, match="data.limit"):
        load_split("mnist_digits", "val", root=mnist_root, limit=0)
    with pytest.raises(ConfigError, match="data.split"):
        mnist_digits("dev", root=mnist_root)


def test_config_validates_mnist_digits_params(mnist_root):
    from crossdistill.config import validate

    cfg = {
        "student": {"model": "cnn", "inputs": ["source"]},
        "data": {"name": "mnist_digits", "root": mnist_root, "params": {"pair_seed": 3}},
    }
    assert validate(cfg).data.params["pair_seed"] == 3
    with pytest.raises(ConfigError, match="pair_seed"):
        validate({**cfg, "data": {**cfg["data"], "params": {"pair_seed": -1}}})
    with pytest.raises(ConfigError, match="shuffle"):  # at load, before any model is built
        load_split("mnist_digits", "val", root=mnist_root, shuffle=True)
