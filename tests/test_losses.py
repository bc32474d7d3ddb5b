"""Pure losses: golden values computed independently in numpy, gradchecks, teacher detachment,
shape errors. The stateful losses (crd, reviewkd) live in test_losses_stateful.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crossdistill.errors import ConfigError
from crossdistill.losses import (
    at,
    ce,
    cosine,
    dist,
    dkd,
    kd,
    l1,
    mse,
    pkt,
    rkd,
    rkl,
    smooth_l1,
    sp,
)
from crossdistill.registry import LOSSES

# ---------------------------------------------------------------- numpy references


def np_softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_kl_rows(p, q):
    """KL(p || q) per row."""
    return (p * (np.log(p) - np.log(q))).sum(axis=1)


def np_smooth_l1(a, b, beta=1.0):
    d = np.abs(a - b)
    return np.where(d < beta, 0.5 * d**2 / beta, d - 0.5 * beta).mean()


S = np.array([[1.0, 2.0, 0.5], [-1.0, 0.3, 2.2]])
T = np.array([[0.2, 2.5, -0.4], [0.0, -0.7, 1.8]])
Y = np.array([1, 2])


def tt(a, requires_grad=False):
    return torch.tensor(a, dtype=torch.float64, requires_grad=requires_grad)


# ---------------------------------------------------------------- registry


ALL = ["ce", "kd", "dkd", "dist", "mse", "l1", "smooth_l1", "cosine", "at", "rkd", "sp", "pkt"]


@pytest.mark.parametrize("name", ALL + ["crd", "reviewkd"])
def test_registered_with_metadata(name):
    meta = LOSSES.meta(name)
    assert meta["inputs"] in {"logits", "features", "embeddings", "labels"}
    assert meta["default_weight"] > 0
    assert "paper" in meta and "year" in meta
    assert LOSSES.get(name).__doc__


def test_registry_weights_follow_papers():
    assert LOSSES.meta("at")["default_weight"] == 1000
    assert LOSSES.meta("sp")["default_weight"] == 3000
    assert LOSSES.meta("rkd")["default_weight"] == 1.0
    assert LOSSES.meta("kd")["default_weight"] == 0.9
    assert LOSSES.meta("crd")["stateful"] and LOSSES.meta("reviewkd")["stateful"]


# ---------------------------------------------------------------- logits


def test_ce_golden():
    logp = np.log(np_softmax(S))
    assert ce(tt(S), None, y=torch.tensor(Y)).mean().item() == pytest.approx(
        -logp[[0, 1], Y].mean()
    )
    eps = 0.1
    q = np.full_like(S, eps / 3)
    q[[0, 1], Y] += 1 - eps
    want = -(q * logp).sum(1).mean()
    got = ce(tt(S), None, y=torch.tensor(Y), label_smoothing=eps).mean().item()
    assert got == pytest.approx(want)


def test_ce_rejects_bad_smoothing():
    with pytest.raises(ConfigError):
        ce(tt(S), y=torch.tensor(Y), label_smoothing=1.0)


def test_kd_golden():
    temp = 4.0
    want = temp**2 * np_kl_rows(np_softmax(T / temp), np_softmax(S / temp)).mean()
    assert kd(tt(S), tt(T)).mean().item() == pytest.approx(want, rel=1e-10)
    assert kd(tt(S), tt(S)).mean().item() == pytest.approx(0.0, abs=1e-12)


def test_rkl_golden_swaps_the_kl_arguments():
    # reverse KL(p_s || p_t): the forward formula with the roles of student and teacher swapped
    for temp in (1.0, 3.0):
        want = temp**2 * np_kl_rows(np_softmax(S / temp), np_softmax(T / temp)).mean()
        assert rkl(tt(S), tt(T), temperature=temp).mean().item() == pytest.approx(want, rel=1e-10)
    assert rkl(tt(S), tt(S)).mean().item() == pytest.approx(0.0, abs=1e-12)
    # hand value: p_s = (1/2, 1/2), p_t = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3)
    s2 = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    t2 = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    assert rkl(s2, t2).mean().item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.floats(-20, 20), min_size=6, max_size=6),
    st.lists(st.floats(-20, 20), min_size=6, max_size=6),
    st.floats(0.5, 8.0),
)
def test_kd_nonnegative(a, b, temperature):
    s, t = torch.tensor(a).view(2, 3), torch.tensor(b).view(2, 3)
    # KL >= 0 up to float32 rounding of the per-row sums (scaled by T^2)
    assert kd(s, t, temperature=temperature).min().item() >= -1e-5 * temperature**2


def np_tckd_nckd(s, t, y, temp):
    """Per-sample TCKD and NCKD written out from the DKD paper's definitions."""
    p_s, p_t = np_softmax(s / temp), np_softmax(t / temp)
    rows = np.arange(len(y))
    b_s = np.stack([p_s[rows, y], 1 - p_s[rows, y]], 1)
    b_t = np.stack([p_t[rows, y], 1 - p_t[rows, y]], 1)
    tckd = np_kl_rows(b_t, b_s)
    keep = np.ones_like(s, dtype=bool)
    keep[rows, y] = False
    nt_s = p_s[keep].reshape(len(y), -1)
    nt_t = p_t[keep].reshape(len(y), -1)
    nckd = np_kl_rows(nt_t / nt_t.sum(1, keepdims=True), nt_s / nt_s.sum(1, keepdims=True))
    return tckd, nckd, p_t[rows, y]


