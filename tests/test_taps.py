import pytest
import torch
from torch import nn

from crossdistill import ConfigError, Distiller, Tap, Term
from crossdistill.taps import Capture


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.body(x)
        return self.head(h), {"hidden": h}


def test_parse_forms():
    assert Tap.parse("layer3") == Tap("layer3")
    assert Tap.parse("head:input") == Tap("head", "input")
    assert Tap.parse("enc[0]") == Tap("enc", "output", 0)
    assert Tap.parse("enc:output['h']") == Tap("enc", "output", "h")
    assert Tap.parse({"path": "a", "kind": "input"}) == Tap("a", "input")
    with pytest.raises(ConfigError):
        Tap("a", "sideways")


def test_bad_path_lists_nearest(tiny_cnn):
    with pytest.raises(ConfigError) as e:
        Distiller(tiny_cnn, tiny_cnn, [Term("mse", student="stage9", teacher="stage3")])
    msg = str(e.value)
    assert "stage9" in msg and "nearest valid paths" in msg and "stage1" in msg


def test_capture_output_input_and_select():
    m = TupleOut()
    cap = Capture(
        m, {"h": Tap("head", "input"), "o0": Tap("", "output", 0), "d": Tap("", "output", 1)}, "t"
    )
    with pytest.raises(ConfigError):  # a dict is not a tensor without select
        cap.active = True
        m(torch.randn(2, 4))
    cap.remove()
    cap = Capture(m, {"h": Tap("head", "input"), "o0": Tap("", "output", 0)}, "t")
    cap.active = True
    out, extra = m(torch.randn(2, 4))
    assert torch.equal(cap.get("h"), extra["hidden"]) and torch.equal(cap.get("o0"), out)


def test_inactive_capture_stores_nothing_and_missing_tap_errors():
    m = TupleOut()
    cap = Capture(m, {"b": Tap("body")}, "t")
    m(torch.randn(2, 4))
    with pytest.raises(RuntimeError, match="did not fire"):
        cap.get("b")


def test_unused_module_tap_fails_at_build(tiny_cnn):
    class Extra(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.unused = inner, nn.Linear(3, 3)

        def forward(self, x):
            return self.inner(x)

    s = Extra(tiny_cnn)
    d = Distiller(s, tiny_cnn, [Term("mse", student="unused", teacher="fc")])
    with pytest.raises(RuntimeError, match="did not fire"):
        d.build({"x": torch.randn(2, 1, 8, 8), "y": torch.zeros(2, dtype=torch.long)})
