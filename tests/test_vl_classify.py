"""The VLM-OOD / SgVA-CLIP / MaKD losses: hand-worked values, gradients, bad inputs."""

import math

import pytest
import torch

import crossdistill.losses.vl_classify  # noqa: F401  (registers)
from crossdistill.errors import ConfigError
from crossdistill.losses.vl_classify import aspect_bce, cross_modal, supcon, unit_mse, vlalign
from crossdistill.registry import LOSSES


def test_registered():
    for name in ("vlalign", "unit_mse", "supcon", "cross_modal", "aspect_bce"):
        assert LOSSES.get(name) is not None
    assert LOSSES.meta("aspect_bce")["default_weight"] == 4.0  # MaKD's weight


def test_vlalign_golden_topk():
    # teacher top-2 = classes 0, 1 with logits (2, 1); the student's (0, 1) there: the log
    # ratios are +-1, so KL = p0 - p1 = tanh(1/2); the student's 5 on class 2 is outside
    s, t = torch.tensor([[0.0, 1.0, 5.0]]), torch.tensor([[2.0, 1.0, 0.0]])
    assert vlalign(s, t, k=2).item() == pytest.approx(math.tanh(0.5), abs=1e-6)
    # k >= K: the KL over every class
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    full = (p * (p.log() - q.log())).sum().item()
    assert vlalign(s, t, k=256).item() == pytest.approx(full, abs=1e-6)
    assert vlalign(t, t, k=3).item() == pytest.approx(0.0, abs=1e-7)


def test_vlalign_correct_only():
    s = torch.tensor([[0.0, 1.0, 5.0], [0.0, 1.0, 5.0]])
    t = torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
    y = torch.tensor([0, 1])  # the teacher is right on sample 0 only
    assert vlalign(s, t, k=2, correct_only=True, y=y).item() == pytest.approx(math.tanh(0.5),
                                                                            abs=1e-6)
    # no sample right: 0, not the official code's NaN mean over nothing
    out = vlalign(s, t, k=2, correct_only=True, y=torch.tensor([2, 2]))
    assert out.item() == 0.0 and torch.isfinite(out)
    with pytest.raises(ConfigError, match="correct_only"):
        vlalign(s, t, correct_only=True)


def test_unit_mse_golden():
    s, t = torch.tensor([[3.0, 4.0]]), torch.tensor([[2.0, 0.0]])
    assert unit_mse(s, t).item() == pytest.approx(0.8, abs=1e-6)  # 2 (1 - cos), cos = 0.6


def test_supcon_golden():
    z = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0, 1])
    # anchors 0 and 1: one positive at cos 1 against one negative at cos 0 (tau 1);
    # anchor 2 has no positive and is left out
    want = math.log(1 + math.exp(-1))
    assert supcon(z, temperature=1.0, y=y).item() == pytest.approx(want, abs=1e-6)
    # unlabelled samples are neither anchors nor in the denominator
    z4 = torch.cat([z, torch.tensor([[1.0, 0.0]])])
    y4 = torch.tensor([0, 0, 1, -100])
    assert supcon(z4, temperature=1.0, y=y4).item() == pytest.approx(want, abs=1e-6)
    assert supcon(z, temperature=1.0, y=torch.tensor([0, 1, 2])).item() == 0.0


def test_cross_modal_golden():
    v = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    w = torch.eye(2)
    y = torch.tensor([0, 0, 1])
    i2t = math.log(1 + math.exp(-1))  # every image: its text at 1, the other at 0
    t2i_0 = math.log(2 * math.e + 1) - 1  # text 0 over images (1, 1, 0): positives 0, 1
    t2i_1 = math.log(2 + math.e) - 1  # text 1 over images (0, 0, 1): positive 2
    want = 0.5 * (i2t + 0.5 * (t2i_0 + t2i_1))
    assert cross_modal([v, w], temperature=1.0, y=y).item() == pytest.approx(want, abs=1e-6)


def test_aspect_bce_golden():
    s, t = torch.tensor([[0.0, 2.0]]), torch.tensor([[0.0, -40.0]])  # targets 0.5 and 0
    want = 0.5 * (math.log(2) + math.log(1 + math.e ** 2))
    assert aspect_bce(s, t).item() == pytest.approx(want, abs=1e-6)


def test_gradients():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(4, 5, dtype=torch.float64, generator=g)
    y = torch.tensor([0, 1, 0, 2])
    assert torch.autograd.gradcheck(lambda a: vlalign(a, t, k=3), (s,))
    assert torch.autograd.gradcheck(lambda a: vlalign(a, t, k=3, correct_only=True,
                                                      y=t.argmax(-1)), (s,))
    assert torch.autograd.gradcheck(lambda a: unit_mse(a, t), (s,))
    assert torch.autograd.gradcheck(lambda a: supcon(a, temperature=0.5, y=y), (s,))
    w = torch.randn(3, 5, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda a: cross_modal([a, w], temperature=0.5, y=y), (s,))
    assert torch.autograd.gradcheck(lambda a: aspect_bce(a, t), (s,))


def test_teacher_gets_no_gradient():
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    (vlalign(s, t) + unit_mse(s, t) + aspect_bce(s, t)).sum().backward()
    assert t.grad is None and s.grad is not None


def test_bad_inputs():
    with pytest.raises(ConfigError, match="vlalign.inputs"):
        vlalign(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ConfigError, match="unit_mse.inputs"):
        unit_mse(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(ConfigError, match="supcon.y"):
        supcon(torch.zeros(3, 2), y=None)
    with pytest.raises(ConfigError, match="supcon.inputs"):
        supcon(torch.zeros(1, 2), y=torch.tensor([0]))
    with pytest.raises(ConfigError, match="cross_modal.student"):
        cross_modal(torch.zeros(3, 2), y=torch.tensor([0, 0, 1]))
    with pytest.raises(ConfigError, match="cross_modal.inputs"):
        cross_modal([torch.zeros(3, 2), torch.zeros(2, 3)], y=torch.tensor([0, 0, 1]))
    with pytest.raises(ConfigError, match="cross_modal.y"):
        cross_modal([torch.zeros(3, 2), torch.zeros(2, 2)], y=torch.tensor([0, 0, 2]))
    with pytest.raises(ConfigError, match="aspect_bce.inputs"):
        aspect_bce(torch.zeros(2, 3), torch.zeros(2, 2))
