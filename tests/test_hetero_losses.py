"""Golden values (numpy, written independently), float64 gradchecks and input checks for the
heterogeneous-KD losses: ofa, pld, taid, dct_mse, dml, bsd, bsd_region (+ region heads), hfd,
cross-attention projector."""

import math

import numpy as np
import pytest
import torch

from crossdistill.errors import ConfigError
from crossdistill.losses.hetero import (
    CrossAttentionProjector,
    HFDLoss,
    RegionBSDLoss,
    RegionHead,
    TAIDLoss,
    bsd,
    bsd_region,
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
    got = ofa(tt(S), tt(T), y=torch.tensor(Y), gamma=gamma).mean().item()
    assert got == pytest.approx(np_ofa(S, T, Y, gamma), rel=1e-10)


def test_ofa_gamma1_is_soft_ce_plus_label_term():
    # gamma = 1: ((p + 1) - 1) = p on the target too, so OFA = soft CE to p_t
    got = ofa(tt(S), tt(T), y=torch.tensor(Y), gamma=1.0).mean().item()
    ref = -(softmax(T) * log_softmax(S)).sum(1).mean()
    assert got == pytest.approx(ref, rel=1e-10)


def test_ofa_unlabelled_rows_and_errors():
    got = ofa(tt(S), tt(T), y=torch.tensor([-1, 2]), gamma=1.5).mean().item()
    assert got == pytest.approx(np_ofa(S, T, np.array([-1, 2]), 1.5), rel=1e-10)
    with pytest.raises(ConfigError, match="gamma"):
        ofa(tt(S), tt(T), y=torch.tensor(Y), gamma=0.5)
    with pytest.raises(ConfigError):
        ofa(tt(S), tt(T[:, :3]))


def test_ofa_gradcheck():
    s = tt(S).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: ofa(x, tt(T), y=torch.tensor(Y), gamma=1.5).mean(), (s,)
    )


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
    assert pld(tt(S), tt(T), y=torch.tensor(Y)).mean().item() == pytest.approx(
        np_pld(S, T, Y), rel=1e-10
    )
    assert pld(tt(S), tt(T), y=torch.tensor(Y), temperature=2.0).mean().item() == pytest.approx(
        np_pld(S, T, Y, 2.0), rel=1e-10
    )
    # no labels: the pure teacher ranking
    assert pld(tt(S), tt(T)).mean().item() == pytest.approx(np_pld(S, T, None), rel=1e-10)


def test_pld_first_term_is_weighted_ce_and_translation_invariant():
    s, t = tt(S), tt(T)
    assert pld(s + 3.0, t, y=torch.tensor(Y)).mean().item() == pytest.approx(
        pld(s, t, y=torch.tensor(Y)).mean().item(), rel=1e-10
    )
    # a perfect student ranking with huge margins drives the loss to ~0
    order = torch.tensor([[0, 1, 2, 3], [2, 0, 1, 3]])
    big = torch.zeros(2, 4, dtype=torch.float64)
    big.scatter_(1, order, torch.tensor([[90.0, 60, 30, 0]] * 2, dtype=torch.float64))
    assert pld(big, t, y=torch.tensor(Y)).mean().item() < 1e-10


def test_pld_gradcheck():
    s = tt(S).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: pld(x, tt(T), y=torch.tensor(Y)).mean(), (s,))


# --- TAID -------------------------------------------------------------------------------
def test_taid_golden_loss_and_schedule():
    mod = TAIDLoss((2, 4), (2, 4)).double()
    got = mod(tt(S), tt(T)).mean().item()
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

    check_stopgrad(lambda x: mod(x, tt(T)).mean(), surrogate, tt(S))
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
    got = dml([tt(S), tt(T)]).mean().item()
    ref = np.mean(np_kl(softmax(T), log_softmax(S))) + np.mean(np_kl(softmax(S), log_softmax(T)))
    assert got == pytest.approx(ref, rel=1e-10)

    def surrogate(x, z):  # each direction's target frozen at its current value
        kl = torch.nn.functional.kl_div
        pa, pb = torch.softmax(tt(S) / 2, 1), torch.softmax(tt(T) / 2, 1)
        return 4 * (
            kl(torch.log_softmax(x / 2, 1), pb, reduction="batchmean")
            + kl(torch.log_softmax(z / 2, 1), pa, reduction="batchmean")
        )

    check_stopgrad(lambda x, z: dml([x, z], temperature=2.0).mean(), surrogate, tt(S), tt(T))
    with pytest.raises(ConfigError):
        dml(tt(S))


