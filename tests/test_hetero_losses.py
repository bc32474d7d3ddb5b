"""Golden values (numpy, written independently), float64 gradchecks and input checks for the
heterogeneous-KD losses: ofa, pld, taid, dct_mse, dml, bsd, hfd, cross-attention projector."""

import math

import numpy as np
import pytest
import torch

from crossdistill.errors import ConfigError
from crossdistill.losses.hetero import (
    CrossAttentionProjector,
    HFDLoss,
    TAIDLoss,
    bsd,
    dct2,
    dct_mse,
    dml,
    ofa,
    pld,
)
from crossdistill.registry import LOSSES, PROJECTORS

S = np.array([[1.0, 2.0, 0.5, -1.0], [0.3, -0.2, 1.5, 0.0]])
T = np.array([[0.5, 3.0, 1.0, -2.0], [2.0, 0.1, 0.4, -0.5]])
Y = np.array([0, 2])


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def log_softmax(x):
    return np.log(softmax(x))


def tt(a):
    return torch.tensor(a, dtype=torch.float64)


def numgrad(f, x, h=1e-6):
    """Central finite differences of a scalar numpy/torch function ``f`` at ``x``."""
    x = x.detach().clone()
    g = torch.zeros_like(x)
    flat, gf = x.view(-1), g.view(-1)
    for i in range(flat.numel()):
        old = flat[i].item()
        flat[i] = old + h
        with torch.no_grad():
            up = float(f(x))
        flat[i] = old - h
        with torch.no_grad():
            down = float(f(x))
        flat[i] = old
        gf[i] = (up - down) / (2 * h)
    return g


def check_stopgrad(loss, surrogate, *xs):
    """Losses with stop-gradients: autograd's gradient of ``loss`` at ``xs`` must equal the
    finite-difference gradient of ``surrogate`` (the same loss with every ``sg()`` input
    frozen at ``xs``), argument by argument."""
    xs = [x.detach().clone().requires_grad_() for x in xs]
    grads = torch.autograd.grad(loss(*xs), xs)
    for i, g in enumerate(grads):

        def f(z, i=i):
            args = [x.detach() for x in xs]
            args[i] = z
            return surrogate(*args)

        assert torch.allclose(g, numgrad(f, xs[i]), atol=1e-6, rtol=1e-5), i


# --- OFA --------------------------------------------------------------------------------
def np_ofa(s, t, y, gamma):
    out = []
    for i in range(len(s)):
        pt, lps = softmax(t[i]), log_softmax(s[i])
        m = np.zeros_like(pt)
        if y is not None and y[i] >= 0:
            m[y[i]] = 1
        out.append(-(((pt + m) ** gamma - m) * lps).sum())
    return np.mean(out)


@pytest.mark.parametrize("gamma", [1.0, 1.5])
def test_ofa_golden(gamma):
    got = ofa(tt(S), tt(T), y=torch.tensor(Y), gamma=gamma).item()
    assert got == pytest.approx(np_ofa(S, T, Y, gamma), rel=1e-10)


def test_ofa_gamma1_is_soft_ce_plus_label_term():
    # gamma = 1: ((p + 1) - 1) = p on the target too, so OFA = soft CE to p_t
    got = ofa(tt(S), tt(T), y=torch.tensor(Y), gamma=1.0).item()
    ref = -(softmax(T) * log_softmax(S)).sum(1).mean()
    assert got == pytest.approx(ref, rel=1e-10)


def test_ofa_unlabelled_rows_and_errors():
    got = ofa(tt(S), tt(T), y=torch.tensor([-1, 2]), gamma=1.5).item()
    assert got == pytest.approx(np_ofa(S, T, np.array([-1, 2]), 1.5), rel=1e-10)
    with pytest.raises(ConfigError, match="gamma"):
        ofa(tt(S), tt(T), y=torch.tensor(Y), gamma=0.5)
    with pytest.raises(ConfigError):
        ofa(tt(S), tt(T[:, :3]))