def test_dkd_golden_alpha_beta_one():
    tckd, nckd, _ = np_tckd_nckd(S, T, Y, 4.0)
    want = 16 * (tckd.mean() + nckd.mean())
    got = dkd(tt(S), tt(T), y=torch.tensor(Y), alpha=1.0, beta=1.0).mean().item()
    assert got == pytest.approx(want, rel=1e-9)
    got = dkd(tt(S), tt(T), y=torch.tensor(Y), alpha=0.5, beta=3.0).mean().item()
    assert got == pytest.approx(16 * (0.5 * tckd.mean() + 3 * nckd.mean()), rel=1e-9)


def test_dkd_recovers_kd_with_paper_decomposition():
    # KD = TCKD + (1 - p_t[y]) NCKD, per sample; with one sample it is exact for dkd too.
    s, t, y = S[:1], T[:1], Y[:1]
    _, _, pt_y = np_tckd_nckd(s, t, y, 4.0)
    got = dkd(tt(s), tt(t), y=torch.tensor(y), alpha=1.0, beta=float(1 - pt_y[0])).mean()
    assert got.item() == pytest.approx(kd(tt(s), tt(t)).mean().item(), rel=1e-9)


def np_pearson(a, b, eps=1e-8):
    """Pearson correlation with DIST's eps in the denominator (negligible unless a row is flat)."""
    a, b = a - a.mean(), b - b.mean()
    return (a @ b) / (np.linalg.norm(a) * np.linalg.norm(b) + eps)


def test_dist_golden():
    temp = 4.0
    p_s, p_t = np_softmax(S / temp), np_softmax(T / temp)
    inter = 1 - np.mean([np_pearson(p_s[i], p_t[i]) for i in range(2)])
    intra = 1 - np.mean([np_pearson(p_s[:, k], p_t[:, k]) for k in range(3)])
    want = temp**2 * (2.0 * inter + 0.5 * intra)
    got = dist(tt(S), tt(T), beta=2.0, gamma=0.5).item()
    assert got == pytest.approx(want, rel=1e-10)
    # and, with the eps dropped, it is the textbook correlation up to ~1e-5
    corr = np.corrcoef(p_s[0], p_t[0])[0, 1]
    assert np_pearson(p_s[0], p_t[0]) == pytest.approx(corr, rel=1e-4)


def test_dist_perfect_correlation_is_zero():
    z = tt(np.array([[3.0, -2.0, 1.0, 0.0], [0.5, 4.0, -3.0, 1.0], [-2.0, 0.0, 5.0, 2.0]]))
    assert dist(z, z).item() == pytest.approx(0.0, abs=1e-4)


# ---------------------------------------------------------------- elementwise features


A = np.array([[0.5, -1.0, 2.0], [1.5, 0.0, -0.3]])
B = np.array([[0.0, -3.0, 2.5], [1.0, 0.2, 0.1]])


