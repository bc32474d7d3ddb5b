"""Masks and -100 labels through every logit loss: golden values against numpy, and zero
gradients on the positions that do not count."""

import numpy as np
import pytest
import torch
from torch import nn

from crossdistill import ConfigError, Distiller, Term
from crossdistill.context import Context, masked_mean
from crossdistill.losses.logits import ce, dist, dkd, kd, rkl

B, L, V = 2, 3, 5


def _logits(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, V, generator=g, dtype=torch.float64).float() * 2


def _labels():
    return torch.tensor([[1, -100, 4], [0, 2, -100]])


def _np(x):
    return x.detach().double().numpy()


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _kl(p, q):  # KL(p || q) over the last axis
    return (p * (np.log(p) - np.log(q))).sum(-1)


def np_kd(s, t, T=4.0):
    return T * T * _kl(_softmax(t / T), _softmax(s / T))


def np_rkl(s, t, T=1.0):
    return T * T * _kl(_softmax(s / T), _softmax(t / T))


def np_dkd(s, t, y, alpha=1.0, beta=8.0, T=4.0):
    out = np.zeros(y.shape)
    for pos in np.ndindex(*y.shape):
        c = y[pos]
        if c == -100:
            continue
        ps, pt = _softmax(s[pos] / T), _softmax(t[pos] / T)
        bs, bt = np.array([ps[c], 1 - ps[c]]), np.array([pt[c], 1 - pt[c]])
        others = [k for k in range(s.shape[-1]) if k != c]
        hs, ht = _softmax(s[pos][others] / T), _softmax(t[pos][others] / T)
        out[pos] = T * T * (alpha * _kl(bt, bs) + beta * _kl(ht, hs))
    return out


def np_ce(s, y):
    out = np.zeros(y.shape)
    for pos in np.ndindex(*y.shape):
        if y[pos] != -100:
            out[pos] = -np.log(_softmax(s[pos])[y[pos]])
    return out


def np_pearson_mean(a, b):
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    return ((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-8)).mean()


def np_dist(s, t, T=4.0):
    ps, pt = _softmax(s / T), _softmax(t / T)
    return T * T * ((1 - np_pearson_mean(ps, pt)) + (1 - np_pearson_mean(ps.T, pt.T)))


# -- ce ------------------------------------------------------------------------------------


def test_ce_ignores_unlabelled_positions_over_BLV():
    s, y = _logits(0), _labels()
    per = ce(s, y=y)
    assert per.shape == (B, L)
    assert torch.all(per[y == -100] == 0)
    got = Term("ce").reduce(per, Context(y=y))
    ref = np_ce(_np(s), y.numpy())[y.numpy() != -100].mean()
    assert got.item() == pytest.approx(ref, rel=1e-5)
    # the same as PyTorch's ignore_index mean
    ref_t = nn.functional.cross_entropy(s.reshape(-1, V), y.reshape(-1), ignore_index=-100)
    assert torch.allclose(got, ref_t, atol=1e-6)


def test_ce_label_and_context_mask_combine():
    s, y = _logits(0), _labels()
    mask = torch.tensor([[True, True, False], [True, True, True]])  # also drop (0, 2)
    got = Term("ce").reduce(ce(s, y=y), Context(y=y, mask=mask))
    keep = (y.numpy() != -100) & mask.numpy()
    assert got.item() == pytest.approx(np_ce(_np(s), y.numpy())[keep].mean(), rel=1e-5)


def test_ce_label_smoothing_per_position():
    s, y = _logits(0), _labels()
    eps = 0.2
    got = Term("ce", label_smoothing=eps).reduce(ce(s, y=y, label_smoothing=eps), Context(y=y))
    logp = np.log(_softmax(_np(s)))
    vals = []
    for pos in np.ndindex(B, L):
        c = y.numpy()[pos]
        if c != -100:
            q = np.full(V, eps / V)
            q[c] += 1 - eps
            vals.append(-(q * logp[pos]).sum())
    assert got.item() == pytest.approx(np.mean(vals), rel=1e-5)


# -- kd / rkl / dkd per position -----------------------------------------------------------

MASK = torch.tensor([[True, False, True], [False, True, True]])


