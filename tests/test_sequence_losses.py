"""Token-level sequence losses (fkl, rkl, jsd, tvd, skl, srkl) and the top-k tail-bucket KL:
golden values by hand on 2-4 class toys, the beta/alpha end cases, symmetry, non-negativity,
float64 gradchecks, masked means over valid tokens, extreme logits, and TRL's GKD loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from crossdistill import ConfigError, Term, schema
from crossdistill.context import Context
from crossdistill.losses import divergences as D
from crossdistill.losses.logits import kd, rkl
from crossdistill.losses.sequence import fkl, jsd, skl, srkl, tvd
from crossdistill.registry import LOSSES
from crossdistill.teachers.store import topk_decode

ln = math.log
P, Q = [0.5, 0.5], [0.25, 0.75]  # teacher p, student q (two classes)


def _toy(p=P, q=Q):
    """Logits whose softmax is exactly q (student) and p (teacher), float64."""
    f64 = torch.float64
    return torch.tensor([q], dtype=f64).log(), torch.tensor([p], dtype=f64).log()


def _kl(a, b):
    return sum(x * ln(x / y) for x, y in zip(a, b, strict=True) if x > 0)


def _mix(w, a, b):
    return [w * x + (1 - w) * y for x, y in zip(a, b, strict=True)]


M = _mix(0.5, P, Q)
GOLDEN = {  # by hand, from the definitions in the docstrings
    "fkl": (fkl, {}, 0.5 * ln(0.5 / 0.25) + 0.5 * ln(0.5 / 0.75)),
    "rkl": (rkl, {}, 0.25 * ln(0.25 / 0.5) + 0.75 * ln(0.75 / 0.5)),
    "jsd0": (jsd, {"beta": 0.0}, 0.5 * ln(4 / 3)),
    "jsd.5": (
        jsd,
        {"beta": 0.5},
        0.5 * (0.5 * ln(0.5 / 0.375) + 0.5 * ln(0.5 / 0.625))
        + 0.5 * (0.25 * ln(0.25 / 0.375) + 0.75 * ln(0.75 / 0.625)),
    ),
    "jsd1": (jsd, {"beta": 1.0}, 0.25 * ln(0.5) + 0.75 * ln(1.5)),
    "tvd": (tvd, {}, 0.25),
    "skl": (skl, {"alpha": 0.1}, 0.5 * ln(0.5 / 0.275) + 0.5 * ln(0.5 / 0.725)),
    "srkl": (srkl, {"alpha": 0.1}, 0.25 * ln(0.25 / 0.475) + 0.75 * ln(0.75 / 0.525)),
}


@pytest.mark.parametrize("key", sorted(GOLDEN))
def test_golden_two_classes(key):
    fn, kw, want = GOLDEN[key]
    s, t = _toy()
    got = fn(s, t, **kw)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_golden_three_classes_and_zero_probability():
    p, q = [0.7, 0.2, 0.1], [0.2, 0.5, 0.3]
    s, t = _toy(p, q)
    assert fkl(s, t).item() == pytest.approx(_kl(p, q), rel=1e-12)
    m = _mix(0.3, p, q)
    want = 0.3 * _kl(p, m) + 0.7 * _kl(q, m)
    assert jsd(s, t, beta=0.3).item() == pytest.approx(want, rel=1e-12)
    assert skl(s, t, alpha=0.2).item() == pytest.approx(_kl(p, _mix(0.2, p, q)), rel=1e-12)
    assert srkl(s, t, alpha=0.2).item() == pytest.approx(_kl(q, _mix(0.2, q, p)), rel=1e-12)
    # a teacher with an exactly-zero class: 0 * log 0 = 0, finite value and gradient
    lp = torch.tensor([0.0, -math.inf, -math.inf], dtype=torch.float64)
    lq = torch.tensor(q, dtype=torch.float64).log().requires_grad_()
    val = D.kl(lp, lq)
    val.backward()
    assert val.item() == pytest.approx(-ln(0.2), rel=1e-12)
    assert torch.isfinite(lq.grad).all()


def test_fkl_is_unscaled_kd():
    s, t = _logits(0), _logits(1)
    torch.testing.assert_close(fkl(s, t, temperature=4.0) * 16, kd(s, t, temperature=4.0))
    torch.testing.assert_close(fkl(s, t), kd(s, t, temperature=1.0))


def _logits(seed, shape=(4, 6, 7), scale=3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def test_jsd_ends_are_the_kls_and_the_interior_vanishes_there():
    s, t = _logits(2), _logits(3)
    assert torch.equal(jsd(s, t, beta=0.0), fkl(s, t))
    assert torch.equal(jsd(s, t, beta=1.0), rkl(s, t))
    # the documented trap: JSD_beta -> 0 at the ends, JSD_beta / beta -> FKL
    eps = 1e-6
    torch.testing.assert_close(jsd(s, t, beta=eps) / eps, fkl(s, t), rtol=5e-3, atol=1e-6)
    torch.testing.assert_close(jsd(s, t, beta=1 - eps) / eps, rkl(s, t), rtol=5e-3, atol=1e-6)
    assert (jsd(s, t, beta=1e-3) < 0.01 * fkl(s, t)).all()


def test_skew_alpha_zero_is_fkl_rkl_and_one_is_zero():
    s, t = _logits(4), _logits(5)
    assert torch.equal(skl(s, t, alpha=0.0), fkl(s, t))
    assert torch.equal(srkl(s, t, alpha=0.0), rkl(s, t))
    assert skl(s, t, alpha=1.0).abs().max() == 0
    assert srkl(s, t, alpha=1.0).abs().max() == 0


def test_symmetries():
    s, t = _logits(6), _logits(7)
    torch.testing.assert_close(jsd(s, t, beta=0.5), jsd(t, s, beta=0.5))
    torch.testing.assert_close(jsd(s, t, beta=0.3), jsd(t, s, beta=0.7))
    torch.testing.assert_close(tvd(s, t), tvd(t, s))


ALL = [
    (fkl, {}),
    (rkl, {}),
    (jsd, {"beta": 0.5}),
    (jsd, {"beta": 0.1}),
    (tvd, {}),
    (skl, {"alpha": 0.1}),
    (srkl, {"alpha": 0.1}),
]
IDS = ["fkl", "rkl", "jsd.5", "jsd.1", "tvd", "skl", "srkl"]


@pytest.mark.parametrize("fn,kw", ALL, ids=IDS)
def test_nonnegative_and_zero_on_equal(fn, kw):
    for seed in range(5):
        s, t = _logits(10 + seed, scale=1 + 2 * seed), _logits(20 + seed, scale=1 + 2 * seed)
        assert (fn(s, t, **kw) >= -1e-12).all()
        assert fn(t, t, **kw).abs().max() < 1e-12
    s, t = _logits(30, dtype=torch.float32), _logits(31, dtype=torch.float32)
    val = fn(s, t, **kw, temperature=2.0)
    assert val.dtype == torch.float32 and (val >= -1e-6).all()


@pytest.mark.parametrize("fn,kw", ALL, ids=IDS)
def test_gradcheck_float64(fn, kw):
    s = _logits(40, shape=(2, 3, 4), scale=1.0).requires_grad_()
    t = _logits(41, shape=(2, 3, 4), scale=1.0)
    assert torch.autograd.gradcheck(lambda x: fn(x, t, **kw, temperature=1.5), (s,))


def test_teacher_gets_no_gradient():
    s, t = _logits(42).requires_grad_(), _logits(43).requires_grad_()
    jsd(s, t).sum().backward()
    assert t.grad is None and s.grad is not None


@pytest.mark.parametrize("fn,kw", ALL, ids=IDS)
def test_extreme_logits_stay_finite(fn, kw):
    """Spread 200 in float32: both softmaxes underflow to exact zeros on some classes, where
    DistiLLM's probability-space mixture gives 0 * log 0 = NaN."""
    s = torch.tensor([[100.0, -100.0, 0.0], [-100.0, 100.0, -100.0]], requires_grad=True)
    t = torch.tensor([[100.0, -100.0, -100.0], [-100.0, -100.0, 100.0]])
    val = fn(s, t, **kw)
    val.sum().backward()
    assert torch.isfinite(val).all() and torch.isfinite(s.grad).all()
    assert val[0].item() == pytest.approx(0.0, abs=1e-6)


