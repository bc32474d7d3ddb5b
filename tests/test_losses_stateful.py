"""Stateful losses: CRD (embedding heads + memory banks) and ReviewKD (ABF fusion + HCL)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crossdistill.errors import ConfigError
from crossdistill.losses import CRDLoss, ReviewKDLoss
from crossdistill.registry import LOSSES

# ---------------------------------------------------------------- CRD


def _identity_crd(temperature=0.5, momentum=0.5):
    """Two samples, 3-d features, identity heads: the single negative is the other sample."""
    crd = CRDLoss(
        (2, 3), (2, 3), num_samples=2, embed_dim=3, temperature=temperature, momentum=momentum
    ).double()
    with torch.no_grad():
        for head in (crd.embed_s, crd.embed_t):
            head.weight.copy_(torch.eye(3))
            head.bias.zero_()
    return crd


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_crd_golden_info_nce():
    crd = _identity_crd().eval()
    s, t = np.array([[1.0, 2.0, 0.0], [0.0, -1.0, 1.0]]), np.array([[2.0, 0.0, 1.0], [1, 1, 1.0]])
    bank_s, bank_t = (
        _unit(np.array([[1.0, 0, 0], [0, 1, 1]])),
        _unit(np.array([[0, 0, 1.0], [1, 1, 0]])),
    )
    crd.bank_s.copy_(torch.tensor(bank_s))
    crd.bank_t.copy_(torch.tensor(bank_t))
    idx = np.array([1, 0])

    def info_nce(z, bank):
        logits = z @ bank.T / 0.5  # column idx is the positive, the other is the negative
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        return -logp[np.arange(2), idx].mean()

    want = info_nce(_unit(s), bank_t) + info_nce(_unit(t), bank_s)
    got = crd(torch.tensor(s), torch.tensor(t), idx=torch.tensor(idx)).item()
    assert got == pytest.approx(want, rel=1e-12)


def test_crd_bank_momentum_update_only_in_training():
    crd = _identity_crd(momentum=0.25)
    s, t = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    idx = torch.tensor([1, 0])
    before_s, before_t = crd.bank_s.clone(), crd.bank_t.clone()
    crd.eval()(s, t, idx=idx)
    assert torch.equal(crd.bank_s, before_s) and torch.equal(crd.bank_t, before_t)
    crd.train()(s, t, idx=idx)
    for bank, old, x in ((crd.bank_s, before_s, s), (crd.bank_t, before_t, t)):
        want = F.normalize(0.25 * old[idx] + 0.75 * F.normalize(x, dim=1), dim=1)
        torch.testing.assert_close(bank[idx], want)
        torch.testing.assert_close(bank.norm(dim=1), torch.ones(2, dtype=torch.float64))


def test_crd_bank_rows_outside_batch_untouched_and_unit_norm_at_init():
    crd = CRDLoss((4, 6), (4, 5), num_samples=20, embed_dim=8)
    torch.testing.assert_close(crd.bank_s.norm(dim=1), torch.ones(20))
    before = crd.bank_t.clone()
    crd(torch.randn(4, 6), torch.randn(4, 5), idx=torch.tensor([3, 7, 11, 19]))
    untouched = [i for i in range(20) if i not in (3, 7, 11, 19)]
    assert torch.equal(crd.bank_t[untouched], before[untouched])
    assert not torch.equal(crd.bank_t[[3, 7]], before[[3, 7]])
    assert "bank_s" in crd.state_dict() and "bank_t" in crd.state_dict()


def test_crd_negatives_exclude_positive_and_are_seeded():
    crd = CRDLoss((4, 6), (4, 5), num_samples=7, num_negatives=50)
    assert crd.num_negatives == 6
    idx = torch.tensor([0, 3, 6, 3])
    torch.manual_seed(5)
    keys = crd._sample_keys(idx)
    assert keys.shape == (4, 7)
    assert torch.equal(keys[:, 0], idx)
    assert not (keys[:, 1:] == idx[:, None]).any()
    assert keys.min() >= 0 and keys.max() < 7
    torch.manual_seed(5)
    assert torch.equal(crd._sample_keys(idx), keys)


def test_crd_idx_errors():
    crd = CRDLoss((2, 6), (2, 5), num_samples=10)
    s, t = torch.randn(2, 6), torch.randn(2, 5)
    with pytest.raises(ConfigError, match=r"\[0, 10\)"):
        crd(s, t, idx=torch.tensor([3, 10]))
    with pytest.raises(ConfigError):
        crd(s, t, idx=torch.tensor([-1, 2]))
    with pytest.raises(ConfigError):
        crd(s, t, idx=torch.tensor([1, 2, 3]))
    with pytest.raises(ConfigError):
        crd(torch.randn(2, 7), t, idx=torch.tensor([1, 2]))
    with pytest.raises(ConfigError):
        CRDLoss((2, 6), (2, 5), num_samples=None)


def test_crd_gradcheck_student_and_teacher_detached():
    crd = CRDLoss((3, 2, 2), (3, 5), num_samples=10, embed_dim=4, num_negatives=5)
    crd = crd.double().eval()
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(3, 2, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randn(3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    idx = torch.tensor([0, 4, 9])

    def fn(x):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return crd(x, t, idx=idx, y=None, epoch=3)  # unknown kwargs are ignored

    assert torch.autograd.gradcheck(fn, (s,))
    fn(s).backward()
    assert t.grad is None
    assert crd.embed_t.weight.grad is not None  # the teacher-side head does train


def test_crd_registered_as_stateful_class():
    assert LOSSES.get("crd") is CRDLoss
    assert LOSSES.meta("crd")["stateful"] is True


# ---------------------------------------------------------------- ReviewKD


def np_pool(x, size):
    n, c, h, w = x.shape
    return x.reshape(n, c, size, h // size, size, w // size).mean(axis=(3, 5))


def test_reviewkd_golden_single_level_identity_fusion():
    # With identity 1x1/3x3 convs and identity BN, the ABF output equals the student map, so
    # the loss is HCL(s, t) on a 4x4 map: full-size MSE, then pools 2 and 1 (4 is not < 4).
    rk = ReviewKDLoss([(2, 2, 4, 4)], [(2, 2, 4, 4)], mid_channels=2).double().eval()
    abf = rk.abfs[0]
    with torch.no_grad():
        abf.reduce[0].weight.copy_(torch.eye(2)[:, :, None, None])
        abf.expand[0].weight.zero_()
        abf.expand[0].weight[:, :, 1, 1] = torch.eye(2)
    abf.reduce[1].eps = abf.expand[1].eps = 0.0
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 2, 4, 4)), rng.normal(size=(2, 2, 4, 4))

    def mse(a, b):
        return ((a - b) ** 2).mean()

    want = (
        mse(s, t)
        + 0.5 * mse(np_pool(s, 2), np_pool(t, 2))
        + 0.25 * mse(np_pool(s, 1), np_pool(t, 1))
    ) / 1.75
    got = rk([torch.tensor(s)], [torch.tensor(t)]).item()
    assert got == pytest.approx(want, rel=1e-12)


def _review_setup():
    # levels resize both ways (2x2 -> 1x1, 2x2 -> 4x4...); the last student tap is cls + 2x2 tokens
    s_shapes = [(2, 2, 4, 4), (2, 3, 2, 2), (2, 5, 2)]
    t_shapes = [(2, 3, 4, 4), (2, 2, 1, 1), (2, 4, 4, 4)]
    gen = torch.Generator().manual_seed(0)
    s = [torch.randn(sh, dtype=torch.float64, generator=gen) for sh in s_shapes]
    t = [torch.randn(sh, dtype=torch.float64, generator=gen) for sh in t_shapes]
    return ReviewKDLoss(s_shapes, t_shapes, num_samples=100, mid_channels=4).double(), s, t


def test_reviewkd_gradcheck_and_teacher_detached():
    rk, s, t = _review_setup()
    rk.eval()
    s = [x.requires_grad_() for x in s]

    def fn(*xs):
        return rk(list(xs), t, idx=None, y=None)

    assert torch.autograd.gradcheck(fn, tuple(s), fast_mode=True)
    rk.train()
    t = [x.requires_grad_() for x in t]
    loss = rk(s, t)
    loss.backward()
    assert all(x.grad is None for x in t)
    assert all(p.grad is not None for p in rk.parameters() if p.requires_grad)


def test_reviewkd_errors():
    rk, s, t = _review_setup()
    with pytest.raises(ConfigError):
        rk(s[:2], t[:2])
    with pytest.raises(ConfigError):
        rk([s[0], torch.randn(2, 9, 4, 4), s[2]], t)
    with pytest.raises(ConfigError):
        ReviewKDLoss([(2, 3, 4, 4)], [(2, 3, 4, 4), (2, 3, 2, 2)])
    with pytest.raises(ConfigError):
        ReviewKDLoss([(2, 7, 3)], [(2, 3, 4, 4)])  # 7 and 6 tokens: not a grid


def test_reviewkd_registered_as_stateful_class():
    assert LOSSES.get("reviewkd") is ReviewKDLoss
    assert LOSSES.meta("reviewkd")["stateful"] is True
