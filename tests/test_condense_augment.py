"""DSA (differentiable siamese augmentation) and FYI's flip union."""

import pytest
import torch

from crossdistill.condense.augment import DSA, FAMILIES, hflip_union
from crossdistill.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("fam", FAMILIES)
def test_siamese_same_params_same_transform(fam):
    g = torch.Generator().manual_seed(0)
    aug = DSA(fam, shared=True)
    a, b = torch.randn(3, 1, 8, 8), torch.randn(5, 1, 8, 8)
    p = aug.sample(a, g)
    both = aug.apply(torch.cat([a, b]), p)
    torch.testing.assert_close(both, torch.cat([aug.apply(a, p), aug.apply(b, p)]))


@pytest.mark.parametrize("fam", FAMILIES)
def test_shapes_and_seeded(fam):
    x = torch.randn(4, 3, 8, 8)
    aug = DSA(fam, shared=False)
    y1 = aug(x, torch.Generator().manual_seed(3))
    y2 = aug(x, torch.Generator().manual_seed(3))
    assert y1.shape == x.shape and torch.equal(y1, y2)


@pytest.mark.parametrize("fam", FAMILIES)
def test_gradcheck_float64(fam):
    g = torch.Generator().manual_seed(1)
    aug = DSA(fam, shared=False)
    x = torch.randn(2, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    p = aug.sample(x, g)
    assert torch.autograd.gradcheck(lambda t: aug.apply(t, p), (x,))


def test_flip_crop_cutout_golden():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    aug = DSA("flip")
    torch.testing.assert_close(
        aug.apply(x, {"family": "flip", "flip": torch.tensor([True])}), x.flip(-1)
    )
    crop = DSA("crop").apply(
        x, {"family": "crop", "dy": torch.tensor([1]), "dx": torch.tensor([-1])}
    )
    expect = torch.zeros(4, 4)  # out[i, j] = x[i + 1, j - 1] with zero fill
    for i in range(4):
        for j in range(4):
            if 0 <= i + 1 < 4 and 0 <= j - 1 < 4:
                expect[i, j] = x[0, 0, i + 1, j - 1]
    torch.testing.assert_close(crop[0, 0], expect)
    cut = DSA("cutout").apply(
        x, {"family": "cutout", "cy": torch.tensor([1]), "cx": torch.tensor([1]), "size": (2, 2)}
    )
    mask = torch.ones(4, 4)
    mask[0:2, 0:2] = 0
    torch.testing.assert_close(cut[0, 0], x[0, 0] * mask)


def test_color_golden():
    x = torch.randn(2, 3, 4, 4)
    p = {
        "family": "color",
        "bright": torch.tensor([0.75]),
        "sat": torch.tensor([0.5]),
        "contrast": torch.tensor([0.25]),
    }
    y = DSA("color").apply(x, p)
    e = x + 0.25 * 1.0
    m = e.mean(1, keepdim=True)
    e = (e - m) * (0.5 * 2.0) + m
    m = e.mean((1, 2, 3), keepdim=True)
    e = (e - m) * (0.25 + 0.5) + m
    torch.testing.assert_close(y, e)


def test_scale_identity_and_rotate_zero():
    x = torch.randn(2, 1, 6, 6)
    s = DSA("scale")  # u chosen so that the sampled scale is exactly 1
    lo, hi = 1 / 1.2, 1.2
    u = torch.tensor([(1 - lo) / (hi - lo)])
    torch.testing.assert_close(
        s.apply(x, {"family": "scale", "sx": u, "sy": u}), x, atol=1e-5, rtol=1e-5
    )
    r = DSA("rotate").apply(x, {"family": "rotate", "theta": torch.tensor([0.5])})
    torch.testing.assert_close(r, x, atol=1e-5, rtol=1e-5)


def test_bad_strategy():
    with pytest.raises(ConfigError, match="dsa_strategy"):
        DSA("color_blur")


def test_hflip_union():
    x = torch.randn(3, 1, 4, 4)
    u = hflip_union(x)
    assert u.shape[0] == 6 and torch.equal(u[3:], x.flip(-1))
