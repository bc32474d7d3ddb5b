"""Segmentation canvases (synthetic digits always; real MNIST when present) and seg-cnn."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from crossdistill.data.canvas import canvas_dataset, canvas_plan, make_canvases
from crossdistill.data.sources import find_mnist_root
from crossdistill.errors import ConfigError
from crossdistill.models import create, seg  # noqa: F401  (registers seg-cnn)


def fake_digits(n=20, h=8, w=6):
    """Solid blocks with a dim top row (0.3, below the ink threshold); the ink intensity
    (0.55..0.955) tells the class, so a model can learn the classes."""
    y = torch.arange(n) % 10
    x = torch.zeros(n, 1, h, w)
    x[:, :, 1:-1, 1:-1] = (0.55 + 0.045 * y).view(n, 1, 1, 1)
    x[:, :, 0, :] = 0.3
    return x, y


def test_make_canvases_shapes_values_and_determinism():
    x, y = fake_digits()
    canvas, s = make_canvases(x, y, 30, size=24, max_digits=3, seed=5)
    assert canvas.shape == (30, 1, 24, 24) and canvas.dtype == torch.float32
    assert s.shape == (30, 24, 24) and s.dtype == torch.long
    assert 0 <= canvas.min() and canvas.max() <= 1
    assert s.min() >= 0 and s.max() <= 10
    assert ((s > 0) == (canvas[:, 0] > 0.5)).all()  # labelled exactly where ink is
    assert (s > 0).flatten(1).any(1).all()  # every canvas has at least one digit
    a, b = make_canvases(x, y, 30, size=24, max_digits=3, seed=5)
    assert torch.equal(a, canvas) and torch.equal(b, s)
    c, _ = make_canvases(x, y, 30, size=24, max_digits=3, seed=6)
    assert not torch.equal(c, canvas)


def test_digit_counts_and_classes_follow_the_plan():
    x, y = fake_digits()
    count, src, top, left = canvas_plan(len(x), 200, 24, (8, 6), 4, seed=1)
    assert count.min() == 1 and count.max() == 4  # 1..max_digits, all reached
    _, s = make_canvases(x, y, 200, size=24, max_digits=4, seed=1)
    for i in range(20):
        used = {int(y[src[i, j]]) + 1 for j in range(int(count[i]))}
        assert set(s[i].unique().tolist()) - {0} <= used


def test_later_digit_wins_overlaps():
    x = torch.ones(2, 1, 4, 4)
    y = torch.tensor([3, 7])
    # max_digits=1 on a 4x4 canvas: the single digit covers everything
    _, s = make_canvases(x, y, 10, size=4, max_digits=1)
    count, src, _, _ = canvas_plan(2, 10, 4, (4, 4), 1, seed=0)
    assert torch.equal(s[:, 0, 0], y[src[:, 0]] + 1)
    # two digits at the same place: the label is the later one's
    count, src, _, _ = canvas_plan(2, 50, 4, (4, 4), 2, seed=0)
    _, s = make_canvases(x, y, 50, size=4, max_digits=2)
    last = src[torch.arange(50), count - 1]
    assert torch.equal(s[:, 2, 2], y[last] + 1)


def test_make_canvases_errors():
    x, y = fake_digits()
    with pytest.raises(ConfigError, match="data.size"):
        make_canvases(x, y, 2, size=4)
    with pytest.raises(ConfigError, match="data.images"):
        make_canvases(x[:, 0], y, 2)
    with pytest.raises(ConfigError, match="data.labels"):
        make_canvases(x, y[:3], 2)
    with pytest.raises(ConfigError, match="data.max_digits"):
        make_canvases(x, y, 2, max_digits=0)


@pytest.fixture(scope="module")
def mnist_root():
    try:
        return str(find_mnist_root(None))
    except ConfigError:
        pytest.skip("MNIST IDX files not present (../shared/data/mnist-t10k)")


def test_canvas_dataset_on_mnist(mnist_root):
    d = canvas_dataset("val", 40, root=mnist_root, size=48, max_digits=3, seed=2)
    assert d.keys() == ["image", "seg", "idx"]
    assert d.kinds == {"image": "image", "seg": "label_map", "idx": "id"}
    assert d["image"].shape == (40, 1, 48, 48) and d["seg"].shape == (40, 48, 48)
    assert d.num_classes == 11 and d.split == "val" and "construction" in d.info
    # normalised with the (fixed) train-canvas statistics: background is -mean/std
    bg = -d.info["mean"] / d.info["std"]
    assert abs(float(d["image"][:, 0][d["seg"] == 0].min()) - bg) < 1e-5
    again = canvas_dataset("val", 40, root=mnist_root, size=48, max_digits=3, seed=2)
    assert torch.equal(again["image"], d["image"]) and torch.equal(again["seg"], d["seg"])
    t = canvas_dataset("test", 40, root=mnist_root, size=48, max_digits=3, seed=2)
    assert t.info["mean"] == d.info["mean"]  # one normalisation for every split
    assert not torch.equal(t["seg"], d["seg"])
    raw = canvas_dataset("train", 5, root=mnist_root, normalize=False)
    assert raw["image"].min() >= 0 and raw["image"].max() <= 1 and "mean" not in raw.info
    with pytest.raises(ConfigError, match="data.split"):
        canvas_dataset("dev", 4, root=mnist_root)


def test_canvas_splits_use_disjoint_digits(mnist_root):
    from crossdistill.data import load

    used = {}
    for split in ("train", "val", "test"):
        src = load("mnist", split, root=mnist_root, normalize=False)
        count, ids, _, _ = canvas_plan(len(src), 100, 64, (28, 28), 4, seed=0)
        keep = torch.arange(4)[None] < count[:, None]
        used[split] = set(src.idx[ids[keep]].tolist())
    assert not used["train"] & used["val"] and not used["train"] & used["test"]
    assert not used["val"] & used["test"]


# -- seg-cnn --------------------------------------------------------------------------


def test_seg_cnn_shapes_taps_and_gradients():
    torch.manual_seed(0)
    model = create("seg-cnn", num_classes=11, in_channels=1, img_size=32, width=8)
    assert model.family == "seg" and model.feature_path == "head"
    modules = dict(model.named_modules())
    assert all(s in modules for s in model.stages) and "head" in modules
    seen = {}
    hooks = [
        modules[s].register_forward_hook(lambda m, i, o, s=s: seen.__setitem__(s, o.shape))
        for s in model.stages
    ]
    out = model(torch.randn(2, 1, 32, 32))
    for h in hooks:
        h.remove()
    assert out.shape == (2, 11, 32, 32)
    assert seen["enc3"] == (2, 32, 8, 8) and seen["dec2"] == (2, 8, 32, 32)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    odd = create("seg-cnn", num_classes=3, in_channels=3, width=4)(torch.randn(1, 3, 30, 27))
    assert odd.shape == (1, 3, 30, 27)
    with pytest.raises(ConfigError, match="width"):
        create("seg-cnn", width=0)


def test_seg_cnn_learns_synthetic_canvases(one_thread):
    x, y = fake_digits(10)
    canvas, s = make_canvases(x, y, 8, size=16, max_digits=2, seed=0)
    torch.manual_seed(0)
    model = create("seg-cnn", num_classes=11, img_size=16, width=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(canvas), s)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.4 * losses[0]
