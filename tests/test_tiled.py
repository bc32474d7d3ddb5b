"""Tiled token losses equal the untiled computation in value and gradient, without full logits."""

from __future__ import annotations

import pytest
import torch

from crossdistill.errors import ConfigError
from crossdistill.losses.tiled import tiled_token_loss

B, L, D, DT, V = 2, 7, 8, 6, 50


# Elementwise divergences g(log p, log q) -> (..., V); their sum over v is the divergence.
def fkl(lp, lq):
    return lp.exp() * (lp - lq)


def rkl(lp, lq):
    return lq.exp() * (lq - lp)


def tvd(lp, lq):
    return 0.5 * (lp.exp() - lq.exp()).abs()


def jsd(lp, lq, beta=0.3):
    lm = torch.logaddexp(lp + torch.log(torch.tensor(beta)), lq + torch.log(torch.tensor(1 - beta)))
    return beta * lp.exp() * (lp - lm) + (1 - beta) * lq.exp() * (lq - lm)


ELEMENTWISE = {"fkl": fkl, "rkl": rkl, "tvd": tvd, "jsd": jsd}


def per_row(g):
    return lambda lp, lq: g(lp, lq).sum(-1)


def make(dtype, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)
    h_s, w_s, h_t, w_t = r(B, L, D), r(V, D) * 0.5, r(B, L, DT), r(V, DT) * 0.5
    b_s, b_t = (r(V), r(V)) if bias else (None, None)
    mask = torch.rand(B, L, generator=gen) > 0.3
    mask[0, 0], mask[1, -1] = True, False
    for x in (h_s, w_s, b_s):
        if x is not None:
            x.requires_grad_()
    return h_s, w_s, b_s, h_t, w_t, b_t, mask


def untiled(h_s, w_s, b_s, h_t, w_t, b_t, mask, div, temperature):
    zs = torch.nn.functional.linear(h_s, w_s, b_s) / temperature
    zt = torch.nn.functional.linear(h_t, w_t, b_t).detach() / temperature
    vals = div(torch.log_softmax(zt, -1), torch.log_softmax(zs, -1))
    return vals[mask].sum() / mask.sum()


def grads(loss, xs):
    return torch.autograd.grad(loss, [x for x in xs if x is not None])


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
@pytest.mark.parametrize("vocab_chunk", [None, 16])
def test_matches_untiled(dtype, tol, name, vocab_chunk):
    h_s, w_s, b_s, h_t, w_t, b_t, mask = make(dtype)
    g, temp = ELEMENTWISE[name], 2.0
    ref = untiled(h_s, w_s, b_s, h_t, w_t, b_t, mask, per_row(g), temp)
    got = tiled_token_loss(
        h_s, w_s, h_t, w_t, g, mask=mask, b_s=b_s, b_t=b_t, temperature=temp,
        token_chunk=3, vocab_chunk=vocab_chunk, elementwise=True,
    )  # fmt: skip
    assert got.dtype == dtype
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    for a, b in zip(grads(got, (h_s, w_s, b_s)), grads(ref, (h_s, w_s, b_s))):
        torch.testing.assert_close(a, b, rtol=tol * 10, atol=tol)


def test_per_row_divergence_and_no_bias():
    """A non-elementwise divergence (any per-position function) works with token tiling."""
    h_s, w_s, _, h_t, w_t, _, mask = make(torch.float64, seed=1, bias=False)
    div = lambda lp, lq: (lp.exp() * (lp - lq)).sum(-1) ** 2  # not a sum over v
    ref = untiled(h_s, w_s, None, h_t, w_t, None, mask, div, 1.0)
    got = tiled_token_loss(h_s, w_s, h_t, w_t, div, mask=mask, token_chunk=4)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads(got, (h_s, w_s)), grads(ref, (h_s, w_s))):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("vocab_chunk", [None, 4])
def test_gradcheck(vocab_chunk):
    gen = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    h_s, w_s, b_s = (x.requires_grad_() for x in (r(2, 3, 4), r(10, 4), r(10)))
    h_t, w_t = r(2, 3, 5), r(10, 5)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    fn = lambda h, w, b: tiled_token_loss(
        h, w, h_t, w_t, jsd, mask=mask, b_s=b, temperature=1.5,
        token_chunk=2, vocab_chunk=vocab_chunk, elementwise=True,
    )  # fmt: skip
    assert torch.autograd.gradcheck(fn, (h_s, w_s, b_s))