def test_ofa_gradcheck():
    s = tt(S).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ofa(x, tt(T), y=torch.tensor(Y), gamma=1.5), (s,))


# --- PLD --------------------------------------------------------------------------------
def np_pld(s, t, y, temp=1.0):
    out = []
    for i in range(len(s)):
        others = [c for c in np.argsort(-t[i], kind="stable") if y is None or c != y[i]]
        pi = ([y[i]] if y is not None and y[i] >= 0 else []) + others
        alpha = softmax(t[i] / temp)[pi]
        total = 0.0
        for k in range(len(pi)):
            rest = s[i][pi[k:]]
            total += alpha[k] * (np.log(np.exp(rest).sum()) - s[i][pi[k]])
        out.append(total)
    return np.mean(out)


def test_pld_golden():
    assert pld(tt(S), tt(T), y=torch.tensor(Y)).item() == pytest.approx(np_pld(S, T, Y), rel=1e-10)
    assert pld(tt(S), tt(T), y=torch.tensor(Y), temperature=2.0).item() == pytest.approx(
        np_pld(S, T, Y, 2.0), rel=1e-10
    )
    # no labels: the pure teacher ranking
    assert pld(tt(S), tt(T)).item() == pytest.approx(np_pld(S, T, None), rel=1e-10)


def test_pld_first_term_is_weighted_ce_and_translation_invariant():
    s, t = tt(S), tt(T)
    assert pld(s + 3.0, t, y=torch.tensor(Y)).item() == pytest.approx(
        pld(s, t, y=torch.tensor(Y)).item(), rel=1e-10
    )
    # a perfect student ranking with huge margins drives the loss to ~0
    order = torch.tensor([[0, 1, 2, 3], [2, 0, 1, 3]])
    big = torch.zeros(2, 4, dtype=torch.float64)
    big.scatter_(1, order, torch.tensor([[90.0, 60, 30, 0]] * 2, dtype=torch.float64))
    assert pld(big, t, y=torch.tensor(Y)).item() < 1e-10


def test_pld_gradcheck():
    s = tt(S).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: pld(x, tt(T), y=torch.tensor(Y)), (s,))


# --- TAID -------------------------------------------------------------------------------
def test_taid_golden_loss_and_schedule():
    mod = TAIDLoss((2, 4), (2, 4)).double()
    got = mod(tt(S), tt(T)).item()
    w = 0.4
    target = softmax((1 - w) * S + w * T)
    assert got == pytest.approx(-(target * log_softmax(S)).sum(1).mean(), rel=1e-10)
    # schedule by hand: first call records L_prev, later ones follow the momentum rule
    mod.update(2.0, 0.1)
    t_lin = 0.4 + 0.6 * 0.1
    assert float(mod.t) == pytest.approx(t_lin)
    assert float(mod.L_prev) == 2.0
    mod.update(1.5, 0.1)
    m = 0.01 * (2.0 - 1.5) / 2.0
    t = max(0.4 + 0.6 * 0.1, t_lin + 5e-4 * (1 / (1 + math.exp(-m))) * (1 - t_lin))
    assert float(mod.m) == pytest.approx(m)
    assert float(mod.t) == pytest.approx(t)
    mod.update(1.0, 0.9)  # the linear floor dominates late in training
    assert float(mod.t) == pytest.approx(0.4 + 0.6 * 0.9)
    mod.update(1.0, 2.0)
    assert float(mod.t) == pytest.approx(1.0)  # capped at t_end


