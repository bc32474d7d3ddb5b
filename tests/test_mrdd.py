"""MRDD: VAE KL, Gaussian log-likelihood and the CLUB bound (golden values, gradients), the
sign of the disentangling step (ours lowers an MI proxy, the released objective raises it),
the views (Sobel edges, patch masking) and both stages end to end on tiny tensors."""

import math

import pytest
import torch
from torch import nn

from crossdistill.data.dataset import Dataset
from crossdistill.errors import ConfigError
from crossdistill.losses.disentangle import (
    ClubEstimator,
    club_bound,
    gaussian_loglik,
    vae_kl,
)
from crossdistill.methods import mrdd as M
from crossdistill.models.mrdd import ConsistencyVAE, edge_views, mask_patches, sobel_edges


# -- losses --------------------------------------------------------------------------------
def test_vae_kl_and_loglik_golden():
    mu = torch.tensor([[1.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)]])
    # 1/2 [(1 + 1 - 1 - 0) + (2 + 0 - 1 - log 2)]
    assert torch.allclose(vae_kl(mu, logvar), torch.tensor([0.5 * (2 - math.log(2.0))]))
    assert float(vae_kl(torch.zeros(3, 4), torch.zeros(3, 4)).abs().max()) == 0.0
    c = torch.tensor([[0.5, -1.0]])
    normal = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    assert torch.allclose(gaussian_loglik(mu, logvar, c), normal.log_prob(c).sum(-1))


def test_club_bound_golden():
    g = torch.Generator().manual_seed(0)
    mu, logvar, c = (torch.randn(3, 2, generator=g) for _ in range(3))
    want = []
    for i in range(3):  # log q(c_i | v_i) - mean_j log q(c_j | v_i), by the distribution
        q = torch.distributions.Normal(mu[i], (0.5 * logvar[i]).exp())
        pos = q.log_prob(c[i]).sum()
        neg = sum(q.log_prob(c[j]).sum() for j in range(3)) / 3
        want.append(pos - neg)
    assert torch.allclose(club_bound(mu, logvar, c), torch.stack(want), atol=1e-5)
    # independent c: the bound is ~0 in expectation; c = mu exactly: positive
    assert float(club_bound(c, torch.zeros(3, 2), c).mean()) > 0


def test_gradcheck():
    g = torch.Generator().manual_seed(0)
    kw = dict(dtype=torch.float64, requires_grad=True)
    mu, logvar = torch.randn(4, 3, generator=g, **kw), torch.randn(4, 3, generator=g, **kw)
    c = torch.randn(4, 3, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(vae_kl, (mu, logvar))
    assert torch.autograd.gradcheck(lambda a, b: gaussian_loglik(a, b, c), (mu, logvar))
    assert torch.autograd.gradcheck(lambda a, b: club_bound(a, b, c), (mu, logvar))


def test_club_estimator_roles_never_share_a_gradient():
    torch.manual_seed(0)
    club = ClubEstimator(3, 2, hidden=8)
    v = torch.randn(5, 3, requires_grad=True)
    c = torch.randn(5, 2)
    club.bound(v, c).backward()
    assert v.grad is not None and all(p.grad is None for p in club.parameters())
    v.grad = None
    club.learning_loss(v, c).backward()
    assert v.grad is None and all(p.grad is not None for p in club.parameters())
    mu, logvar = club(v)
    assert torch.allclose(club.bound(v, c), club_bound(mu, logvar, c).mean())
    with pytest.raises(ConfigError, match="club.v_dim"):
        ClubEstimator(0, 2)


def _sign(mode, steps=120):
    """v = enc([c, n]) + noise starts with little of c (R^2 ~ 0.1); the decoder reads
    [v, c] and rebuilds [c, n] (MRDD's specific VAE, linear)."""
    torch.manual_seed(0)
    n = 256
    c, noise = torch.randn(n, 2), torch.randn(n, 2)
    x = torch.cat([c, noise], 1)
    enc, dec = nn.Linear(4, 2), nn.Linear(4, 4)
    with torch.no_grad():
        enc.weight.copy_(torch.tensor([[0.5, 0.0, 1.0, 0.0], [0.0, 0.5, 0.0, 1.0]]))
        enc.bias.zero_()
    club = ClubEstimator(2, 2, hidden=32)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-2)
    club_opt = torch.optim.Adam(club.parameters(), lr=1e-2)
    eps = 0.5 * torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
    before = M.linear_predictability(enc(x).detach() + eps, c)
    for _ in range(steps):
        v = enc(x) + 0.5 * torch.randn(n, 2)
        dis = M.disentangle_step(v, c, club, club_opt, mode)
        loss = (dec(torch.cat([v, c], 1)) - x).pow(2).sum(1).mean() + dis
        opts = [opt] + ([club_opt] if mode == "released" else [])
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
    v = enc(x).detach() + eps
    return before, M.linear_predictability(v, c), M.linear_predictability(v, noise)


