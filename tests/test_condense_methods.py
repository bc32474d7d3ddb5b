"""DC/DSA, DM, MTT, NCFM and FYI: golden values, float64 gradchecks, tiny end-to-end runs."""

import numpy as np
import pytest
import torch

from crossdistill.condense import CONDENSERS, RealSampler
from crossdistill.condense import harness as H
from crossdistill.condense.dc import gradient_distance, official_loops
from crossdistill.condense.dm import dm_loss
from crossdistill.condense.ncfm import NCFM, SamplingNet, ncfd
from crossdistill.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = {"net_kw": {"width": 8, "depth": 2}, "batch_real": 8}


def test_dm_loss_golden_and_gradcheck():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 4)), rng.normal(size=(3, 4))
    expect = ((a.mean(0) - b.mean(0)) ** 2).sum()
    assert dm_loss(torch.tensor(a), torch.tensor(b)).item() == pytest.approx(expect)
    s = torch.tensor(b, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: dm_loss(torch.tensor(a), t), (s,))


def _ncfd_numpy(fr, fs, t, alpha, scale):
    fr = fr / np.linalg.norm(fr, axis=1, keepdims=True)
    fs = fs / np.linalg.norm(fs, axis=1, keepdims=True)
    pr = np.exp(1j * t @ fr.T).mean(1)  # empirical characteristic functions
    ps = np.exp(1j * t @ fs.T).mean(1)
    amp = (np.abs(pr) - np.abs(ps)) ** 2
    pha = np.maximum(2 * (np.abs(pr) * np.abs(ps) - (pr * np.conj(ps)).real), 1e-12)
    return scale * np.sqrt(alpha * amp + (1 - alpha) * pha).mean()


def test_ncfd_golden_and_gradcheck():
    rng = np.random.default_rng(1)
    fr, fs, t = rng.normal(size=(6, 5)), rng.normal(size=(4, 5)), rng.normal(size=(7, 5))
    got = ncfd(torch.tensor(fr), torch.tensor(fs), torch.tensor(t), alpha=0.3, scale=300.0)
    assert got.item() == pytest.approx(_ncfd_numpy(fr, fs, t, 0.3, 300.0), rel=1e-10)
    s = torch.tensor(fs, requires_grad=True)
    tt = torch.tensor(t, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ncfd(torch.tensor(fr), a, b), (s, tt))
    # identical distributions -> (clamped) zero discrepancy
    same = ncfd(torch.tensor(fr), torch.tensor(fr), torch.tensor(t))
    assert same.item() == pytest.approx(300 * np.sqrt(0.5 * 1e-12), abs=1e-6)


def test_gradient_distance_golden_and_gradcheck():
    rng = np.random.default_rng(2)
    shapes = [(3, 2, 2, 2), (3,), (4, 5)]
    gs = [rng.normal(size=s) for s in shapes]
    gr = [rng.normal(size=s) for s in shapes]
    expect = 0.0
    for a, b in zip(gs, gr):
        if a.ndim == 1:
            continue
        a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-6)
        expect += (1 - cos).sum()
    got = gradient_distance([torch.tensor(a) for a in gs], [torch.tensor(b) for b in gr])
    assert got.item() == pytest.approx(expect)
    ts = [torch.tensor(a, requires_grad=True) for a in gs]
    assert torch.autograd.gradcheck(
        lambda *t: gradient_distance(t, [torch.tensor(b) for b in gr]), tuple(ts)
    )


def test_official_loops():
    assert official_loops(1) == (1, 1) and official_loops(10) == (10, 50)
    assert official_loops(50) == (50, 10)


MINE = ["dc", "dsa", "dm", "mtt", "ncfm", "dc+fyi", "dsa+fyi", "dm+fyi", "mtt+fyi", "ncfm+fyi"]


def _extra(name):
    if name.startswith("mtt"):
        return {"num_experts": 1, "syn_steps": 2, "max_start_epoch": 1, "expert_epochs": 1}
    if name.startswith("ncfm"):
        return {"num_freqs": 32, "t_repeat": 4}
    if name.startswith(("dc", "dsa")):
        return {"outer_loop": 2, "inner_loop": 1}
    return {}