def test_taid_state_is_buffers_and_gradcheck():
    mod = TAIDLoss((2, 4), (2, 4))
    assert {"t", "m", "L_prev", "last"} <= set(mod.state_dict())
    mod = mod.double()

    def surrogate(x):
        target = torch.softmax(0.6 * tt(S) + 0.4 * tt(T), 1)  # sg(z_s) frozen at S
        return -(target * torch.log_softmax(x, 1)).sum(1).mean()

    check_stopgrad(lambda x: mod(x, tt(T)), surrogate, tt(S))
    with pytest.raises(ConfigError, match="taid.beta"):
        TAIDLoss((2, 4), (2, 4), beta=1.0)
    with pytest.raises(ConfigError, match="taid.t_end"):
        TAIDLoss((2, 4), (2, 4), t_start=0.5, t_end=0.2)
    assert LOSSES.meta("taid")["stateful"]


# --- ScaleKD frequency mimicking --------------------------------------------------------
def np_dct_matrix(n):
    d = np.zeros((n, n))
    for k in range(n):
        for i in range(n):
            c = math.sqrt(1 / n) if k == 0 else math.sqrt(2 / n)
            d[k, i] = c * math.cos(math.pi * (2 * i + 1) * k / (2 * n))
    return d


def test_dct2_matches_definition_and_is_orthonormal():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 4))
    ref = np_dct_matrix(3) @ x @ np_dct_matrix(4).T
    assert np.allclose(dct2(tt(x)).numpy(), ref)
    assert dct2(tt(x)).pow(2).sum().item() == pytest.approx((x**2).sum())  # Parseval


def test_dct_mse_golden_ignores_dc():
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 3, 4, 4))
    d = np_dct_matrix(4)
    fs, ft = d @ s @ d.T, d @ t @ d.T
    diff = fs - ft
    diff[..., 0, 0] = 0
    assert dct_mse(tt(s), tt(t)).item() == pytest.approx((diff**2).mean(), rel=1e-10)
    # adding a constant per channel only moves the DC coefficient: no change
    shifted = tt(s) + torch.arange(3, dtype=torch.float64)[None, :, None, None]
    assert dct_mse(shifted, tt(t)).item() == pytest.approx((diff**2).mean(), rel=1e-10)


def test_dct_mse_tokens_and_gradcheck():
    rng = np.random.default_rng(2)
    s, t = tt(rng.normal(size=(2, 5, 3))), tt(rng.normal(size=(2, 5, 3)))  # cls + 2x2 grid
    ms, mt = (
        s[:, 1:].transpose(1, 2).reshape(2, 3, 2, 2),
        t[:, 1:].transpose(1, 2).reshape(2, 3, 2, 2),
    )
    assert dct_mse(s, t).item() == pytest.approx(dct_mse(ms, mt).item(), rel=1e-10)
    x = s.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a: dct_mse(a, t), (x,))
    with pytest.raises(ConfigError):
        dct_mse(s, t[:, :4])


def test_cross_attention_projector_shapes():
    torch.manual_seed(0)
    p = CrossAttentionProjector((8, 4, 4), (17, 12))  # map -> tokens
    assert p(torch.randn(2, 8, 4, 4)).shape == (2, 17, 12)
    p = CrossAttentionProjector((10, 6), (16, 7, 7))  # tokens -> map
    assert p(torch.randn(2, 10, 6)).shape == (2, 16, 7, 7)
    p = CrossAttentionProjector((32,), (5, 8))  # vector -> tokens
    assert p(torch.randn(2, 32)).shape == (2, 5, 8)
    assert "cross_attention" in PROJECTORS
    with pytest.raises(ConfigError):
        CrossAttentionProjector((8, 4, 4), (10,))


# --- collaborative pieces ---------------------------------------------------------------
def np_kl(p, q_log):
    return (p * (np.log(p) - q_log)).sum(-1)


def test_dml_golden_and_gradcheck():
    got = dml([tt(S), tt(T)]).item()
    ref = np.mean(np_kl(softmax(T), log_softmax(S))) + np.mean(np_kl(softmax(S), log_softmax(T)))
    assert got == pytest.approx(ref, rel=1e-10)

    def surrogate(x, z):  # each direction's target frozen at its current value
        kl = torch.nn.functional.kl_div
        pa, pb = torch.softmax(tt(S) / 2, 1), torch.softmax(tt(T) / 2, 1)
        return 4 * (
            kl(torch.log_softmax(x / 2, 1), pb, reduction="batchmean")
            + kl(torch.log_softmax(z / 2, 1), pa, reduction="batchmean")
        )

    check_stopgrad(lambda x, z: dml([x, z], temperature=2.0), surrogate, tt(S), tt(T))
    with pytest.raises(ConfigError):
        dml(tt(S))


