"""Fusion models beyond late fusion: the selective scan (against a closed-form reference,
gradcheck), the Mamba block, ``fusion-ssm``, ``fusion-early`` and the 2-D audio CNN."""

from __future__ import annotations

import pytest
import torch

from crossdistill.errors import ConfigError
from crossdistill.models import create
from crossdistill.models.ssm import MambaBlock, selective_scan

IMG, AUD = (1, 28, 28), (1, 40, 48)


def naive_scan(u, delta, A, B, C, D):
    """The unrolled solution of the recurrence, element by element:
    y[b,t,d] = sum_{s<=t} C[b,t,:] . (prod_{r=s+1..t} exp(delta[b,r,d] A[d,:]))
               * delta[b,s,d] B[b,s,:] u[b,s,d]  +  D[d] u[b,t,d]."""
    nb, L, nd = u.shape
    y = torch.zeros(nb, L, nd, dtype=u.dtype)
    for b in range(nb):
        for d in range(nd):
            for t in range(L):
                acc = D[d] * u[b, t, d]
                for s in range(t + 1):
                    decay = torch.exp(delta[b, s + 1 : t + 1, d].sum() * A[d])  # (N,)
                    acc = acc + (C[b, t] * decay * delta[b, s, d] * B[b, s] * u[b, s, d]).sum()
                y[b, t, d] = acc
    return y


def _scan_inputs(nb=2, L=5, nd=3, n=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(nb, L, nd, generator=g, dtype=dtype)
    delta = torch.rand(nb, L, nd, generator=g, dtype=dtype) * 0.5 + 0.05
    A = -torch.rand(nd, n, generator=g, dtype=dtype) * 2 - 0.1
    B = torch.randn(nb, L, n, generator=g, dtype=dtype)
    C = torch.randn(nb, L, n, generator=g, dtype=dtype)
    D = torch.randn(nd, generator=g, dtype=dtype)
    return u, delta, A, B, C, D


def test_selective_scan_matches_closed_form():
    args = _scan_inputs()
    got = selective_scan(*args)
    assert got.shape == (2, 5, 3)
    assert torch.allclose(got, naive_scan(*args), atol=1e-10)
    # no skip term: D = None is D = 0
    u, delta, A, B, C, D = args
    assert torch.allclose(
        selective_scan(u, delta, A, B, C), naive_scan(u, delta, A, B, C, torch.zeros_like(D))
    )
    # hand value: one channel, one state, two steps
    u = torch.tensor([[[1.0], [2.0]]], dtype=torch.float64)
    delta = torch.tensor([[[0.5], [1.0]]], dtype=torch.float64)
    A = torch.tensor([[-1.0]], dtype=torch.float64)
    B = torch.tensor([[[2.0], [1.0]]], dtype=torch.float64)
    C = torch.tensor([[[1.0], [3.0]]], dtype=torch.float64)
    h1 = 0.5 * 2.0 * 1.0  # exp(0.5 * -1) * 0 + delta B u
    h2 = torch.exp(torch.tensor(-1.0, dtype=torch.float64)) * h1 + 1.0 * 1.0 * 2.0
    want = torch.tensor([[[1.0 * h1 + 0.5 * 1.0], [3.0 * h2 + 0.5 * 2.0]]], dtype=torch.float64)
    got = selective_scan(u, delta, A, B, C, torch.tensor([0.5], dtype=torch.float64))
    assert torch.allclose(got, want)


def test_selective_scan_gradcheck():
    args = [a.requires_grad_() for a in _scan_inputs(nb=1, L=3, nd=2, n=2, seed=1)]
    assert torch.autograd.gradcheck(selective_scan, tuple(args))


def test_mamba_block_is_causal_and_shaped():
    torch.manual_seed(0)
    block = MambaBlock(8, state=4).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    y = block(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    x2 = x.clone()
    x2[:, 4:] += 1.0  # change the future: earlier outputs must not move
    y2 = block(x2)
    assert torch.allclose(y[:, :4], y2[:, :4]) and not torch.allclose(y[:, 4:], y2[:, 4:])
    # the selection: Delta, B, C depend on the input, so A_bar differs per token
    ssm = block.ssm
    assert (-torch.exp(ssm.A_log) < 0).all() and torch.equal(ssm.D, torch.ones_like(ssm.D))


@pytest.fixture(params=["fusion-ssm", "fusion-early"])
def fused(request):
    torch.manual_seed(0)
    kw = {"width": 4, "dim": 16, "depth": 2} if request.param == "fusion-ssm" else {"width": 8}
    return create(request.param, num_classes=10, **kw)


def test_fusion_models_shapes_taps_missing(fused):
    m = fused.eval()
    assert m.family == "fusion" and m.feature_path == "fc"
    modules = dict(m.named_modules())
    assert m.stages and all(s in modules for s in m.stages)
    img, aud = torch.randn(3, *IMG), torch.randn(3, *AUD)
    with torch.no_grad():
        both = m(img, aud)
        assert both.shape == (3, 10) and torch.isfinite(both).all()
        # a missing modality: an all-zero input is the same as leaving it out
        assert torch.allclose(m(img, torch.zeros_like(aud)), m(img), atol=1e-6)
        assert torch.allclose(m(torch.zeros_like(img), aud), m(audio=aud), atol=1e-6)
        # per sample: row 1 without audio equals that image alone
        aud2 = aud.clone()
        aud2[1] = 0
        mixed = m(img, aud2)
        assert torch.allclose(mixed[0], both[0], atol=1e-6)
        assert torch.allclose(mixed[1], m(img[1:2])[0], atol=1e-5)
        assert torch.isfinite(m(torch.zeros_like(img), torch.zeros_like(aud))).all()
        # other input sizes: the stems pool to their grid
        assert m(torch.randn(2, 1, 32, 32), torch.randn(2, 1, 24, 30)).shape == (2, 10)
    with pytest.raises(ConfigError):
        m()


def test_fusion_missing_stem_gets_no_gradient(fused):
    m = fused.train()
    m(torch.randn(4, *IMG), torch.zeros(4, *AUD)).sum().backward()
    audio = [p for n, p in m.named_parameters() if n.startswith("audio_stem.")]
    image = [p for n, p in m.named_parameters() if n.startswith("image_stem.")]
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in audio)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in image)