# -- masks: the Term's mean over valid tokens, TRL's sum / num_valid reduction ---------------

LABELS = torch.tensor([[3, -100, 1, 0, -100, -100], [2, 2, -100, 5, 1, 6]])


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_jsd_term_averages_over_valid_tokens_only(beta):
    s, t = _logits(50, shape=(2, 6, 7)).requires_grad_(), _logits(51, shape=(2, 6, 7))
    valid = LABELS != -100
    per = jsd(s, t, beta=beta)
    assert per.shape == (2, 6)
    got = Term("jsd", beta=beta).reduce(per, Context(mask=valid))
    assert got.item() == pytest.approx(per[valid].sum().item() / valid.sum().item(), rel=1e-12)
    got.backward()
    assert (s.grad[~valid] == 0).all() and (s.grad[valid].abs().sum(-1) > 0).all()


def test_registered_with_paper_and_validated_ranges():
    for name in ("fkl", "jsd", "tvd", "skl", "srkl"):
        meta = LOSSES.meta(name)
        assert meta["paper"] and meta["year"] >= 2023 and meta["inputs"] == "logits"
    assert schema.check(jsd, {"beta": 0.2}, "terms.0", "loss", positional=2) == {"beta": 0.2}
    with pytest.raises(ConfigError, match="beta"):
        schema.check(jsd, {"beta": 1.5}, "terms.0", "loss", positional=2)
    with pytest.raises(ConfigError, match="alpha"):
        schema.check(skl, {"alpha": -0.1}, "terms.0", "loss", positional=2)
    with pytest.raises(ConfigError, match="temperature"):
        schema.check(tvd, {"temperature": 0.0}, "terms.0", "loss", positional=2)
    s, t = _logits(52), _logits(53)
    with pytest.raises(ConfigError, match=r"jsd\.beta"):
        jsd(s, t, beta=1.5)
    with pytest.raises(ConfigError, match="vocabularies differ"):
        fkl(s, t[..., :5])


