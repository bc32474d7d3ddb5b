import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import crossdistill as cd
from crossdistill import ConfigError, Distiller, Term, Trainer
from crossdistill.teachers import Mixture, TeacherStore, cache_teacher, topk_decode, weights_hash
from crossdistill.teachers.mixture import combine


def _teacher(seed=0, classes=10):
    torch.manual_seed(seed)
    return cd.models.create(
        "cnn", num_classes=classes, in_channels=1, img_size=8, channels=(8, 16, 16)
    ).eval()


def test_store_round_trip_exact_in_float32(tmp_path, digits):
    t = _teacher()
    cache_teacher(
        t,
        digits["train"],
        tmp_path,
        taps=["stage2", "fc:input"],
        dtype="float32",
        batch_size=64,
        shard_size=70,
        progress=False,
    )
    store = TeacherStore(tmp_path)
    assert len(store.manifest["shards"]) > 1  # sharded
    ids = digits["train"].idx[[5, 0, 17]]
    x = digits["train"].x[[5, 0, 17]]
    with torch.no_grad():
        ref = t(x)
    torch.testing.assert_close(store.lookup(ids, "logits"), ref)
    assert store.lookup(ids, "stage2").shape == (3, 16, 2, 2)
    m = store.manifest
    assert m["teacher_hash"] == weights_hash(t) and m["data_fingerprint"]
    assert m["bytes_per_sample"] == 8 + 4 * (10 + 16 * 2 * 2 + 16)


