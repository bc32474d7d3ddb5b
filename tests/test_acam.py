"""ACAM-KD (acam loss, acam_kd recipe) and its static teacher-mask baseline (static_mask,
static_mask_kd): hand values, float64 gradchecks, recipe errors, a tiny canvas fit."""

from __future__ import annotations

import math

import pytest
import torch

import crossdistill as cd
import crossdistill.methods.acam  # noqa: F401  (registers acam_kd, static_mask_kd)
from crossdistill.data import Dataset
from crossdistill.data.canvas import make_canvases
from crossdistill.errors import ConfigError
from crossdistill.losses.acam import (
    ACAMLoss,
    mask_diversity,
    masked_mse,
    static_mask,
    teacher_masks,
)
from crossdistill.methods import METHODS, build

TASK = {"name": "segmentation", "target": "seg"}
FAST = dict(batch_size=8, lr=3e-3, optimizer="adamw", progress=False)


# -- hand values -----------------------------------------------------------------------------
def _hand_maps():
    """s = 0, t: (1, 2, 1, 2), channel 0 = [1, 2], channel 1 = [3, 4]: d^2 = [[1, 4], [9, 16]]."""
    t = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])
    return torch.zeros_like(t), t


def test_masked_mse_hand_value():
    s, t = _hand_maps()
    spatial = torch.tensor([[[[1.0, 0.5]], [[0.0, 1.0]]]])  # (B=1, M=2, 1, 2)
    channel = torch.tensor([[[1.0, 0.5], [1.0, 0.0]]])  # (1, M=2, C=2)
    # mask 1: num = 1*(1*1 + .5*4) + .5*(1*9 + .5*16) = 3 + 8.5 = 11.5, den = 1.5*1.5
    # mask 2: num = 1*(0*1 + 1*4) = 4, den = 1*1
    hand = (11.5 / 2.25 + 4.0) / 2
    assert float(masked_mse(s, t, spatial, channel)) == pytest.approx(hand)
    # the normaliser: scaling a mask does not change the value (no collapse to zero masks)
    assert float(masked_mse(s, t, 0.01 * spatial, 3 * channel)) == pytest.approx(hand)
    # all-ones masks give the plain MSE
    ones_s, ones_c = torch.ones(1, 1, 1, 2), torch.ones(1, 1, 2)
    assert float(masked_mse(s, t, ones_s, ones_c)) == pytest.approx(30 / 4)


def test_mask_diversity_hand_value_and_factorisation():
    spatial = torch.tensor([[[[1.0, 0.0]], [[1.0, 1.0]]]])  # cos = 1/sqrt(2)
    channel = torch.tensor([[[1.0, 1.0], [2.0, 2.0]]])  # cos = 1
    assert float(mask_diversity(spatial, channel)) == pytest.approx(1 / math.sqrt(2))
    # disjoint masks are fully apart; a single mask has no pair
    apart = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    assert float(mask_diversity(apart, channel)) == 0.0
    assert float(mask_diversity(spatial[:, :1], channel[:, :1])) == 0.0
    # = mean pairwise cosine of the explicit (C, H, W) joint masks
    g = torch.Generator().manual_seed(0)
    s, c = torch.rand(2, 3, 4, 5, generator=g), torch.rand(2, 3, 6, generator=g)
    joint = (c[:, :, :, None, None] * s[:, :, None]).flatten(2)
    cos = torch.nn.functional.cosine_similarity(joint[:, :, None], joint[:, None], dim=-1)
    i, j = torch.triu_indices(3, 3, 1)
    assert float(mask_diversity(s, c)) == pytest.approx(float(cos[:, i, j].mean()), rel=1e-5)


def test_static_mask_hand_value():
    t = torch.tensor([[[[0.0, 1.0]], [[0.0, -1.0]]]])  # mean_c |t| = [0, 1]; mean_hw = [.5, .5]
    spatial, channel = teacher_masks(t, 0.5)
    p1 = math.exp(2) / (1 + math.exp(2))  # softmax([0, 1] / 0.5)[1]
    assert spatial.flatten().tolist() == pytest.approx([1 - p1, p1])
    assert channel.flatten().tolist() == pytest.approx([0.5, 0.5])
    # s = 0: d^2 = [[0, 1], [0, 1]] -> sum_c 0.5 * p1 = p1
    assert float(static_mask(torch.zeros_like(t), t, temperature=0.5)) == pytest.approx(p1)