def test_bsd_golden_selection():
    y = np.array([0, 2])
    got = bsd([tt(S), tt(T)], y=torch.tensor(y)).item()
    rows = []
    for i in range(2):
        ce_a, ce_b = -log_softmax(S[i])[y[i]], -log_softmax(T[i])[y[i]]
        if ce_a < ce_b:  # a teaches b
            rows.append(np_kl(softmax(S[i]), log_softmax(T[i])))
        elif ce_b < ce_a:
            rows.append(np_kl(softmax(T[i]), log_softmax(S[i])))
        else:
            rows.append(0.0)
    assert got == pytest.approx(np.mean(rows), rel=1e-10)
    # unlabelled: the more confident peer teaches
    got_u = bsd([tt(S), tt(T)], y=torch.tensor([-1, -1])).item()
    rows = []
    for i in range(2):
        if softmax(S[i]).max() > softmax(T[i]).max():
            rows.append(np_kl(softmax(S[i]), log_softmax(T[i])))
        else:
            rows.append(np_kl(softmax(T[i]), log_softmax(S[i])))
    assert got_u == pytest.approx(np.mean(rows), rel=1e-10)


def test_bsd_gradcheck_and_teacher_side_detached():
    y = torch.tensor([0, 0])
    la, lb = torch.log_softmax(tt(S), 1), torch.log_softmax(tt(T), 1)
    a_teaches = (-la.gather(1, y[:, None]) < -lb.gather(1, y[:, None]))[:, 0].double()

    def surrogate(x, z):  # selection and teaching targets frozen
        kl_b = (torch.softmax(tt(S), 1) * (la - torch.log_softmax(z, 1))).sum(1)
        kl_a = (torch.softmax(tt(T), 1) * (lb - torch.log_softmax(x, 1))).sum(1)
        return (a_teaches * kl_b + (1 - a_teaches) * kl_a).mean()

    assert 0 < a_teaches.sum() < 2  # both directions are exercised
    check_stopgrad(lambda x, z: bsd([x, z], y=y), surrogate, tt(S), tt(T))
    # sample 0: CE_a > CE_b? whichever teaches gets no gradient from that sample's row
    a1, b1 = tt(S[:1]).requires_grad_(), tt(T[:1]).requires_grad_()
    bsd([a1, b1], y=torch.tensor([1])).backward()  # class 1: b (teacher logits) is better
    assert torch.count_nonzero(b1.grad) == 0 and torch.count_nonzero(a1.grad) > 0


def test_hfd_module_both_ways_detached_targets():
    torch.manual_seed(0)
    mod = HFDLoss([(2, 3, 4, 4), (2, 5, 4)]).double()  # map <-> tokens (cls + 2x2)
    fa = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    fb = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    loss = mod([fa, fb])
    ref = torch.nn.functional.mse_loss(mod.ab(fa), fb) + torch.nn.functional.mse_loss(
        mod.ba(fb), fa
    )
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    fa0, fb0 = fa.detach().clone(), fb.detach().clone()
    mse = torch.nn.functional.mse_loss
    check_stopgrad(
        lambda x, z: mod([x, z]), lambda x, z: mse(mod.ab(x), fb0) + mse(mod.ba(z), fa0), fa, fb
    )
    # a vector peer falls back to an MLP bridge
    assert HFDLoss([(2, 4, 6, 6), (2, 32)])([torch.randn(2, 4, 6, 6), torch.randn(2, 32)]) > 0
    with pytest.raises(ConfigError):
        HFDLoss((2, 4, 6, 6))
