"""DHO: dual heads on one trunk, the val-chosen mix, and a tiny semi-supervised run."""

import math

import pytest
import torch

import crossdistill as cd
from crossdistill.errors import ConfigError
from crossdistill.methods import build
from crossdistill.methods.dho import MIX_A, MIX_B, ChooseMix, DualHead, mix


def _cnn(seed=0):
    torch.manual_seed(seed)
    return cd.models.create("cnn", num_classes=10, in_channels=1, img_size=8, channels=(8, 16))


def test_mix_golden():
    ce, kd = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    p_ce = torch.tensor([math.e ** 2, 1]) / (math.e ** 2 + 1)
    p_kd = torch.tensor([1, math.e]) / (1 + math.e)  # kd / b with b = 2
    want = (0.25 * p_ce + 0.75 * p_kd).log()
    assert torch.allclose(mix(ce, kd, 0.25, 2.0)[0], want, atol=1e-6)
    assert torch.allclose(mix(ce, kd, 1.0, 1.0).exp(), torch.softmax(ce, -1), atol=1e-6)
    assert MIX_A[0] == 0.0 and MIX_A[-1] == 1.0 and len(MIX_A) == 21 and 4.0 in MIX_B


def test_dual_head_shapes_and_modes():
    m = DualHead(_cnn())
    x = torch.randn(3, 1, 8, 8)
    ce, kd = m.heads(x)
    assert torch.equal(ce, kd)  # the KD head starts as a copy of the classifier
    m.train()
    assert torch.equal(m(x), ce)
    m.eval()
    with torch.no_grad():
        ce, kd = m.heads(x)  # eval mode: BatchNorm's running statistics
        assert torch.allclose(m(x), mix(ce, kd, 0.5, 1.0), atol=1e-6)
    with pytest.raises(ConfigError, match="method.student"):
        DualHead(torch.nn.Linear(2, 2))


def test_semi_supervised_run_chooses_the_mix_on_val():
    tr = cd.data.load("digits", "train", labelled=100)
    va, te = cd.data.load("digits", "val"), cd.data.load("digits", "test")
    teacher = _cnn(1)
    cd.Trainer(cd.Distiller(teacher, None, [cd.Term("ce")]), cd.data.load("digits", "train"),
               va, epochs=3, batch_size=64, lr=0.05, progress=False).fit()
    s = DualHead(_cnn(2))
    r = build("dho", s, teacher)
    assert [t.loss for t in r.terms] == ["ce", "kd"]
    chooser = ChooseMix(s, va)
    t = cd.Trainer(cd.Distiller(s, teacher, r.terms), tr, va, te, epochs=3, batch_size=64,
                   lr=0.05, progress=False, callbacks=[chooser])
    res = t.fit()
    acc, a, b = chooser.choose()
    on_grid = lambda v, grid: min(abs(v - g) for g in grid) < 1e-6  # noqa: E731
    assert on_grid(float(s.mix_a), MIX_A) and on_grid(float(s.mix_b), MIX_B)
    assert (float(s.mix_a), float(s.mix_b)) == pytest.approx((a, b))
    # the chosen mix is at least as good on val as either head alone
    s.eval()
    with torch.no_grad():
        ce_only = mix(*s.heads(va.x), 1.0, 1.0).argmax(-1).eq(va.y).float().mean().item()
    assert acc >= ce_only - 1e-9 and 0.0 < res["test_acc"] <= 1.0
    with pytest.raises(ConfigError, match="DualHead"):
        build("dho", _cnn(), teacher)