def test_acam_module_masks_and_value():
    torch.manual_seed(0)
    loss = ACAMLoss((2, 6, 5, 5), (2, 6, 5, 5), masks=3, dim=4, kv_grid=2,
                    diversity_weight=0.5)
    s, t = torch.randn(2, 6, 5, 5), torch.randn(2, 6, 5, 5)
    spatial, channel = loss.masks(s, t)
    assert spatial.shape == (2, 3, 5, 5) and channel.shape == (2, 3, 6)
    assert 0 < float(spatial.detach().min()) and float(spatial.detach().max()) < 1
    value = loss(s, t)
    hand = masked_mse(s, t, spatial, channel) + 0.5 * mask_diversity(spatial, channel)
    assert float(value.detach()) == pytest.approx(float(hand.detach()))
    # the masks follow the student: another student map, other masks
    s2, _ = loss.masks(s + 1.0, t)
    assert not torch.allclose(s2, spatial)


def test_acam_student_gradient_is_only_the_masked_difference():
    """The student map enters STCA-FF detached: its gradient is that of masked_mse with the
    masks held fixed; fusion and mask generators get gradients of their own."""
    torch.manual_seed(1)
    loss = ACAMLoss((2, 4, 3, 3), (2, 4, 3, 3), masks=2, dim=4)
    s = torch.randn(2, 4, 3, 3, requires_grad=True)
    t = torch.randn(2, 4, 3, 3)
    loss(s, t).backward()
    spatial, channel = (m.detach() for m in loss.masks(s, t))
    s_ref = s.detach().clone().requires_grad_(True)
    masked_mse(s_ref, t, spatial, channel).backward()
    assert torch.allclose(s.grad, s_ref.grad, atol=1e-6)
    assert all(p.grad is not None for p in loss.parameters())


# -- float64 gradchecks ----------------------------------------------------------------------
def test_gradchecks_float64():
    g = torch.Generator().manual_seed(0)
    d = dict(dtype=torch.float64)
    s = torch.randn(2, 3, 2, 2, generator=g, **d).requires_grad_(True)
    t = torch.randn(2, 3, 2, 2, generator=g, **d)
    sp = (torch.rand(2, 2, 2, 2, generator=g, **d) + 0.1).requires_grad_(True)
    ch = (torch.rand(2, 2, 3, generator=g, **d) + 0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b, c: masked_mse(a, t, b, c), (s, sp, ch))
    assert torch.autograd.gradcheck(mask_diversity, (sp, ch))
    assert torch.autograd.gradcheck(lambda a: static_mask(a, t, temperature=0.5), (s,))
    torch.manual_seed(0)
    mod = ACAMLoss((2, 3, 2, 2), (2, 3, 2, 2), masks=2, dim=4).double()
    s0 = s.detach().clone()  # gradcheck perturbs s in place

    def via_masks(a):  # the fusion + mask path (the loss detaches the student into it)
        spatial, channel = mod.ascm(mod.fusion(t, a))
        return masked_mse(s0, t, spatial, channel) + mask_diversity(spatial, channel)

    assert torch.autograd.gradcheck(via_masks, (s,))
    for name in ("fusion.q.weight", "ascm.spatial.weight", "ascm.channel.2.bias"):
        w = dict(mod.named_parameters())[name].detach().clone().requires_grad_(True)
        call = lambda w, n=name: torch.func.functional_call(mod, {n: w}, (s0, t))  # noqa: E731
        assert torch.autograd.gradcheck(call, (w,)), name


# -- errors ----------------------------------------------------------------------------------
def _models(t_width=8, s_width=4, seed=0):
    torch.manual_seed(seed)
    t = cd.models.create("seg-cnn", num_classes=11, img_size=32, width=t_width)
    s = cd.models.create("seg-cnn", num_classes=11, img_size=32, width=s_width)
    return t, s