def test_fusion_models_learn_a_toy_batch(fused):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(8) % 4
    img = torch.randn(8, *IMG, generator=g) + y.view(-1, 1, 1, 1)
    aud = torch.randn(8, *AUD, generator=g) - y.view(-1, 1, 1, 1)
    opt = torch.optim.Adam(fused.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = torch.nn.functional.cross_entropy(fused(img, aud), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_fusion_ssm_orders_and_errors():
    torch.manual_seed(0)
    m = create("fusion-ssm", width=4, dim=8, depth=1, order="concat", grid=(2, 3))
    assert m(torch.randn(2, *IMG), torch.randn(2, *AUD)).shape == (2, 10)
    assert m.stages == ["blocks.0"]
    with pytest.raises(ConfigError, match="order"):
        create("fusion-ssm", order="zip")
    with pytest.raises(ConfigError, match="grid"):
        create("fusion-ssm", grid=0)
    with pytest.raises(ConfigError, match="state"):
        create("fusion-ssm", state=0)
    with pytest.raises(ConfigError, match="grid"):
        create("fusion-early", grid=(4, 0))
    # builder-style arguments (img_size, in_channels from the image key) are accepted
    assert create("fusion-early", img_size=28, in_channels=1, num_classes=3, width=4)(
        torch.randn(2, *IMG), torch.randn(2, *AUD)
    ).shape == (2, 3)


def test_audio_cnn2d_on_log_mels():
    torch.manual_seed(0)
    m = create("audio-cnn2d", num_classes=10, channels=(8, 16, 16))
    assert m.family == "audio" and m.feature_path == "fc"
    x = torch.randn(4, *AUD)
    assert m(x).shape == (4, 10)
    assert m(torch.randn(4, 1, 40, 31)).shape == (4, 10)  # any frame count
    # the plain zoo cnn with img_size=(n_mels, frames) is the same network
    plain = create("cnn", num_classes=10, in_channels=1, img_size=(40, 48), channels=(8, 16, 16))
    plain.load_state_dict(m.state_dict())
    assert torch.allclose(plain.eval()(x), m.eval()(x))
    with pytest.raises(ConfigError, match="in_channels"):
        create("audio-cnn2d", in_channels=3)