def test_disentangling_lowers_the_mi_proxy_and_the_released_objective_raises_it():
    before, ours, kept = _sign("club")
    _, released, _ = _sign("released")
    assert 0.05 < before < 0.2
    assert ours < before / 2  # c's information leaves v ...
    assert kept > 0.5  # ... while v keeps what c lacks
    assert released > before + 0.3  # the official objective puts c *into* v


# -- views ---------------------------------------------------------------------------------
def test_sobel_edges_golden():
    x = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 4).view(1, 1, 4, 4)
    kx = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]
    pad = torch.nn.functional.pad(x[0, 0], (1, 1, 1, 1))
    want = torch.zeros(4, 4)
    for i in range(4):
        for j in range(4):
            gx = sum(kx[a][b] * pad[i + a, j + b] for a in range(3) for b in range(3))
            gy = sum(kx[b][a] * pad[i + a, j + b] for a in range(3) for b in range(3))
            want[i, j] = math.sqrt(gx**2 + gy**2)
    want = want / want.max()
    assert torch.allclose(sobel_edges(x)[0, 0], want, atol=1e-5)
    d = Dataset({"x": torch.randn(5, 1, 8, 8), "y": torch.arange(5) % 2}, num_classes=2)
    e = edge_views(d)
    assert e["edge"].shape == (5, 1, 8, 8) and e.kinds["edge"] == "image"
    assert torch.allclose(e["edge"].flatten(1).amax(1), torch.ones(5))
    with pytest.raises(ConfigError, match="mrdd.key"):
        edge_views(d, key="image")


def test_mask_patches():
    x = torch.ones(3, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    out = mask_patches(x, 2, 0.5, g)  # 4 patches of 2x2, 2 zeroed per sample
    assert torch.equal(out.sum((1, 2, 3)), torch.full((3,), 8.0))
    blocks = out.view(3, 2, 2, 2, 2).sum((2, 4))  # per patch sums: 0 or 4
    assert set(blocks.unique().tolist()) == {0.0, 4.0}
    assert torch.equal(mask_patches(x, 2, 0.0, g), x)
    with pytest.raises(ConfigError, match="mrdd.patch"):
        mask_patches(x, 3, 0.5, g)
    with pytest.raises(ConfigError, match="mrdd.mask_ratio"):
        mask_patches(x, 2, 1.0, g)


# -- end to end ----------------------------------------------------------------------------
def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.3
    x[:, 0, y, :] += 2.0  # a bright row per class, so the edges carry the class too
    return edge_views(Dataset({"x": x, "y": y}, num_classes=4))


def test_mrdd_two_stages_end_to_end():
    train, val, test = _data(64, 0), _data(32, 1), _data(32, 2)
    out = M.run(train, val, test, mask_ratio=0.7, c_dim=4, v_dim=6, epochs_consistency=2,
                epochs_specific=2, batch_size=32, lr=2e-3, width=4, hidden=16)
    for stage in ("stage1", "stage2"):
        assert all(math.isfinite(v) for row in out[stage] for v in row.values())
    assert out["stage1"][-1]["loss"] < out["stage1"][0]["loss"]
    for name in ("c", "v0", "cv"):
        assert 0.0 <= out[f"{name}_probe"]["test_acc"] <= 1.0
        assert 0.0 <= out[f"{name}_kmeans"] <= 1.0
    feats = M.extract(out["model"], test)
    assert feats["c"].shape == (32, 4) and feats["cv"].shape == (32, 10)
    assert torch.equal(feats["cv"], torch.cat([feats["c"], feats["v0"]], 1))
    assert math.isfinite(out["mi_proxy"])


def test_stage2_freezes_c_and_released_mode_runs():
    train = _data(32, 0)
    torch.manual_seed(0)
    model = M.MRDD([(1, 8, 8), (1, 8, 8)], c_dim=3, v_dim=2, width=4, hidden=8, club_hidden=8)
    c_before = {k: v.clone() for k, v in model.consistency.state_dict().items()}
    for mode in ("club", "released", "none"):
        rows = M.fit_specific(model, train, epochs=1, batch_size=16, disentangle=mode,
                              club_steps=2)
        assert math.isfinite(rows[0]["loss"])
    for k, v in model.consistency.state_dict().items():
        assert torch.equal(v, c_before[k]), k
    with pytest.raises(ConfigError, match="mrdd.disentangle"):
        M.fit_specific(model, train, disentangle="mine")
    with pytest.raises(ConfigError, match="mrdd.keys"):
        M.fit_specific(model, train, keys=("x", "depth"))
    with pytest.raises(ConfigError, match="mrdd.views"):
        ConsistencyVAE([(1, 8, 8)])


def test_probe_and_kmeans_on_separable_features():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    x = torch.nn.functional.one_hot(y, 3).float() * 5 + 0.1 * torch.randn(60, 3, generator=g)
    res = M.linear_probe((x[:30], y[:30]), (x[30:45], y[30:45]), (x[45:], y[45:]))
    assert res["test_acc"] == 1.0 and res["val_acc"] == 1.0
    assert M.kmeans_accuracy(x, y) == 1.0
    assert M.linear_predictability(x, x[:, :1] * 2 + 1) > 0.999