def test_recipe_errors():
    t, s = _models()
    with pytest.raises(ConfigError, match="method.teacher"):
        build("acam_kd", s, None)
    with pytest.raises(ConfigError, match="acam_kd.taps"):
        build("acam_kd", s, t, taps=["enc9"])
    with pytest.raises(ConfigError, match="acam_kd.taps"):
        build("acam_kd", s, t, taps=[])
    with pytest.raises(ConfigError, match="acam_kd.teacher_taps"):
        build("acam_kd", s, t, taps=["enc3", "dec2"], teacher_taps=["enc3"])
    with pytest.raises(ConfigError, match="acam_kd.feature_weight"):
        build("acam_kd", s, t, feature_weight=-1.0)
    with pytest.raises(ConfigError, match="acam_kd.masks"):
        build("acam_kd", s, t, masks=0)
    with pytest.raises(ConfigError, match="acam_kd.diversity_weight"):
        build("acam_kd", s, t, diversity_weight=float("nan"))
    with pytest.raises(ConfigError, match="acam_kd.ce_weight"):
        build("acam_kd", s, t, ce_weight=0.0, feature_weight=0.0)
    with pytest.raises(ConfigError, match="static_mask_kd.temperature"):
        build("static_mask_kd", s, t, temperature=0.0)
    with pytest.raises(ConfigError, match="method.dim"):
        build("acam_kd", s, t, dim_=3)
    with pytest.raises(ConfigError, match="acam.inputs"):  # no projector phi: widths differ
        ACAMLoss((2, 16, 8, 8), (2, 32, 8, 8))
    with pytest.raises(ConfigError, match="acam.masks"):
        ACAMLoss((2, 4, 3, 3), (2, 4, 3, 3), masks=0)
    with pytest.raises(ConfigError, match="static_mask.inputs"):
        static_mask(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, 4))


def test_registered_with_papers():
    assert "ACAM-KD" in METHODS.meta("acam_kd")["paper"]
    assert METHODS.meta("acam_kd")["year"] == 2025
    assert "Focal and Global" in METHODS.meta("static_mask_kd")["paper"]


# -- end to end ------------------------------------------------------------------------------
def _canvases(n=16, size=32):
    k = 20
    y = torch.arange(k) % 10
    x = torch.zeros(k, 1, 8, 6)
    x[:, :, 1:-1, 1:-1] = (0.55 + 0.045 * y).view(k, 1, 1, 1)
    img, seg = make_canvases(x, y, n, size=size, max_digits=2, seed=0)
    return Dataset({"image": img, "seg": seg}, {"image": "image", "seg": "label_map"},
                   num_classes=11)


@pytest.mark.parametrize("method", ["acam_kd", "static_mask_kd"])
def test_tiny_canvas_fit_and_clean_export(method, one_thread):
    data = _canvases()
    t, s = _models()
    fresh_keys = set(s.state_dict())
    recipe = build(method, s, t, taps=["enc3", "dec2"])
    assert [x.loss for x in recipe.terms] == ["ce"] + 2 * [method.replace("_kd", "")]
    d = cd.Distiller(s, t, recipe.terms, task=TASK, seed=0)
    trainer = cd.Trainer(d, data, data, epochs=4, seed=0, **FAST)
    res = trainer.fit()
    rows = trainer.log.rows
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert math.isfinite(res["best_val_miou"]) and 0 <= res["best_val_miou"] <= 1
    assert all(math.isfinite(float(v)) for v in d.last_losses.values())
    assert set(d.projectors) == {x.name for x in recipe.terms[1:]}  # phi per tap
    if method == "acam_kd":  # fusion + masks live in the loss and trained with the student
        assert set(d.loss_modules) == {x.name for x in recipe.terms[1:]}
        assert all(p.requires_grad for p in d.loss_modules.parameters())
    exported = d.export()
    assert set(exported.state_dict()) == fresh_keys
    assert not any(m._forward_hooks for m in exported.modules())
    assert sum(p.numel() for p in exported.parameters()) < sum(p.numel() for p in t.parameters())


def test_acam_masks_change_during_training(one_thread):
    data = _canvases(8)
    t, s = _models(seed=2)
    d = cd.Distiller(s, t, build("acam_kd", s, t).terms, task=TASK, seed=0)
    batch = data.batch(torch.arange(4))
    d.build(batch)
    mod = d.loss_modules["acam_enc3"]
    before = {k: v.clone() for k, v in mod.state_dict().items()}
    cd.Trainer(d, data, None, epochs=1, seed=0, **FAST).fit()
    assert any(not torch.equal(before[k], v) for k, v in mod.state_dict().items())
