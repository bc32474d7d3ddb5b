import pytest
import torch

from crossdistill import ConfigError
from crossdistill import projectors as P


@pytest.mark.parametrize(
    "s,t,name",
    [
        ((16,), (16,), "identity"),
        ((16,), (32,), "linear"),
        ((8, 4, 4), (16, 2, 2), "conv1x1"),
        ((17, 8), (16, 4, 4), "tokens_to_map"),
        ((8, 4, 4), (17, 12), "map_to_tokens"),
        ((17, 8), (17, 12), "linear"),
        ((17, 8), (5, 12), "tokens"),
        ((8, 4, 4), (10,), "pool"),
        ((16, 8), (10,), "pool"),
    ],
)
def test_auto_choice_and_shapes(s, t, name):
    assert P.choose(s, t) == name
    proj = P.build("auto", s, t)
    y = proj(torch.randn(3, *s))
    assert tuple(y.shape) == (3, *t)
    if name != "identity":
        y.sum().backward()
        assert all(p.grad is not None for p in proj.parameters())


def test_unbridgeable_shapes_are_config_errors():
    with pytest.raises(ConfigError, match="no projector can bridge"):
        P.choose((16,), (8, 4, 4))
    with pytest.raises(ConfigError, match="square"):
        P.build("tokens_to_map", (7, 8), (16, 4, 4))


def test_tokens_to_map_drops_cls():
    x = torch.arange(2 * 5 * 3, dtype=torch.float).view(2, 5, 3)
    m = P.tokens_to_map(x)
    assert m.shape == (2, 3, 2, 2)
    assert torch.equal(m[0, :, 0, 0], x[0, 1])


def test_mlp_projector():
    p = P.build("mlp", (8, 2, 2), (10,), hidden=12)
    assert p(torch.randn(4, 8, 2, 2)).shape == (4, 10)