@pytest.mark.parametrize("name", MINE)
def test_end_to_end_tiny(name, digits):
    syn = H.synthesize(
        name, digits["train"], ipc=1, iterations=2, seed=0, progress=False, **TINY, **_extra(name)
    )
    assert syn.x.shape == (10, 1, 8, 8) and torch.equal(syn.y, torch.arange(10))
    assert torch.isfinite(syn.x).all()
    init = H.random_subset(digits["train"], 1, seed=0).x  # init draws the same real images
    assert not torch.allclose(syn.x, init)  # the pixels were optimised
    m = syn.meta
    assert m["method"] == name and m["synth_seconds"] > 0 and m["peak_mem_mib"] > 0
    assert m["fyi"] == name.endswith("+fyi")


def test_deterministic(digits):
    a = H.synthesize("dm", digits["train"], ipc=2, iterations=3, seed=5, progress=False, **TINY)
    b = H.synthesize("dm", digits["train"], ipc=2, iterations=3, seed=5, progress=False, **TINY)
    assert torch.equal(a.x, b.x)


def test_dm_loss_decreases_with_fixed_net(digits):
    """With DSA off and a single fixed network, DM's objective goes down."""
    cls = CONDENSERS.get("dm")
    c = cls(
        ipc=2,
        num_classes=10,
        input_shape=(1, 8, 8),
        seed=0,
        dsa=False,
        lr_img=0.5,
        net_kw={"width": 8, "depth": 2},
        batch_real=10,
    )
    real = RealSampler(digits["train"], seed=0)
    c.init(real)
    net = c.new_net()
    c.new_net = lambda: net
    first = c.step(real, 0)["loss"]
    for i in range(15):
        last = c.step(real, i)["loss"]
    assert last < 0.5 * first


def test_fyi_doubles_the_matched_batch():
    c = CONDENSERS.get("dm+fyi")(
        ipc=2, num_classes=3, input_shape=(1, 4, 4), init="noise", net_kw={"width": 4, "depth": 1}
    )
    c.init(None)
    s = c.class_syn(1)
    assert s.shape[0] == 4 and torch.equal(s[2:], c.x_syn[2:4].flip(-1))
    assert len(c.synthetic()) == 6  # the saved set is S only


def test_ncfm_sampling_net_really_ascends(digits):
    """The official step cancels the sampler's gradient; ours must move it, uphill."""
    c = NCFM(
        ipc=1,
        num_classes=10,
        input_shape=(1, 8, 8),
        seed=0,
        num_freqs=16,
        t_repeat=4,
        lr_sampling_net=0.1,
        **TINY,
    )
    real = RealSampler(digits["train"], seed=0)
    c.init(real)
    c.step(real, 0)
    before = [p.detach().clone() for p in c.sampler.parameters()]
    c.step(real, 1)
    moved = any(not torch.equal(a, b) for a, b in zip(before, c.sampler.parameters()))
    assert moved
    assert isinstance(c.sampler, SamplingNet)


def test_mtt_experts_recorded_with_trainer(digits):
    from crossdistill.condense.mtt import record_experts

    tr = digits["train"]
    ex = record_experts(
        tr.x,
        tr.y,
        10,
        net="convnet",
        net_kw={"width": 4, "depth": 1},
        n=1,
        epochs=2,
        lr=0.01,
        batch_size=64,
        seed=3,
    )
    assert len(ex) == 1 and len(ex[0]) == 3  # epochs 0, 1, 2
    assert not torch.equal(ex[0][0][0], ex[0][2][0])


@pytest.mark.parametrize(
    "kw,field",
    [
        ({"ipc": 0}, "condense.ipc"),
        ({"init": "zeros"}, "condense.init"),
        ({"net": "nonet"}, "condense.net"),
        ({"dsa_strategy": "blur"}, "dsa_strategy"),
        ({"lr_img": 0}, "condense.lr_img"),
    ],
)
def test_bad_input(kw, field):
    base = {"ipc": 1, "num_classes": 10, "input_shape": (1, 8, 8)}
    with pytest.raises(ConfigError, match=field):
        CONDENSERS.get("dsa")(**{**base, **kw})


def test_unknown_condenser():
    with pytest.raises(ConfigError, match="condense.method"):
        H.synthesize("dmm", None, ipc=1, iterations=1)


def test_mtt_learnable_soft_labels(digits):
    syn = H.synthesize(
        "mtt",
        digits["train"],
        ipc=1,
        iterations=2,
        seed=0,
        progress=False,
        learn_labels=True,
        lr_label=1.0,
        **TINY,
        **_extra("mtt"),
    )
    assert syn.soft is not None and syn.soft.shape == (10, 10)
    assert not torch.allclose(syn.soft, 5.0 * torch.eye(10))  # the labels were learned
    assert syn.soft.argmax(1).tolist() == list(range(10))
