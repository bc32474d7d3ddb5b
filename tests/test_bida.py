"""BiDA: MMD, soft CE and EMA consistency losses, the triple-branch model, the recipes and
a tiny end-to-end run on MNIST -> digits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import crossdistill as cd
from crossdistill.errors import ConfigError
from crossdistill.io import load_weights
from crossdistill.losses.domain import EMAConsistency, mmd, soft_ce
from crossdistill.methods import build
from crossdistill.models.bida import BiDA


def _bida(seed: int = 0, **kw) -> BiDA:
    torch.manual_seed(seed)
    return BiDA(cd.models.create("bida", **{"dim": 16, "depth": 1, "heads": 2, **kw}))


# -- MMD --------------------------------------------------------------------------------------
def test_mmd_golden_2x2():
    # x = {a=(0,0), b=(1,0)}, y = {c=(0,1), d=(1,1)}: squared distances ab=cd=ac=bd=1,
    # ad=bc=2; off-diagonal sum 16 over 12 ordered pairs -> b = 4/3, base = b / 2^2 = 1/3,
    # bandwidths (1/3) 2^i, i=0..4. With k(d) = sum_i exp(-d / b_i), k(0) = 5:
    # mean K_XX = mean K_YY = (5 + k(1)) / 2, mean K_XY = (k(1) + k(2)) / 2, so
    # MMD^2 = 5 + k(1) - k(1) - k(2) = 5 - k(2).
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    k2 = sum(math.exp(-2.0 / ((1 / 3) * 2**i)) for i in range(5))
    assert mmd([x, y]).item() == pytest.approx(5 - k2, rel=1e-6)
    # fixed base bandwidth 1 (the official fix_sigma): bandwidths 2^(i-2)
    k2 = sum(math.exp(-2.0 / (2.0 ** (i - 2))) for i in range(5))
    assert mmd([x, y], bandwidth=1.0).item() == pytest.approx(5 - k2, rel=1e-6)


def test_mmd_properties():
    torch.manual_seed(0)
    x = torch.randn(8, 5)
    assert mmd([x, x]).item() == pytest.approx(0.0, abs=1e-6)
    assert mmd([x, x + 3.0]).item() > 0.1
    # equal sizes: the official mean(XX + YY - XY - YX)
    from crossdistill.losses.domain import gaussian_kernels

    y = torch.randn(8, 5)
    k = gaussian_kernels(x, y)
    official = (k[:8, :8] + k[8:, 8:] - k[:8, 8:] - k[8:, :8]).mean()
    assert mmd([x, y]).item() == pytest.approx(official.item(), rel=1e-6)
    # identical samples: finite (bandwidth clamped)
    assert torch.isfinite(mmd([torch.zeros(3, 2), torch.zeros(3, 2)]))


def test_mmd_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: mmd([a, b], bandwidth=2.0), (x, y))


def test_mmd_bad_input():
    with pytest.raises(ConfigError, match="mmd.student"):
        mmd(torch.randn(3, 2))
    with pytest.raises(ConfigError, match="mmd.student"):
        mmd([torch.randn(3, 2), torch.randn(3, 4)])


# -- soft CE ----------------------------------------------------------------------------------
def test_soft_ce_golden_and_detach():
    a = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]], requires_grad=True)
    b = torch.tensor([[0.0, 2.0, 0.0], [1.0, -1.0, 0.0]], requires_grad=True)
    want = []
    for ra, rb in zip(a.tolist(), b.tolist()):
        za = math.log(sum(math.exp(v) for v in ra))
        zb = sum(math.exp(v) for v in rb)
        want.append(-sum(math.exp(vb) / zb * (va - za) for va, vb in zip(ra, rb)))
    got = soft_ce([a, b])
    assert got.tolist() == pytest.approx(want, rel=1e-6)
    got.sum().backward()
    assert b.grad is None and a.grad is not None
    soft_ce([a, b], detach_teacher=False).sum().backward()
    assert b.grad is not None and b.grad.abs().sum() > 0


def test_soft_ce_gradcheck():
    torch.manual_seed(0)
    a = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, v: soft_ce([u, v], detach_teacher=False), (a, b))


# -- EMA consistency ---------------------------------------------------------------------------
def test_ema_consistency_golden_and_update():
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    mod = EMAConsistency([(2, 3), (2, 3)], None, model=net, keys=["source", "target"])
    mod.eval()
    xs, xt = torch.randn(2, 4), torch.randn(2, 4)
    zs, zt = torch.randn(2, 3), torch.randn(2, 3)
    got = mod([zs, zt], None, batch={"source": xs, "target": xt})
    want = sum(((F.softmax(z, -1) - F.softmax(net(x), -1)) ** 2).mean() for z, x in
               ((zs, xs), (zt, xt)))  # softmax once (the official code applies it twice)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    # one step: a = min(1 - 1/2, 0.999) = 0.5; ema = 0.5 ema + 0.5 live
    before = mod.ema.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    mod.on_step()
    assert torch.allclose(mod.ema.weight, 0.5 * before + 0.5 * net.weight)
    assert int(mod.steps) == 1 and not mod.ema.weight.requires_grad
    assert set(mod.state_dict()) == {"ema.weight", "ema.bias", "steps"}
    with pytest.raises(ConfigError, match="ema_consistency.model"):
        EMAConsistency([(2, 3)], None, keys=["source"])
    with pytest.raises(ConfigError, match="ema_consistency.keys"):
        EMAConsistency([(2, 3), (2, 3)], None, model=net, keys=["source"])


# -- model ------------------------------------------------------------------------------------
def test_bida_model_branches():
    m = _bida(depth=2).eval()  # at depth 1 the fused cls output cannot see the other domain
    xs, xt = torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28)
    out = m(xs, xt)
    assert set(out) == {"logits", "source", "target", "fused_s", "fused_t"}
    assert all(v.shape == (4, 10) for v in out.values())
    # shared weights: the branches are the deployed net on their own input
    assert torch.allclose(out["source"], m.net(xs), atol=1e-5)
    assert torch.allclose(out["target"], m.net(xt), atol=1e-5)
    assert torch.allclose(m(xt), m.net(xt))  # target mode
    # the coupled branch mixes the pair: changing the source changes fused_t, not target
    out2 = m(xs + 1.0, xt)
    assert torch.allclose(out2["target"], out["target"], atol=1e-6)
    assert not torch.allclose(out2["fused_t"], out["fused_t"], atol=1e-4)
    with pytest.raises(ConfigError, match="bida.inputs"):
        m(xs, xt[:2])
    s = _bida(tokenizer="semantic", tokens=4).eval()
    assert s(xs, xt)["fused_s"].shape == (4, 10)
    with pytest.raises(ConfigError, match="model.tokenizer"):
        cd.models.create("bida", tokenizer="conv")


def test_recipes():
    m = _bida()
    names = lambda r: [t.name for t in r.terms]  # noqa: E731
    assert names(build("bida", m, None)) == [
        "ce", "mmd_logits", "mmd_fused", "distill_t", "distill_s", "consistency"]
    r = build("bida", m, None, distill_weight=0.0)
    assert names(r) == ["ce", "mmd_logits", "mmd_fused", "consistency"]
    assert [t.weight for t in r.terms[1:3]] == [0.05, 0.05]
    assert names(build("mmd_da", m, None)) == ["ce", "mmd_logits"]
    assert names(build("mmd_da", m, None, weight=0.0)) == ["ce"]
    with pytest.raises(ConfigError, match="method.student"):
        build("bida", cd.models.create("bida"), None)
    with pytest.raises(ConfigError, match="method.teacher"):
        build("bida", m, m)
    with pytest.raises(ConfigError, match="method.ema_decay"):
        build("bida", m, None, ema_decay=1.0)


# -- end to end -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def domains():
    lim = {"train": 96, "val": 40, "test": 40}
    return [cd.data.load_split("mnist_digits", s, limit=lim, target_limit=lim)
            for s in ("train", "val", "test")]


def test_bida_end_to_end(domains, tmp_path):
    tr, va, te = domains
    m = _bida()
    r = build("bida", m, None)
    d = cd.Distiller(m, None, r.terms, task="domain_adaptation", hooks=r.hooks, seed=0)
    t = cd.Trainer(d, tr, va, te, epochs=2, batch_size=32, lr=3e-3, optimizer="adamw",
                   progress=False, seed=0, out_dir=tmp_path)
    res = t.fit()
    assert 0.0 <= res["test_target_acc"] <= 1.0 and 0.0 <= res["test_acc"] <= 1.0
    assert "best_val_target_acc" in res
    for row in t.log.rows:
        for k in ("loss_ce", "loss_mmd_logits", "loss_mmd_fused", "loss_distill_t",
                  "loss_consistency"):
            assert math.isfinite(row[k])
    ema = d.loss_modules["consistency"]
    assert int(ema.steps) == 2 * math.ceil(len(tr) / 32)
    # the EMA copy is checkpointed, not exported; the deployable net reads one image
    ck = torch.load(tmp_path / "last.ckpt", weights_only=False)["model"]
    assert any(k.startswith("loss_modules.consistency.ema.") for k in ck)
    exported = load_weights(tmp_path / "student.safetensors")
    assert exported and not any("ema" in k for k in exported)
    net_acc = cd.evaluate(m.net, te, io={"inputs": ["target"]},
                          task={"name": "classification", "target": "target_y"})["acc"]
    assert net_acc == pytest.approx(res["test_target_acc"])


def test_baselines_end_to_end(domains):
    tr, va, te = domains
    for method, params in (("mmd_da", {}), ("bida", {"distill_weight": 0.0,
                                                      "consistency_weight": 0.0})):
        m = _bida(1)
        r = build(method, m, None, **params)
        d = cd.Distiller(m, None, r.terms, task={"name": "domain_adaptation",
                                                 "select": "source"}, seed=0)
        res = cd.Trainer(d, tr, va, te, epochs=1, batch_size=32, progress=False,
                         optimizer="adamw", lr=3e-3, seed=0).fit()
        assert "best_val_acc" in res and math.isfinite(res["test_target_loss"])