@pytest.mark.parametrize("name,fn,ref", [("kd", kd, np_kd), ("rkl", rkl, np_rkl)])
def test_soft_losses_per_position_and_masked_mean(name, fn, ref):
    s, t = _logits(0), _logits(1)
    per = fn(s, t)
    assert per.shape == (B, L)
    hand = ref(_np(s), _np(t))
    np.testing.assert_allclose(_np(per), hand, rtol=1e-5, atol=1e-6)
    got = Term(name).reduce(per, Context(mask=MASK))
    assert got.item() == pytest.approx(hand[MASK.numpy()].mean(), rel=1e-5)
    assert Term(name).reduce(per, Context()).item() == pytest.approx(hand.mean(), rel=1e-5)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_temperature(T):
    s, t = _logits(2), _logits(3)
    np.testing.assert_allclose(_np(kd(s, t, temperature=T)), np_kd(_np(s), _np(t), T), rtol=1e-5)
    np.testing.assert_allclose(
        _np(rkl(s, t, temperature=T)), np_rkl(_np(s), _np(t), T), rtol=1e-5, atol=1e-7
    )


def test_dkd_per_position_with_unlabelled_and_mask():
    s, t, y = _logits(0), _logits(1), _labels()
    per = dkd(s, t, y=y)
    assert per.shape == (B, L)
    hand = np_dkd(_np(s), _np(t), y.numpy())
    np.testing.assert_allclose(_np(per), hand, rtol=1e-4, atol=1e-6)
    assert torch.all(per[y == -100] == 0)
    mask = y != -100  # the LM task's mask: labelled positions
    got = Term("dkd").reduce(per, Context(y=y, mask=mask))
    assert got.item() == pytest.approx(hand[mask.numpy()].mean(), rel=1e-4)


def test_dkd_equals_kd_decomposition():
    """Classic KD = TCKD + (1 - p_y^t) NCKD (Eq. 1 of DKD), per position (T=1, alpha=1)."""
    s, t, y = _logits(4), _logits(5), torch.tensor([[0, 1, 2], [3, 4, 0]])
    T = 1.0
    tc = dkd(s, t, y=y, alpha=1.0, beta=0.0, temperature=T)
    nc = dkd(s, t, y=y, alpha=0.0, beta=1.0, temperature=T)
    p_y = torch.softmax(t, -1).gather(-1, y[..., None])[..., 0]
    assert torch.allclose(kd(s, t, temperature=T), tc + (1 - p_y) * nc, atol=1e-5)