# -- sparse top-k KL with a tail bucket ------------------------------------------------------


def test_topk_kl_golden_with_tail():
    pt, q = [0.5, 0.3, 0.1, 0.1], [0.25, 0.25, 0.3, 0.2]
    lq = torch.tensor(q, dtype=torch.float64).log()
    vals = torch.tensor([0.5, 0.3], dtype=torch.float64).log()
    want = 0.5 * ln(0.5 / 0.25) + 0.3 * ln(0.3 / 0.25) + 0.2 * ln(0.2 / 0.5)
    got = D.topk_kl(vals, torch.tensor([0, 1]), lq)
    assert got.item() == pytest.approx(want, rel=1e-12)
    # the order of the stored classes does not matter; indices pick the student's classes
    got = D.topk_kl(vals.flip(0), torch.tensor([1, 0]), lq)
    assert got.item() == pytest.approx(want, rel=1e-12)
    # k = V - 1: the tail is one class, so the bucket KL is the exact KL
    exact = D.topk_kl(torch.tensor(pt[:3], dtype=torch.float64).log(), torch.tensor([0, 1, 2]), lq)
    assert exact.item() == pytest.approx(_kl(pt, q), rel=1e-12)
    # k = V: no tail bucket
    full = D.topk_kl(torch.tensor(pt, dtype=torch.float64).log(), torch.arange(4), lq)
    assert full.item() == pytest.approx(_kl(pt, q), rel=1e-12)


def test_topk_kl_lower_bounds_the_decoded_store_and_has_gradients():
    s, t = _logits(60, shape=(3, 5, 11)), _logits(61, shape=(3, 5, 11))
    lp = F.log_softmax(t, -1)
    vals, idx = lp.topk(4, dim=-1)
    dense = F.log_softmax(topk_decode(vals, idx, torch.zeros(3, 5), 11).double(), -1)
    lq = F.log_softmax(s, -1)
    sparse = D.topk_kl(vals, idx, lq)
    assert (sparse <= D.kl(dense, lq) + 1e-6).all() and (sparse <= D.kl(lp, lq) + 1e-12).all()
    assert (sparse >= -1e-12).all()
    x = _logits(62, shape=(2, 3, 6), scale=1.0).requires_grad_()
    v, i = F.log_softmax(_logits(63, shape=(2, 3, 6)), -1).topk(2, dim=-1)
    assert torch.autograd.gradcheck(lambda z: D.topk_kl(v, i, F.log_softmax(z, -1)), (x,))


def test_topk_kl_student_tail_is_stable():
    """The student's tail is a logsumexp over the other classes, not 1 - sum: a tail of
    e^-60 stays exact (1 - sum would round it to 0 and give an infinite KL)."""
    lq = torch.tensor([[0.0, -60.0, -60.0]], dtype=torch.float32)
    lq = lq - lq.logsumexp(-1, keepdim=True)
    vals = torch.tensor([[math.log(0.9)]])
    got = D.topk_kl(vals, torch.tensor([[0]]), lq)
    want = 0.9 * ln(0.9) + 0.1 * (ln(0.1) - (-60 + ln(2)))
    assert torch.isfinite(got).all() and got.item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="leading dims"):
        D.topk_kl(vals, torch.tensor([[0, 1]]), lq)


# -- TRL's GKD loss on the same tensors (skipped when trl is not installed) ------------------


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_matches_trl_generalized_jsd(beta, temperature):
    pytest.importorskip("trl")
    try:
        from trl.experimental.gkd import GKDTrainer
    except ImportError:
        from trl import GKDTrainer
    s, t = _logits(70, shape=(2, 6, 9)), _logits(71, shape=(2, 6, 9))
    # TRL: masked token sum / number of tokens with labels != -100 ("batchmean")
    want = GKDTrainer.generalized_jsd_loss(s, t, labels=LABELS, beta=beta, temperature=temperature)
    per = jsd(s, t, beta=beta, temperature=temperature)
    got = Term("jsd", beta=beta).reduce(per, Context(mask=LABELS != -100))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