def test_topk_bytes_and_reconstruction_bound(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(64, 1, 8, 8)
    data = cd.data.Dataset.classification(
        x,
        torch.zeros(64, dtype=torch.long),
        torch.arange(64),
        "toy",
        num_classes=100,
        info={"mean": 0.0, "std": 1.0},
    )
    t = cd.models.create("mlp", num_classes=100, in_channels=1, img_size=8, hidden=(32,)).eval()
    with torch.no_grad():
        for p in t.parameters():
            p.mul_(4)  # peakier logits, like a trained teacher
    cache_teacher(t, data, tmp_path, topk=8, progress=False)
    store = TeacherStore(tmp_path)
    assert store.manifest["bytes_per_sample"] <= 40  # idx 8 + values 16 + indices 8 + lse 2
    with torch.no_grad():
        p_true = F.softmax(t(x), 1)
    p_rec = F.softmax(store.lookup(torch.arange(64), "logits"), 1)
    rest = 1 - p_true.topk(8, 1).values.sum(1)
    l1 = (p_rec - p_true).abs().sum(1)
    assert (l1 <= 2 * rest + 5e-3).all()
    assert torch.allclose(p_rec.sum(1), torch.ones(64), atol=1e-3)


def test_topk_decode_golden():
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    lse = torch.logsumexp(z, 1)
    vals, ids = z.topk(2, 1)
    rec = topk_decode(vals, ids, lse, 4)
    p = np.exp([2.0, 1.0, 0.0, -1.0])
    p /= p.sum()
    rest = (1 - p[0] - p[1]) / 2
    np.testing.assert_allclose(F.softmax(rec, 1)[0].numpy(), [p[0], p[1], rest, rest], rtol=1e-6)


def test_store_refuses_other_teacher_data_transform(tmp_path, digits):
    t = _teacher()
    cache_teacher(t, digits["train"], tmp_path, progress=False)
    store = TeacherStore(tmp_path)
    store.check(teacher_hash=weights_hash(t), data=digits["train"])
    with pytest.raises(ConfigError, match="another teacher"):
        store.check(teacher_hash=weights_hash(_teacher(seed=1)))
    with pytest.raises(ConfigError, match="split"):
        store.check(data=digits["val"])
    with pytest.raises(ConfigError, match="img_size"):
        store.check(data=cd.data.load("digits", "train", img_size=16, limit=200))
    with pytest.raises(ConfigError, match="manifest"):
        TeacherStore(tmp_path / "nope")


def test_training_from_store_equals_online(tmp_path, digits):
    t = _teacher()
    cache_teacher(t, digits["train"], tmp_path, taps=["fc:input"], dtype="float32", progress=False)

    def run(teacher):
        torch.manual_seed(3)
        s = cd.models.create("mlp", num_classes=10, in_channels=1, img_size=8, hidden=(16,))
        d = Distiller(
            s,
            teacher,
            [
                Term("ce"),
                Term("kd"),
                Term("mse", student="fc:input", teacher="fc:input", projector="linear", weight=1.0),
            ],
        )
        Trainer(d, digits["train"], epochs=2, batch_size=32, progress=False).fit()
        return s.state_dict()

    online, stored = run(t), run(TeacherStore(tmp_path))
    for k in online:
        torch.testing.assert_close(online[k], stored[k], rtol=1e-5, atol=1e-6)


def test_store_with_augmentation_is_refused(tmp_path, digits):
    cache_teacher(_teacher(), digits["train"], tmp_path, progress=False)
    s = cd.models.create("mlp", num_classes=10, in_channels=1, img_size=8, hidden=(16,))
    d = Distiller(s, TeacherStore(tmp_path), [Term("kd")])
    with pytest.raises(ConfigError, match="augment"):
        Trainer(d, digits["train"], epochs=1, augment_shift=1, progress=False).fit()
    with pytest.raises(ConfigError, match="not in the teacher store"):
        Distiller(s, TeacherStore(tmp_path), [Term("mse", student="fc:input", teacher="stage2")])


# -- mixtures -----------------------------------------------------------------------------
def _probs(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_mixture_weights_golden():
    za = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    zb = torch.tensor([[0.0, 1.0, 0.0], [0.0, 3.0, 0.0]])
    y = torch.tensor([0, -1])
    pa, pb = _probs(za.numpy()), _probs(zb.numpy())
    ent = lambda p: -(p * np.log(p)).sum(-1)  # noqa: E731
    mix = Mixture("entropy", tau=0.5)
    mix.setup(["a", "b"], 3)
    _, w, _ = mix({"a": za, "b": zb})
    e = np.stack([-ent(pa) / 0.5, -ent(pb) / 0.5], 1)
    np.testing.assert_allclose(w.numpy(), _probs(e), rtol=1e-5)
    mix = Mixture("true_class", tau=0.5)
    mix.setup(["a", "b"], 3)
    _, w, _ = mix({"a": za, "b": zb}, y)
    row0 = _probs(np.array([pa[0, 0], pb[0, 0]]) / 0.5)
    np.testing.assert_allclose(w[0].numpy(), row0, rtol=1e-5)
    np.testing.assert_allclose(w[1].numpy(), _probs(e)[1], rtol=1e-5)  # unlabelled -> entropy
    mix = Mixture("fixed", weights={"a": 3.0, "b": 1.0})
    mix.setup(["a", "b"], 3)
    mixed, w, aux = mix({"a": za, "b": zb})
    assert aux is None and torch.allclose(w, torch.tensor([[0.75, 0.25]] * 2))
    np.testing.assert_allclose(np.exp(mixed.numpy()), 0.75 * pa + 0.25 * pb, rtol=1e-5)
    lin = combine(torch.stack([za, zb], 1), w, "logit")
    np.testing.assert_allclose(lin.numpy(), 0.75 * za.numpy() + 0.25 * zb.numpy(), rtol=1e-6)


def test_mixture_errors():
    with pytest.raises(ConfigError, match="mixture.mode"):
        Mixture("vote")
    m = Mixture("fixed", weights={"a": 1.0})
    with pytest.raises(ConfigError, match="one weight per teacher"):
        m.setup(["a", "b"], 3)


def test_router_trains_with_the_student(digits):
    t1, t2 = _teacher(0), _teacher(1)
    s = cd.models.create("mlp", num_classes=10, in_channels=1, img_size=8, hidden=(16,))
    d = Distiller(s, {"a": t1, "b": t2}, [Term("ce"), Term("kd")], mixture=Mixture("router"))
    assert d.terms[1].teacher_model == "mix"
    b = digits["train"].batch(torch.arange(16))
    out = d(b)
    assert "mixture_router" in out.losses
    out.total.backward()
    assert all(p.grad is not None for p in d.mixture.router.parameters())
    assert all(p.grad is None for p in d.teachers.parameters())
    res = Trainer(d, digits["train"], digits["val"], epochs=1, batch_size=32, progress=False).fit()
    assert math.isfinite(res["best_val_acc"])


def test_mixture_from_stores_equals_online(tmp_path, digits):
    t1, t2 = _teacher(0), _teacher(1)
    for name, t in (("a", t1), ("b", t2)):
        cache_teacher(t, digits["train"], tmp_path / name, dtype="float32", progress=False)
    b = digits["train"].batch(torch.arange(8))
    s = cd.models.create("mlp", num_classes=10, in_channels=1, img_size=8, hidden=(16,))
    online = Distiller(s, {"a": t1, "b": t2}, [Term("kd")], mixture=Mixture("entropy"))
    stored = Distiller(
        s,
        {"a": TeacherStore(tmp_path / "a"), "b": TeacherStore(tmp_path / "b")},
        [Term("kd")],
        mixture=Mixture("entropy"),
    )
    torch.testing.assert_close(online(b).total, stored(b).total)
    with pytest.raises(ConfigError, match="only 'logits'"):
        Distiller(
            s,
            {"a": t1, "b": t2},
            [Term("mse", teacher="fc:input", teacher_model="mix")],
            mixture=Mixture(),
        )