def test_bsd_golden_selection():
    y = np.array([0, 2])
    got = bsd([tt(S), tt(T)], y=torch.tensor(y)).mean().item()
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
    got_u = bsd([tt(S), tt(T)], y=torch.tensor([-1, -1])).mean().item()
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
    check_stopgrad(lambda x, z: bsd([x, z], y=y).mean(), surrogate, tt(S), tt(T))
    # sample 0: CE_a > CE_b? whichever teaches gets no gradient from that sample's row
    a1, b1 = tt(S[:1]).requires_grad_(), tt(T[:1]).requires_grad_()
    bsd([a1, b1], y=torch.tensor([1])).mean().backward()  # class 1: b (teacher logits) is better
    assert torch.count_nonzero(b1.grad) == 0 and torch.count_nonzero(a1.grad) > 0


# --- region-wise BSD ---------------------------------------------------------------------
# two samples x two regions x three classes; sample 1 is unlabelled in the mixed-label case
RA = np.array([[[1.0, 0.2, -0.5], [0.1, 0.9, 0.3]], [[0.4, -1.0, 1.2], [2.0, 0.5, 0.0]]])
RB = np.array([[[0.3, 0.8, 0.0], [1.5, 0.2, -0.4]], [[-0.2, 0.1, 0.6], [0.7, 1.1, -0.3]]])


def np_bsd_region(ra, rb, y, temp, ce_weight):
    """Region-wise BSD written out per sample and region (no vectorisation)."""
    kd, ce, n_lab = [], 0.0, 0
    for i in range(ra.shape[0]):
        ce_i = 0.0
        for r in range(ra.shape[1]):
            la, lb = log_softmax(ra[i, r]), log_softmax(rb[i, r])
            if y[i] >= 0:
                score_a, score_b = -la[y[i]], -lb[y[i]]
                ce_i += (-la[y[i]] - lb[y[i]]) / ra.shape[1]
            else:
                score_a, score_b = -la.max(), -lb.max()
            pa, pb = softmax(ra[i, r] / temp), softmax(rb[i, r] / temp)
            if score_a < score_b:  # a teaches b
                kd.append(temp**2 * (pa * (np.log(pa) - np.log(pb))).sum())
            elif score_b < score_a:
                kd.append(temp**2 * (pb * (np.log(pb) - np.log(pa))).sum())
            else:
                kd.append(0.0)
        if y[i] >= 0:
            ce, n_lab = ce + ce_i, n_lab + 1
    return np.mean(kd) + ce_weight * ce / max(n_lab, 1)


def test_bsd_region_golden_by_hand():
    # one sample, label 0, two regions; T = 1
    # region 0: a uniform (CE ln 3), b = [ln 2, 0, 0] -> p_b = (1/2, 1/4, 1/4), CE ln 2: b teaches,
    #   KL(p_b || u) = 1/2 ln(3/2) + 2 * 1/4 ln(3/4) = 1/2 ln(9/8)
    # region 1: a = [ln 4, 0, 0] -> p_a = (2/3, 1/6, 1/6), CE ln(3/2); b uniform (CE ln 3): a
    #   teaches, KL(p_a || u) = 2/3 ln 2 + 1/3 ln(1/2) = 1/3 ln 2
    # region CE: mean over regions of CE_a + CE_b = (ln 6 + ln(9/2)) / 2 = 3/2 ln 3
    ra = tt([[[0.0, 0.0, 0.0], [math.log(4), 0.0, 0.0]]])
    rb = tt([[[math.log(2), 0.0, 0.0], [0.0, 0.0, 0.0]]])
    kd = (0.5 * math.log(9 / 8) + math.log(2) / 3) / 2
    y = torch.tensor([0])
    assert bsd_region([ra, rb], y=y, ce_weight=0.0).item() == pytest.approx(kd, rel=1e-12)
    want = kd + 1.5 * math.log(3)
    assert bsd_region([ra, rb], y=y).item() == pytest.approx(want, rel=1e-12)
    assert bsd_region([ra, rb], y=y, ce_weight=0.5).item() == pytest.approx(
        kd + 0.75 * math.log(3), rel=1e-12
    )