def np_cosine(a, b):
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return 1 - cos.mean()


@pytest.mark.parametrize(
    ("fn", "want"),
    [
        (mse, ((A - B) ** 2).mean()),
        (l1, np.abs(A - B).mean()),
        (smooth_l1, np_smooth_l1(A, B)),
        (cosine, np_cosine(A, B)),
    ],
)
def test_elementwise_golden(fn, want):
    assert fn(tt(A), tt(B)).item() == pytest.approx(want, rel=1e-10)


def test_smooth_l1_beta():
    assert smooth_l1(tt(A), tt(B), beta=0.5).item() == pytest.approx(np_smooth_l1(A, B, 0.5))


@pytest.mark.parametrize("fn", [mse, l1, smooth_l1, cosine])
def test_elementwise_shape_mismatch_is_config_error(fn):
    with pytest.raises(ConfigError, match="projector") as err:
        fn(torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 4, 4))
    assert "(2, 3, 4, 4)" in str(err.value) and "(2, 5, 4, 4)" in str(err.value)


# ---------------------------------------------------------------- attention transfer


def test_at_golden_hand_computed():
    s = tt([[[[1.0, 2.0], [3.0, 4.0]]]])  # 1x1x2x2
    t = tt([[[[1.0, 1.0], [1.0, 1.0]]]])
    a_s = np.array([1.0, 4.0, 9.0, 16.0]) / math.sqrt(1 + 16 + 81 + 256)
    a_t = np.full(4, 0.5)
    assert at(s, t).item() == pytest.approx(((a_s - a_t) ** 2).mean(), rel=1e-12)


def test_at_pools_larger_map_and_ignores_channels():
    torch.manual_seed(0)
    s, t = (
        torch.randn(2, 3, 2, 2, dtype=torch.float64),
        torch.randn(2, 5, 4, 4, dtype=torch.float64),
    )
    pooled = torch.nn.functional.avg_pool2d(t, 2)
    assert at(s, t).item() == pytest.approx(at(s, pooled).item(), rel=1e-12)
    assert at(t, s).item() == pytest.approx(at(pooled, s).item(), rel=1e-12)


def test_at_tokens_with_and_without_cls():
    torch.manual_seed(0)
    maps = torch.randn(2, 6, 2, 2, dtype=torch.float64)
    tokens = maps.flatten(2).transpose(1, 2)  # (2, 4, 6), row-major patches
    with_cls = torch.cat([torch.randn(2, 1, 6, dtype=torch.float64), tokens], dim=1)
    other = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    want = at(maps, other).item()
    assert at(tokens, other).item() == pytest.approx(want, rel=1e-12)
    assert at(with_cls, other).item() == pytest.approx(want, rel=1e-12)
    with pytest.raises(ConfigError):
        at(torch.randn(2, 7, 6), other)


# ---------------------------------------------------------------- relations


def np_rkd(s, t, wd, wa):
    def dists(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=2)
        return d / d[d > 0].mean()

    def angles(x):
        n = len(x)
        out = np.zeros((n, n, n))
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    if j != i and k != i:
                        e_ij, e_ik = x[j] - x[i], x[k] - x[i]
                        out[i, j, k] = e_ij @ e_ik / np.linalg.norm(e_ij) / np.linalg.norm(e_ik)
        return out

    return wd * np_smooth_l1(dists(s), dists(t)) + wa * np_smooth_l1(angles(s), angles(t))


def test_rkd_golden_three_points():
    s = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    t = np.array([[0.0, 0.0, 1.0], [3.0, 0.0, 0.0], [1.0, 1.0, 1.0]])  # other dim is fine
    assert rkd(tt(s), tt(t)).item() == pytest.approx(np_rkd(s, t, 25, 50), rel=1e-9)
    got = rkd(tt(s), tt(t), distance_weight=1.0, angle_weight=0.0).item()
    assert got == pytest.approx(np_rkd(s, t, 1, 0), rel=1e-9)


def test_rkd_invariant_to_scale_and_translation():
    torch.manual_seed(0)
    x = torch.randn(5, 4, dtype=torch.float64)
    assert rkd(3 * x + 1, x).item() == pytest.approx(0.0, abs=1e-10)
    assert rkd(x[:1], x[:1]).item() == 0.0