def test_sum_reduction_and_global_normalisation():
    """Two micro-batches summed then divided by the global count equal one big batch's mean."""
    h_s, w_s, b_s, h_t, w_t, b_t, mask = make(torch.float64)
    kw = dict(b_s=b_s, b_t=b_t, token_chunk=3, vocab_chunk=16, elementwise=True)
    whole = tiled_token_loss(h_s, w_s, h_t, w_t, fkl, mask=mask, **kw)
    parts = [tiled_token_loss(h_s[i], w_s, h_t[i], w_t, fkl, mask=mask[i], reduction="sum", **kw)
             for i in range(B)]  # fmt: skip
    total, count = (sum(x) for x in zip(*parts))
    assert int(count) == int(mask.sum())
    torch.testing.assert_close(total / count, whole, rtol=1e-12, atol=1e-12)


def test_no_valid_tokens_is_zero_with_zero_grad():
    h_s, w_s, b_s, h_t, w_t, b_t, mask = make(torch.float32)
    loss = tiled_token_loss(h_s, w_s, h_t, w_t, fkl, mask=torch.zeros_like(mask), b_s=b_s,
                            elementwise=True)  # fmt: skip
    assert loss.item() == 0.0
    assert all(bool((g == 0).all()) for g in grads(loss, (h_s, w_s, b_s)))


@pytest.mark.parametrize("vocab_chunk", [None, 16])
def test_no_full_logits_tensor(vocab_chunk):
    """Every logits tile built is at most token_chunk x vocab tile, never B*L x V."""
    h_s, w_s, b_s, h_t, w_t, b_t, mask = make(torch.float32)
    shapes = []
    loss = tiled_token_loss(
        h_s, w_s, h_t, w_t, fkl, mask=mask, b_s=b_s, b_t=b_t, token_chunk=3,
        vocab_chunk=vocab_chunk, elementwise=True, _on_chunk=shapes.append,
    )  # fmt: skip
    loss.backward()
    assert shapes
    assert all(n <= 3 and v <= (vocab_chunk or V) for n, v in shapes)
    # each valid token once per pass and model: 1 pass, or 3 when tiled (lse, loss, grad)
    passes = 2 if vocab_chunk is None else 2 * 3
    assert sum(n * v for n, v in shapes) == int(mask.sum()) * V * passes
    assert h_s.grad.shape == h_s.shape and w_s.grad.shape == w_s.shape


def test_no_grad_builds_one_pass():
    h_s, w_s, b_s, h_t, w_t, b_t, mask = make(torch.float32)
    shapes = []
    with torch.no_grad():
        tiled_token_loss(h_s, w_s, h_t, w_t, fkl, mask=mask, token_chunk=3, vocab_chunk=16,
                         elementwise=True, _on_chunk=shapes.append)  # fmt: skip
    assert sum(n * v for n, v in shapes) == int(mask.sum()) * V * 4  # lse + loss passes, 2 models


def test_half_inputs_upcast():
    h_s, w_s, b_s, h_t, w_t, b_t, mask = make(torch.float32)
    h16 = h_s.detach().bfloat16().requires_grad_()
    loss = tiled_token_loss(h16, w_s.detach().bfloat16(), h_t.bfloat16(), w_t.bfloat16(), fkl,
                            mask=mask, token_chunk=3, elementwise=True)  # fmt: skip
    assert loss.dtype == torch.float32
    loss.backward()
    assert h16.grad.dtype == torch.bfloat16 and torch.isfinite(h16.grad).all()


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(vocab_chunk=16), "vocab_chunk"),  # vocabulary tiling without elementwise
        (dict(token_chunk=0), "token_chunk"),
        (dict(temperature=0.0), "temperature"),
        (dict(reduction="none"), "reduction"),
    ],
)
def test_bad_arguments(kw, field):
    h_s, w_s, _, h_t, w_t, _, _ = make(torch.float32)
    with pytest.raises(ConfigError) as err:
        tiled_token_loss(h_s, w_s, h_t, w_t, per_row(fkl), **kw)
    assert err.value.field == field


def test_vocabulary_mismatch():
    h_s, w_s, _, h_t, w_t, _, _ = make(torch.float32)
    with pytest.raises(ConfigError, match="one vocabulary"):
        tiled_token_loss(h_s, w_s, h_t, w_t[:40], per_row(fkl))