@pytest.mark.parametrize("y", [[0, 2], [1, -1], [-1, -1]])
@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_bsd_region_golden(y, temp):
    got = bsd_region([tt(RA), tt(RB)], y=torch.tensor(y), temperature=temp).item()
    assert got == pytest.approx(np_bsd_region(RA, RB, np.array(y), temp, 1.0), rel=1e-10)
    if y == [-1, -1]:  # no labels: y=None is the same, and there is no CE
        assert bsd_region([tt(RA), tt(RB)], temperature=temp).item() == pytest.approx(got)


def test_bsd_region_ties_transfer_nothing():
    # equal CE on the label (the other classes swapped): a tie, no KL although p_a != p_b
    ra, rb = tt([[[2.0, 0.0, 1.0]] * 2]), tt([[[2.0, 1.0, 0.0]] * 2])
    ra.requires_grad_(), rb.requires_grad_()
    loss = bsd_region([ra, rb], y=torch.tensor([0]), ce_weight=0.0)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(ra.grad) == 0 and torch.count_nonzero(rb.grad) == 0
    # unlabelled, equal max probability: also a tie
    assert bsd_region([ra, rb], y=torch.tensor([-1])).item() == 0.0


def test_bsd_region_unlabelled_selects_the_more_confident_peer():
    # a is confident in class 2, b in class 0 (less so): unlabelled -> a teaches; with label 0
    # b's CE is lower -> b teaches
    ra, rb = tt([[[0.0, 0.0, 3.0]]]), tt([[[1.0, 0.0, 0.0]]])
    pa, pb = softmax(np.array([0.0, 0.0, 3.0])), softmax(np.array([1.0, 0.0, 0.0]))
    a_teaches = (pa * (np.log(pa) - np.log(pb))).sum()
    b_teaches = (pb * (np.log(pb) - np.log(pa))).sum()
    got_u = bsd_region([ra, rb], y=torch.tensor([-1])).item()
    assert got_u == pytest.approx(a_teaches, rel=1e-12)
    got_l = bsd_region([ra, rb], y=torch.tensor([0]), ce_weight=0.0).item()
    assert got_l == pytest.approx(b_teaches, rel=1e-12)


def test_bsd_region_gradcheck():
    # b's regions are better than a's everywhere (label margin 4, and more confident when
    # unlabelled), so a learns in every region and the selection cannot flip under the
    # finite differences: the loss is smooth in a
    y = torch.tensor([0, -1])
    rb = tt(RB).clone()
    rb[0, :, 0] += 4.0
    rb[1] *= 4.0
    ra = tt(RA).requires_grad_()
    z = rb.clone().requires_grad_()
    bsd_region([ra, z], y=y, ce_weight=0.0).backward()
    assert torch.count_nonzero(z.grad) == 0 and torch.count_nonzero(ra.grad) == ra.numel()
    for temp in (1.0, 2.0):
        f = lambda x, temp=temp: bsd_region([x, rb], y=y, temperature=temp)  # noqa: E731
        assert torch.autograd.gradcheck(f, (ra,))
    # mixed selection: the teaching side of each region gets only its own CE gradient
    yy = torch.tensor([0, 2])
    la, lb = torch.log_softmax(tt(RA), -1), torch.log_softmax(tt(RB), -1)
    idx = yy[:, None, None].expand(-1, 2, 1)
    ce_a, ce_b = -la.gather(-1, idx)[..., 0], -lb.gather(-1, idx)[..., 0]
    a_teaches, b_teaches = (ce_a < ce_b).double(), (ce_b < ce_a).double()
    assert 0 < a_teaches.sum() < 4  # both directions are exercised

    def surrogate(x, z):  # selection and KL targets frozen at RA/RB
        kl = lambda lp_t, s: (lp_t.exp() * (lp_t - torch.log_softmax(s, -1))).sum(-1)  # noqa: E731
        kd = (a_teaches * kl(la, z) + b_teaches * kl(lb, x)).mean()
        lx, lz = torch.log_softmax(x, -1), torch.log_softmax(z, -1)
        return kd - (lx.gather(-1, idx) + lz.gather(-1, idx)).mean()

    check_stopgrad(lambda x, z: bsd_region([x, z], y=yy), surrogate, tt(RA), tt(RB))


