"""SRe2L-family condensers: sre2l, cvdd, infer, nrr (and their shared pieces in sre2l.py)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from crossdistill.condense import CONDENSERS, RealSampler
from crossdistill.condense.infer import infer_budget
from crossdistill.condense.nrr import (
    dbr_encode,
    dbr_loss,
    dbr_reconstruct,
    grad_cam,
    noncritical_mask,
)
from crossdistill.condense.sre2l import (
    BNStatsHooks,
    EnsembleRelabel,
    bn_batch_statistics,
    bn_matching_loss,
    committee_weights,
    jitter,
    random_resized_crop,
    train_models,
)
from crossdistill.data import load
from crossdistill.errors import ConfigError


# -- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def real():
    return RealSampler(load("digits", "train", limit=300), seed=0)


TINY = {"model": "cnn", "channels": (8, 16, 16)}


@pytest.fixture(scope="module")
def trained(real, tmp_path_factory):
    """Two tiny CNNs trained 2 epochs (cached in a temp dir)."""
    cache = tmp_path_factory.mktemp("cache")
    models, accs = train_models([TINY, TINY], real, epochs=2, seed=0, cache_dir=cache)
    return models, accs, cache


def _common(**kw):
    return dict(num_classes=10, input_shape=(1, 8, 8), seed=0, **kw)


def _run(cond, real, iterations):
    cond.init(real)
    losses = [cond.step(real, it)["loss"] for it in range(iterations)]
    return losses, cond.synthetic()


# -- BN-statistics matching (golden values by hand) -----------------------------------------
def test_bn_matching_loss_golden():
    # channel 0 values {1,3,5,7}: mean 4, biased var 5; channel 1 all 0: mean 0, var 0
    feat = torch.tensor([[[[1.0, 3.0]], [[0.0, 0.0]]], [[[5.0, 7.0]], [[0.0, 0.0]]]])
    rm, rv = torch.tensor([1.0, 0.0]), torch.tensor([2.0, 4.0])
    # ||var - rv|| = ||(3, -4)|| = 5 ; ||mean - rm|| = ||(3, 0)|| = 3
    assert bn_matching_loss(feat, rm, rv).item() == pytest.approx(8.0)


def test_bn_matching_loss_groups_equal_separate_batches():
    torch.manual_seed(0)
    feat, rm, rv = torch.randn(6, 3, 4, 4), torch.randn(3), torch.rand(3)
    grouped = bn_matching_loss(feat, rm, rv, groups=3)
    sep = torch.stack([bn_matching_loss(feat[2 * g : 2 * g + 2], rm, rv) for g in range(3)])
    assert torch.allclose(grouped, sep, atol=1e-6)
    # numpy reference for group 0
    f = feat[:2].numpy().transpose(1, 0, 2, 3).reshape(3, -1)
    ref = np.linalg.norm(f.var(1) - rv.numpy()) + np.linalg.norm(f.mean(1) - rm.numpy())
    assert grouped[0].item() == pytest.approx(float(ref), rel=1e-5)
    with pytest.raises(ConfigError):
        bn_matching_loss(feat, rm, rv, groups=4)


def test_bn_matching_loss_gradcheck():
    torch.manual_seed(0)
    feat = torch.randn(4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64) + 2
    assert torch.autograd.gradcheck(lambda f: bn_matching_loss(f, rm, rv, groups=2), (feat,))


def test_bn_hooks_first_layer_multiplier():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)
    ).eval()
    for bn in (net[1], net[4]):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(4, 1, 6, 6)
    with BNStatsHooks(net, first_multiplier=10.0) as hooks:
        net(x)
        got = hooks.loss()
    a1 = net[0](x)
    a2 = net[3](net[2](net[1](a1)))
    want = 10 * bn_matching_loss(a1, net[1].running_mean, net[1].running_var) + bn_matching_loss(
        a2, net[4].running_mean, net[4].running_var
    )
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(ConfigError):
        BNStatsHooks(nn.Linear(2, 2))


# -- committee weighting, relabelling, augmentation -----------------------------------------
def test_committee_weights_golden():
    w = committee_weights([90.0, 95.0], tau=5.0)  # softmax([18, 19])
    e = math.e
    assert w.tolist() == pytest.approx([1 / (1 + e), e / (1 + e)], rel=1e-6)
    assert committee_weights([70, 70, 70], 10).tolist() == pytest.approx([1 / 3] * 3)
    with pytest.raises(ConfigError):
        committee_weights([1.0], tau=0)


def test_bssl_uses_batch_stats_and_leaves_running_stats():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.LazyLinear(4))
    net(torch.randn(2, 1, 5, 5))
    net.eval()
    net[1].running_mean.fill_(3.0)
    before = net[1].running_mean.clone()
    x = torch.randn(5, 1, 5, 5)
    with torch.no_grad(), bn_batch_statistics(net):
        a = net(x)
    assert torch.equal(net[1].running_mean, before) and not net[1].training
    bssl, evalm = EnsembleRelabel([net], bn="train")(x), EnsembleRelabel([net], bn="eval")(x)
    assert torch.allclose(bssl, a) and not torch.allclose(bssl, evalm)
    with pytest.raises(ConfigError):
        EnsembleRelabel([net], bn="bogus")


def test_augmentations_seeded_and_shape_preserving():
    x = torch.randn(3, 1, 8, 8)
    a = jitter(x, 1, torch.Generator().manual_seed(3))
    b = jitter(x, 1, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape
    c = random_resized_crop(x, torch.Generator().manual_seed(1))
    assert c.shape == x.shape and torch.isfinite(c).all()


# -- DBR (NRR-DD's two numbers per image) ---------------------------------------------------
def test_dbr_encode_and_reconstruct_golden():
    p = torch.tensor([[0.6, 0.1, 0.25, 0.05]])
    d_org, d_aug, r = dbr_encode(p.log(), torch.tensor([0]))
    assert r.item() == 2
    assert d_org.item() == pytest.approx(-math.log(0.6), rel=1e-5)
    assert d_aug.item() == pytest.approx(-math.log(0.25), rel=1e-5)
    q = dbr_reconstruct(
        torch.tensor([-math.log(0.7)]),
        torch.tensor([-math.log(0.2)]),
        torch.tensor([0]),
        torch.tensor([2]),
        4,
    ).exp()
    assert q[0].tolist() == pytest.approx([0.7, 0.05, 0.2, 0.05], abs=1e-6)
    with pytest.raises(ConfigError):
        dbr_reconstruct(d_org, d_aug, torch.tensor([0]), r, 2)


def test_dbr_loss_golden_and_gradcheck():
    s = torch.tensor([[0.0, 0.0, 0.0, 0.0]])  # student: uniform, CE to any one-hot = log 4
    got = dbr_loss(
        s, torch.tensor([0]), torch.tensor([1]), torch.tensor([1.0]), torch.tensor([2.0])
    )
    assert got.item() == pytest.approx(abs(math.log(4) - 1) + abs(math.log(4) - 2), rel=1e-6)
    torch.manual_seed(0)
    logits = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    y, r = torch.tensor([0, 1, 2]), torch.tensor([1, 2, 3])
    d1, d2 = torch.rand(3, dtype=torch.float64) * 0.1, torch.rand(3, dtype=torch.float64) + 5
    assert torch.autograd.gradcheck(lambda z: dbr_loss(z, y, r, d1, d2), (logits,))


def test_noncritical_mask_freezes_top_fraction():
    cam = torch.linspace(0, 1, 16).view(1, 4, 4)
    m = noncritical_mask(cam, 0.5)
    assert (m.flatten()[8:] == 0).all() and m.max().item() == pytest.approx(1.0)
    assert (m.flatten()[:7] > 0).all()


def test_infer_budget_counts_storage():
    assert infer_budget(10, 10, 4) == (7, 28)  # official CIFAR-10 setting: 70 + 28 <= 100
    assert infer_budget(10, 10, 3) == (7, 21)
    assert infer_budget(1, 10, 3, strict=True) == (1, 0)
    assert infer_budget(1, 10, 3, strict=False) == (1, 3)
    for ipc in (1, 2, 5, 10, 50):
        n_real, n_ufc = infer_budget(ipc, 10, 3)
        assert n_real * 10 + n_ufc <= ipc * 10


# -- end to end (toy size) ------------------------------------------------------------------
def test_squeeze_cache_roundtrip(real, trained):
    models, accs, cache = trained
    again, accs2 = train_models([TINY, TINY], real, epochs=2, seed=0, cache_dir=cache)
    assert accs2 == accs and 0 <= min(accs) <= max(accs) <= 100
    for a, b in zip(models, again):
        assert all(
            torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values())
        )


@pytest.mark.parametrize("size,bn", [(2, "train"), (1, "eval")])
def test_cvdd_end_to_end(real, trained, size, bn):
    models, accs, _ = trained
    cond = CONDENSERS.get("cvdd")(
        ipc=2,
        iterations=12,
        init="noise",
        models=models,
        model_accs=accs,
        committee_size=size,
        relabel_bn=bn,
        **_common(),
    )
    losses, syn = _run(cond, real, 12)
    assert syn.x.shape == (20, 1, 8, 8) and torch.isfinite(syn.x).all()
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert syn.relabel(syn.x).shape == (20, 10) and syn.temperature == 3.0
    assert syn.meta["committee_size"] == size and syn.meta["relabel_bn"] == bn
    assert len(syn.meta["committee"][0]) == size


def test_cvdd_pool_of_dict_entries_trains_and_names_them(real, trained):
    # a pool given as {"model": ..., **kw} entries (the benchmark's MNIST pool) must train,
    # recover and label its committee with readable names (a dict is no dict key)
    _, _, cache = trained
    cond = CONDENSERS.get("cvdd")(
        ipc=1, iterations=2, pool=[TINY, TINY], committee_epochs=2, cache_dir=cache, **_common()
    )
    _, syn = _run(cond, real, 2)
    assert syn.meta["committee_val_acc"] and all(
        isinstance(k, str) and k.startswith("cnn(") for k in syn.meta["committee_val_acc"]
    )


def test_sre2l_end_to_end(real, trained):
    models, accs, _ = trained
    cond = CONDENSERS.get("sre2l")(
        ipc=1, iterations=10, models=models, model_accs=accs, **_common()
    )
    losses, syn = _run(cond, real, 10)
    assert syn.x.shape == (10, 1, 8, 8) and losses[-1] < losses[0]
    assert syn.meta["committee_size"] == 1 and syn.meta["relabel_bn"] == "eval"


def test_infer_end_to_end(real, trained):
    models, _, _ = trained
    cond = CONDENSERS.get("infer")(ipc=2, iterations=12, models=models, **_common())
    losses, syn = _run(cond, real, 12)
    # int(2 / 1.2) = 1 real image per class + 2 UFCs (one per model): 12 stored <= 20
    assert (syn.meta["real_per_class"], syn.meta["ufcs"], syn.meta["stored_images"]) == (1, 2, 12)
    assert syn.x.shape == (30, 1, 8, 8) and torch.isfinite(syn.x).all()
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert syn.relabel(syn.x[:7]).shape == (7, 10) and syn.temperature == 30.0
    assert cond.compensators().shape == (2, 1, 8, 8)


def test_nrr_end_to_end(real, trained):
    models, _, _ = trained
    cond = CONDENSERS.get("nrr")(ipc=2, iterations=12, models=models[:1], **_common())
    losses, syn = _run(cond, real, 12)
    assert syn.x.shape == (20, 1, 8, 8) and torch.isfinite(syn.x).all()
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    frozen = cond.mask == 0
    assert frozen.float().mean() >= 0.45
    assert torch.equal(syn.x[frozen.cpu()], cond.x0.clamp(cond.lo, cond.hi)[frozen].cpu())
    assert not torch.equal(syn.x, cond.x0)
    assert syn.meta["stored_numbers"]["labels"] == 2 and syn.soft.shape == (20, 10)
    assert torch.allclose(syn.soft.exp().sum(1), torch.ones(20), atol=1e-5)
    cam = grad_cam(cond.model, cond.x0[:3], torch.tensor([0, 0, 1]), cond.model.stages[-1])
    assert cam.shape == (3, 8, 8) and cam.min() >= 0 and cam.max() <= 1


def test_config_errors(real, trained):
    models, _, _ = trained
    with pytest.raises(ConfigError):
        CONDENSERS.get("cvdd")(ipc=1, committee_size=3, models=models, **_common())
    with pytest.raises(ConfigError):
        CONDENSERS.get("cvdd")(ipc=1, voter="loud", **_common())
    with pytest.raises(ConfigError):
        CONDENSERS.get("cvdd")(ipc=1, relabel_bn="x", **_common())
    with pytest.raises(ConfigError):
        CONDENSERS.get("nrr")(ipc=1, select="best", **_common())
    with pytest.raises(ConfigError):
        CONDENSERS.get("nrr")(ipc=1, models=models, **_common())  # needs exactly one model
    with pytest.raises(ConfigError):
        CONDENSERS.get("infer")(ipc=1, init="noise", **_common())
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    cond = CONDENSERS.get("cvdd")(ipc=1, models=[mlp], committee_size=1, **_common())
    with pytest.raises(ConfigError):  # BN matching needs BatchNorm layers
        cond.init(real)


@pytest.mark.parametrize("name", ["cvdd", "infer", "nrr"])
def test_shipped_configs_validate(name):
    from pathlib import Path

    from crossdistill.condense import cli

    path = Path(__file__).parents[1] / "configs" / f"condense_{name}.yaml"
    cfg = cli.load_config(path)
    assert cfg.method == name
    cli.check_hyper(cfg.method, cfg.method_hyper())