def test_dkd_unlabelled_samples_left_out_of_mean_in_classification():
    """dkd's docstring: positions with y = -100 'return 0 and the Term leaves them out of the
    mean'. Classification has no loss mask, so the Term itself must drop them."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, V, generator=g), torch.randn(4, V, generator=g)
    y = torch.tensor([1, -100, 3, -100])
    per = dkd(s, t, y=y)
    got = Term("dkd").reduce(per, Context(y=y))
    assert got.item() == pytest.approx(per[y != -100].mean().item(), rel=1e-6)


# -- dist ----------------------------------------------------------------------------------


def test_dist_with_mask_equals_dist_on_kept_rows():
    s, t = _logits(0), _logits(1)
    got = dist(s, t, mask=MASK)
    kept = dist(s[MASK], t[MASK])
    assert got.dim() == 0
    assert torch.allclose(got, kept, atol=1e-6)
    assert got.item() == pytest.approx(np_dist(_np(s[MASK]), _np(t[MASK])), rel=1e-5)
    # no mask: all B*L rows
    assert torch.allclose(dist(s, t), dist(s.reshape(-1, V), t.reshape(-1, V)), atol=1e-6)
    assert Term("dist").reduce(got, Context(mask=MASK)) is got  # scalars pass through


def test_dist_gradient_zero_on_dropped_rows():
    s, t = _logits(0).requires_grad_(), _logits(1)
    dist(s, t, mask=MASK).backward()
    assert torch.all(s.grad[~MASK] == 0)
    assert torch.all(s.grad[MASK].abs().sum(-1) > 0)


# -- masked_mean ---------------------------------------------------------------------------


def test_masked_mean_all_false_is_zero_without_nan():
    v = torch.tensor([[1.0, float("nan")], [3.0, 4.0]]).requires_grad_()
    m = torch.zeros(2, 2, dtype=torch.bool)
    out = masked_mean(v, m)
    assert out.item() == 0.0
    out.backward()
    assert not torch.isnan(v.grad).any() and torch.all(v.grad == 0)
    # a NaN/inf at a masked-out position never leaks into the mean
    m2 = torch.tensor([[True, False], [True, True]])
    assert masked_mean(v, m2).item() == pytest.approx(8 / 3)


def test_masked_mean_none_is_plain_mean():
    v = torch.arange(6.0).view(2, 3)
    assert masked_mean(v, None).item() == pytest.approx(2.5)


def test_mask_with_more_dims_keeps_samples_with_any_valid_position():
    v = torch.tensor([1.0, 2.0, 3.0, 10.0])  # a per-sample loss
    m = torch.tensor([[False, False], [True, False], [False, True], [False, False]])
    assert masked_mean(v, m).item() == pytest.approx(2.5)
    m3 = torch.zeros(4, 2, 2, dtype=torch.bool)
    m3[3, 1, 1] = True
    assert masked_mean(v, m3).item() == pytest.approx(10.0)


def test_mask_shape_mismatch_is_config_error():
    with pytest.raises(ConfigError, match=r"terms.kd.*\(2, 3\) vs mask \(2, 4\)"):
        Term("kd").reduce(torch.zeros(2, 3), Context(mask=torch.ones(2, 4, dtype=torch.bool)))


# -- gradients -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ce", "kd", "rkl", "dkd"])
def test_masked_positions_get_zero_gradient(name):
    s, t, y = _logits(0).requires_grad_(), _logits(1), _labels()
    mask = torch.tensor([[True, True, False], [False, True, True]])
    fns = {
        "ce": lambda: ce(s, y=y),
        "kd": lambda: kd(s, t),
        "rkl": lambda: rkl(s, t),
        "dkd": lambda: dkd(s, t, y=y),
    }
    Term(name).reduce(fns[name](), Context(y=y, mask=mask)).backward()
    counts = mask if name in ("kd", "rkl") else mask & (y != -100)
    assert torch.all(s.grad[~counts] == 0)
    assert torch.all(s.grad[counts].abs().sum(-1) > 0)
    assert torch.isfinite(s.grad).all()


# -- through a Distiller forward (the LM task's mask = labelled positions) -----------------


class TokenModel(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(7, V)

    def forward(self, input_ids):
        return {"logits": self.emb(input_ids) * 2}


def test_distiller_forward_lm_masks_every_term():
    student, teacher = TokenModel(0), TokenModel(1)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    y = _labels()
    batch = {"input_ids": ids, "labels": y}
    terms = [Term("ce"), Term("kd"), Term("rkl"), Term("dkd"), Term("dist")]
    d = Distiller(student, teacher, terms, task="lm").build(batch)
    d.eval()
    out = d(batch)
    s, t = student(ids)["logits"], teacher(ids)["logits"]
    keep = (y != -100).numpy()
    S, T_, Y = _np(s), _np(t), y.numpy()
    hand = {
        "ce": np_ce(S, Y)[keep].mean(),
        "kd": np_kd(S, T_)[keep].mean(),
        "rkl": np_rkl(S, T_)[keep].mean(),
        "dkd": np_dkd(S, T_, Y)[keep].mean(),
        "dist": np_dist(S[keep], T_[keep]),
    }
    for k, v in hand.items():
        assert out.losses[k].item() == pytest.approx(v, rel=1e-4), k
    # gradients reach only the labelled positions' embeddings through every term
    out.total.backward()
    used = {int(i) for i in ids[y != -100]}
    for tok in range(7):
        g = student.emb.weight.grad[tok]
        assert (g.abs().sum() > 0) == (tok in used), tok


# -- the heterogeneous family's logit losses: per position over any leading dims -----------
@pytest.mark.parametrize("name", ["ofa", "pld", "dml", "bsd"])
def test_hetero_logit_losses_per_position_and_masked(name):
    from crossdistill.losses import hetero

    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (2, 5), generator=g)
    y[0, 1] = -100
    fn = getattr(hetero, name)

    def call(a, b, labels):
        if name == "dml":
            return fn([a, b])
        if name == "bsd":
            return fn([a, b], y=labels)
        return fn(a, b, y=labels)

    per = call(s, t, y)
    assert per.shape == (2, 5)
    flat = call(s.reshape(-1, 7), t.reshape(-1, 7), y.reshape(-1)).view(2, 5)  # the 2-D golden path
    torch.testing.assert_close(per, flat)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    got = masked_mean(per, mask)
    torch.testing.assert_close(got, per[mask].mean())
    got.backward()
    assert not s.grad[1, 3:].any() and s.grad[0, 0].abs().sum() > 0