def test_bsd_region_input_errors():
    with pytest.raises(ConfigError, match="bsd_region.student"):
        bsd_region(tt(RA))
    with pytest.raises(ConfigError, match="bsd_region.inputs"):
        bsd_region([tt(S), tt(T)])  # (B, K) logits are not region logits
    with pytest.raises(ConfigError, match="bsd_region.inputs"):
        bsd_region([tt(RA), tt(RB[:, :1])])
    with pytest.raises(ConfigError, match="temperature"):
        bsd_region([tt(RA), tt(RB)], temperature=0.0)
    with pytest.raises(ConfigError, match="ce_weight"):
        bsd_region([tt(RA), tt(RB)], ce_weight=-1.0)
    assert LOSSES.meta("bsd_region")["paper"] and not LOSSES.meta("bsd_region").get("stateful")
    assert LOSSES.meta("bsd_region_heads")["stateful"]


def test_region_head_maps_and_tokens():
    torch.manual_seed(0)
    head = RegionHead((8, 4, 4), (10,))
    x = torch.randn(2, 8, 4, 4)
    out = head(x)
    assert out.shape == (2, 4, 10)  # grid 2 -> 4 regions, row-major
    assert torch.allclose(out[:, 0], head.fc(x[:, :, :2, :2].mean((2, 3))), atol=1e-6)
    assert torch.allclose(out[:, 3], head.fc(x[:, :, 2:, 2:].mean((2, 3))), atol=1e-6)
    assert RegionHead((8, 6, 6), (10,), grid=3)(torch.randn(2, 8, 6, 6)).shape == (2, 9, 10)
    # ViT tokens: a leading cls token (17 = 4x4 + 1) is dropped; 16 tokens have none
    head = RegionHead((17, 16), (10,))
    tok = torch.randn(2, 17, 16)
    grid = tok[:, 1:].transpose(1, 2).reshape(2, 16, 4, 4)
    assert torch.allclose(head(tok)[:, 0], head.fc(grid[:, :, :2, :2].mean((2, 3))), atol=1e-6)
    assert RegionHead((16, 16), (10,))(torch.randn(2, 16, 16)).shape == (2, 4, 10)
    # an MLP's vector: its one prediction stands for every region
    head = RegionHead((32,), (10,))
    v = torch.randn(2, 32)
    assert torch.equal(head(v), head.fc(v)[:, None].expand(2, 4, 10))
    for s_shape, t_shape, kw in [
        ((15, 16), (10,), {}),
        ((8, 4, 4), (8, 4, 4), {}),
        ((8, 4, 4), (10,), {"grid": 0}),
    ]:
        with pytest.raises(ConfigError):
            RegionHead(s_shape, t_shape, **kw)


def test_region_bsd_module_heads_feed_bsd_region():
    torch.manual_seed(0)
    mod = RegionBSDLoss([(2, 8, 4, 4), (2, 17, 16), (2, 5), (2, 5)], temperature=2.0).double()
    fa = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    fb = torch.randn(2, 17, 16, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, -1])
    loss = mod([fa, fb, None, None], y=y)
    ref = bsd_region([mod.a(fa), mod.b(fb)], y=y, temperature=2.0)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    loss.backward()
    assert all(p.grad is not None for p in mod.parameters()) and fb.grad is not None
    for bad in [
        [(2, 8, 4, 4), (2, 17, 16)],
        (2, 8, 4, 4),
        [(2, 8, 4, 4), (2, 17, 16), (2, 5), (2, 6)],
    ]:
        with pytest.raises(ConfigError):
            RegionBSDLoss(bad)


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


def test_taid_per_token_with_mask_records_the_masked_loss():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    mod = TAIDLoss(tuple(s.shape), tuple(t.shape)).train()
    per = mod(s, t, mask=mask)
    assert per.shape == (2, 3)
    assert float(mod.last) == pytest.approx(float(per[mask].mean()), rel=1e-6)