def test_sp_golden_2x2():
    s, t = np.array([[1.0, 0.0], [1.0, 1.0]]), np.array([[2.0, 1.0], [0.0, 1.0]])

    def gram(x):
        g = x @ x.T
        return g / np.linalg.norm(g, axis=1, keepdims=True)

    want = ((gram(s) - gram(t)) ** 2).sum() / 4
    assert sp(tt(s), tt(t)).item() == pytest.approx(want, rel=1e-12)


def test_pkt_golden():
    s = np.array([[1.0, 0.0], [0.6, 0.8], [-1.0, 1.0]])
    t = np.array([[0.0, 2.0, 1.0], [1.0, 1.0, 0.0], [3.0, -1.0, 2.0]])
    eps = 1e-7

    def cond(x):
        x = x / (np.linalg.norm(x, axis=1, keepdims=True) + eps)
        k = (x @ x.T + 1) / 2
        return k / k.sum(1, keepdims=True)

    p_s, p_t = cond(s), cond(t)
    want = (p_t * np.log((p_t + eps) / (p_s + eps))).sum(1).mean()
    assert pkt(tt(s), tt(t)).item() == pytest.approx(want, rel=1e-10)
    assert pkt(tt(t), tt(t)).item() == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- gradients, all pure losses

LABELS = torch.tensor([0, 2, 1])

# name -> (fn, student shape, teacher shape, extra kwargs)
CASES = {
    "ce": (ce, (3, 4), (3, 4), {"y": LABELS}),
    "kd": (kd, (3, 4), (3, 4), {}),
    "rkl": (rkl, (3, 4), (3, 4), {"temperature": 2.0}),
    "dkd": (dkd, (3, 4), (3, 4), {"y": LABELS}),
    "dist": (dist, (3, 4), (3, 4), {}),
    "mse": (mse, (3, 2, 2), (3, 2, 2), {}),
    "l1": (l1, (3, 2, 2), (3, 2, 2), {}),
    "smooth_l1": (smooth_l1, (3, 2, 2), (3, 2, 2), {}),
    "cosine": (cosine, (3, 2, 2), (3, 2, 2), {}),
    "at": (at, (2, 3, 4, 4), (2, 2, 2, 2), {}),
    "at_tokens": (at, (2, 5, 3), (2, 2, 2, 2), {}),
    "rkd": (rkd, (4, 3), (4, 5), {}),
    "sp": (sp, (3, 2, 2), (3, 5), {}),
    "pkt": (pkt, (4, 3), (4, 6), {}),
}


@pytest.mark.parametrize("name", CASES)
def test_gradcheck_wrt_student(name):
    fn, s_shape, t_shape, kw = CASES[name]
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(s_shape, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randn(t_shape, dtype=torch.float64, generator=gen)
    assert torch.autograd.gradcheck(lambda x: fn(x, t, **kw).sum(), (s,))


@pytest.mark.parametrize("name", CASES)
def test_teacher_gets_no_gradient(name):
    fn, s_shape, t_shape, kw = CASES[name]
    s = torch.randn(s_shape, requires_grad=True)
    t = torch.randn(t_shape, requires_grad=True)
    loss = fn(s, t, **kw)
    assert loss.dim() == 0 or loss.shape == s.shape[:-1]  # scalar or one value per position
    loss.sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    assert t.grad is None or not t.grad.any()


@pytest.mark.parametrize("name", CASES)
def test_half_precision_inputs_give_float32(name):
    fn, s_shape, t_shape, kw = CASES[name]
    s, t = torch.randn(s_shape).bfloat16(), torch.randn(t_shape).bfloat16()
    loss = fn(s, t, **kw)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()


@pytest.mark.parametrize("name", CASES)
def test_autocast_does_not_lower_loss_precision(name):
    fn, s_shape, t_shape, kw = CASES[name]
    s, t = torch.randn(s_shape), torch.randn(t_shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fn(s, t, **kw)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, fn(s, t, **kw), rtol=2e-2, atol=1e-3)
