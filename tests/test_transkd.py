"""TransKD (csf loss, transkd recipe) and its feature-map-only baseline (hcl loss, hcl_kd):
hand values, SK attention, PEA weights, float64 gradchecks, config errors, tiny fits with a
clean export."""

from __future__ import annotations

import math

import pytest
import torch
from test_segformer import canvases

import crossdistill as cd
import crossdistill.methods.transkd  # noqa: F401  (registers transkd, hcl_kd)
import crossdistill.models.segformer  # noqa: F401  (registers segformer-tiny)
from crossdistill.errors import ConfigError
from crossdistill.losses.review import _hcl as review_hcl
from crossdistill.losses.transkd import (
    CSFLevel,
    CSFLoss,
    SKAttention,
    class_weighted_ce,
    frequency_weights,
    hcl,
    hcl_value,
    hcl_weights,
)
from crossdistill.methods import METHODS, build

TASK = {"name": "segmentation", "target": "seg"}


# -- HCL by hand -----------------------------------------------------------------------------
def test_hcl_levels_follow_the_official_skip_rule():
    assert hcl_weights(8, 8) == [(None, 1.0), (4, 0.5), (2, 0.25), (1, 0.125)]
    assert hcl_weights(4, 4) == [(None, 1.0), (2, 0.5), (1, 0.25)]  # 4 skipped: 2 gets 1/2
    assert hcl_weights(2, 3) == [(None, 1.0), (1, 0.5)]
    assert hcl_weights(1, 1) == [(None, 1.0)]


def test_hcl_golden_values():
    # 2x2 map, s = 0, t = [[1, 2], [3, 4]]: MSE 30/4; pool 1: mean 2.5 -> 6.25, weight 1/2
    t = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    s = torch.zeros_like(t)
    assert float(hcl(s, t)) == pytest.approx((7.5 + 0.5 * 6.25) / 1.5)
    # 8x8 map with a single 1 at (0, 0): full 1/64; pool 4 (2x2 cells) 1/4 in one of 16
    # cells -> 1/256; pool 2 (4x4 cells) 1/16 in one of 4 -> 1/1024; pool 1 1/64 -> 1/4096
    t = torch.zeros(1, 1, 8, 8)
    t[0, 0, 0, 0] = 1.0
    hand = (1 / 64 + 1 / 2 / 256 + 1 / 4 / 1024 + 1 / 8 / 4096) / (1 + 1 / 2 + 1 / 4 + 1 / 8)
    assert float(hcl(torch.zeros_like(t), t)) == pytest.approx(hand)
    # the same form as ReviewKD's HCL (already in the package) on random maps
    g = torch.Generator().manual_seed(0)
    for shape in [(2, 3, 8, 8), (2, 3, 4, 4), (1, 2, 7, 7), (1, 2, 2, 2)]:
        a, b = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
        assert float(hcl(a, b)) == pytest.approx(float(review_hcl(a, b)), rel=1e-6)


def test_class_weighted_ce_and_frequency_weights_golden():
    s = torch.zeros(1, 3, 2)  # uniform logits over K = 2: CE = ln 2 everywhere
    y = torch.tensor([[0, 1, -100]])
    v = class_weighted_ce(s, y=y, weights=(1.0, 3.0))
    assert v[0].tolist() == pytest.approx([math.log(2), 3 * math.log(2), 0.0])
    labels = torch.tensor([0, 0, 0, 1, -100])  # p = (3/4, 1/4)
    assert frequency_weights(labels, 3) == pytest.approx(
        [1 / math.log(1.1 + 0.75), 1 / math.log(1.1 + 0.25), 1 / math.log(1.1)])
    with pytest.raises(ConfigError, match="class_weighted_ce.weights"):
        class_weighted_ce(s, y=y, weights=(1.0,))


# -- SK attention and CSF --------------------------------------------------------------------
def test_sk_attention_is_a_per_channel_softmax_over_two_branches():
    torch.manual_seed(0)
    sk = SKAttention(6, 32)
    x, y = torch.randn(3, 6, 4, 5), torch.randn(3, 6, 4, 5)
    a = sk.weights(x, y)
    assert a.shape == (3, 2, 6)
    assert torch.allclose(a.sum(1), torch.ones(3, 6)) and bool(((a > 0) & (a < 1)).all())
    out = sk(x, y)
    assert out.shape == x.shape
    assert torch.allclose(out, a[:, 0, :, None, None] * x + a[:, 1, :, None, None] * y)
    assert torch.allclose(sk(x, x), x, atol=1e-6)  # a convex mix of equal branches
    # the weights depend on GAP(x + y) only: a spatial shuffle leaves them unchanged
    perm = torch.randperm(20)
    xs = x.flatten(2)[..., perm].view_as(x)
    ys = y.flatten(2)[..., perm].view_as(y)
    assert torch.allclose(sk.weights(xs, ys), a, atol=1e-6)


def test_csf_fusion_shapes_order_and_value():
    torch.manual_seed(0)
    s_shapes = [(2, 4, 8, 8), (2, 6, 4, 4), (2, 8, 2, 2)]
    t_shapes = [(2, 5, 8, 8), (2, 7, 4, 4), (2, 9, 2, 2)]
    loss = CSFLoss(s_shapes, t_shapes, mid_channels=3)
    assert [lv.attention is None for lv in loss.levels] == [False, False, True]  # deepest: none
    assert all(isinstance(lv, CSFLevel) for lv in loss.levels)
    s = [torch.randn(*sh) for sh in s_shapes]
    t = [torch.randn(*sh) for sh in t_shapes]
    outs = loss.fuse(s, [x.shape[-2:] for x in t])
    assert [tuple(o.shape) for o in outs] == t_shapes
    hand = sum(hcl_value(o, ti) for o, ti in zip(outs, t))
    assert float(loss(s, t).detach()) == pytest.approx(float(hand.detach()), rel=1e-6)
    # deepest first: the deepest output ignores the shallower maps, the shallowest reads all
    # (random changes: BN would cancel a constant shift)
    sizes = [x.shape[-2:] for x in t]
    o2 = loss.fuse([s[0] + torch.randn_like(s[0]), s[1], s[2]], sizes)
    assert torch.equal(o2[2], outs[2]) and torch.equal(o2[1], outs[1])
    assert not torch.allclose(o2[0], outs[0], atol=1e-3)
    o3 = loss.fuse([s[0], s[1], s[2] + torch.randn_like(s[2])], sizes)
    assert all(not torch.allclose(a, b, atol=1e-3) for a, b in zip(o3, outs))
    # another teacher grid: the output is resized to it
    other = CSFLoss([(2, 4, 8, 8)], [(2, 5, 4, 4)], mid_channels=3)
    assert other.fuse([s[0]], [(4, 4)])[0].shape == (2, 5, 4, 4)


def test_csf_teacher_gets_no_gradient_and_parts_train():
    torch.manual_seed(1)
    loss = CSFLoss([(2, 3, 4, 4), (2, 4, 2, 2)], [(2, 5, 4, 4), (2, 6, 2, 2)], mid_channels=4)
    s = [torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 4, 2, 2,
                                                                  requires_grad=True)]
    t = [torch.randn(2, 5, 4, 4, requires_grad=True), torch.randn(2, 6, 2, 2,
                                                                  requires_grad=True)]
    loss(s, t).backward()
    assert all(x.grad is not None for x in s) and all(x.grad is None for x in t)
    assert all(p.grad is not None for p in loss.parameters())


# -- float64 gradchecks ----------------------------------------------------------------------
def test_gradchecks_float64():
    g = torch.Generator().manual_seed(0)
    d = dict(dtype=torch.float64)
    s = torch.randn(2, 3, 8, 8, generator=g, **d).requires_grad_(True)
    t = torch.randn(2, 3, 8, 8, generator=g, **d)
    assert torch.autograd.gradcheck(lambda a: hcl(a, t), (s,))
    torch.manual_seed(0)
    sk = SKAttention(3, 4).double()
    x = torch.randn(2, 3, 2, 2, generator=g, **d).requires_grad_(True)
    y = torch.randn(2, 3, 2, 2, generator=g, **d).requires_grad_(True)
    assert torch.autograd.gradcheck(sk, (x, y))
    mod = CSFLoss([(2, 3, 4, 4), (2, 4, 2, 2)], [(2, 5, 4, 4), (2, 6, 2, 2)],
                  mid_channels=4).double()
    s0 = torch.randn(2, 3, 4, 4, generator=g, **d).requires_grad_(True)
    s1 = torch.randn(2, 4, 2, 2, generator=g, **d).requires_grad_(True)
    tt = [torch.randn(2, 5, 4, 4, generator=g, **d), torch.randn(2, 6, 2, 2, generator=g, **d)]
    assert torch.autograd.gradcheck(lambda a, b: mod([a, b], tt), (s0, s1))
    name = "levels.0.attention.fcs.1.weight"
    w = dict(mod.named_parameters())[name].detach().clone().requires_grad_(True)
    inputs = ([s0.detach(), s1.detach()], tt)
    assert torch.autograd.gradcheck(
        lambda w: torch.func.functional_call(mod, {name: w}, inputs), (w,))


# -- recipes ---------------------------------------------------------------------------------
def _pair(t_widths=(16, 32, 32, 64), s_widths=(8, 16, 16, 32), **kw):
    torch.manual_seed(0)
    t = cd.models.create("segformer-tiny", widths=t_widths, decoder_dim=16, **kw)
    s = cd.models.create("segformer-tiny", widths=s_widths, decoder_dim=16, **kw)
    return t, s


def test_transkd_recipe_terms_and_pea_weights():
    t, s = _pair()
    r = build("transkd", s, t)
    assert [x.name for x in r.terms] == ["ce", "csf", "pea_0", "pea_1", "pea_2", "pea_3"]
    csf = r.terms[1]
    assert csf.multi and csf.stateful and csf.projector is None
    assert [str(x) for x in csf.student] == s.encoder_stages
    assert [str(x) for x in csf.teacher] == t.encoder_stages
    pea = r.terms[2:]
    assert [x.weight for x in pea] == pytest.approx([0.1, 0.1, 0.5, 1.0])
    assert all(x.loss == "mse" and x.projector == "linear" for x in pea)
    assert [str(x.student[0]) for x in pea] == [f"patch_embeds.{i}" for i in range(4)]
    r = build("transkd", s, t, pea_weight=2.0, embed_weights=[0, 1, 0, 0.5], csf_weight=0.0)
    assert [(x.name, x.weight) for x in r.terms] == [("ce", 1.0), ("pea_1", 2.0),
                                                     ("pea_3", 1.0)]
    r = build("transkd", s, t, pea_weight=0.0, mid_channels=8)
    assert [x.name for x in r.terms] == ["ce", "csf"] and r.terms[1].params["mid_channels"] == 8
    h = build("hcl_kd", s, t)
    assert [x.name for x in h.terms] == ["ce", "hcl_0", "hcl_1", "hcl_2", "hcl_3"]
    cw = build("hcl_kd", s, t, class_weights=[1.0] + [10.0] * 10).terms[0]
    assert cw.loss == "class_weighted_ce" and cw.name == "ce"
    assert cw.params["weights"] == (1.0,) + (10.0,) * 10
    assert all(x.loss == "hcl" and x.projector == "conv1x1" for x in h.terms[1:])
    assert "TransKD" in METHODS.meta("transkd")["paper"] and METHODS.meta("hcl_kd")["year"]


def test_recipe_errors():
    t, s = _pair()
    with pytest.raises(ConfigError, match="method.teacher"):
        build("transkd", s, None)
    with pytest.raises(ConfigError, match="method.teacher"):
        build("hcl_kd", s, None)
    with pytest.raises(ConfigError, match="transkd.taps"):
        build("transkd", s, t, taps=["encoder.9"])
    with pytest.raises(ConfigError, match="transkd.taps"):
        build("transkd", s, t, taps=[])
    with pytest.raises(ConfigError, match="transkd.teacher_taps"):
        build("transkd", s, t, taps=["encoder.0", "encoder.1"], teacher_taps=["encoder.0"])
    with pytest.raises(ConfigError, match="transkd.embed_taps"):
        build("transkd", s, t, embed_taps=["patch_embeds.8"])
    # the official --embed-weights bug (type=tuple splits a CLI string into characters)
    with pytest.raises(ConfigError, match="transkd.embed_weights"):
        build("transkd", s, t, embed_weights="0.1,0.1,0.5,1")
    with pytest.raises(ConfigError, match="transkd.embed_weights"):
        build("transkd", s, t, embed_weights=[0.1, 0.5])
    with pytest.raises(ConfigError, match="transkd.embed_weights.2"):
        build("transkd", s, t, embed_weights=[0.1, 0.1, -0.5, 1])
    with pytest.raises(ConfigError, match="transkd.csf_weight"):
        build("transkd", s, t, csf_weight=-1.0)
    with pytest.raises(ConfigError, match="transkd.pea_weight"):
        build("transkd", s, t, pea_weight=float("nan"))
    with pytest.raises(ConfigError, match="transkd.csf_weight"):
        build("transkd", s, t, csf_weight=0.0, pea_weight=0.0)
    with pytest.raises(ConfigError, match="transkd.mid_channels"):
        build("transkd", s, t, mid_channels=0)
    with pytest.raises(ConfigError, match="hcl_kd.feature_weight"):
        build("hcl_kd", s, t, feature_weight=-2)
    with pytest.raises(ConfigError, match="hcl_kd.ce_weight"):
        build("hcl_kd", s, t, ce_weight=0.0, feature_weight=0.0)
    with pytest.raises(ConfigError, match="transkd.class_weights"):
        build("transkd", s, t, class_weights="1,10")
    with pytest.raises(ConfigError, match="hcl_kd.class_weights.1"):
        build("hcl_kd", s, t, class_weights=[1.0, -10.0])
    with pytest.raises(ConfigError, match="method.tau"):
        build("transkd", s, t, tau=1.0)
    t3, s3 = _pair((16, 32, 32), (8, 16, 16))  # 3 stages: the paper's 4 weights do not fit
    with pytest.raises(ConfigError, match="transkd.embed_weights"):
        build("transkd", s3, t3)
    assert len(build("transkd", s3, t3, embed_weights=[0.1, 0.5, 1]).terms) == 5
    plain = cd.models.create("seg-cnn", width=4)  # no encoder_stages to default to
    with pytest.raises(ConfigError, match="hcl_kd.taps"):
        build("hcl_kd", plain, t)
    # the losses themselves
    with pytest.raises(ConfigError, match="csf.inputs"):
        CSFLoss([(2, 3, 4, 4)], [(2, 3, 4, 4), (2, 3, 2, 2)])
    with pytest.raises(ConfigError, match="csf.mid_channels"):
        CSFLoss([(2, 3, 4, 4)], [(2, 3, 4, 4)], mid_channels=0)
    with pytest.raises(ConfigError, match=r"csf.student\[0\]"):
        CSFLoss([(2, 16, 3)], [(2, 3, 4, 4)])  # tokens, not a stage map
    with pytest.raises(ConfigError, match="hcl.inputs"):
        hcl(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, 4))


def test_csf_wrong_pairing_fails_at_build():
    t, s = _pair()
    batch = canvases(4).batch(torch.arange(4))
    terms = [cd.Term("csf", student=["encoder.0", "patch_embeds.1"],
                     teacher=["encoder.0", "encoder.1"])]
    with pytest.raises(ConfigError, match="csf"):
        cd.Distiller(s, t, terms, task=TASK).build(batch)
    with pytest.raises(ConfigError, match="projector"):
        cd.Distiller(s, t, [cd.Term("csf", student=["encoder.0"], teacher=["encoder.0"],
                                    projector="conv1x1")], task=TASK).build(batch)


# -- end to end ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["transkd", "hcl_kd"])
def test_tiny_canvas_fit_and_clean_export(method, one_thread):
    data = canvases()
    t, s = _pair()
    fresh_keys = set(s.state_dict())
    t_before = {k: v.clone() for k, v in t.state_dict().items()}
    recipe = build(method, s, t)
    d = cd.Distiller(s, t, recipe.terms, task=TASK, seed=0)
    trainer = cd.Trainer(d, data, data, epochs=3, seed=0, batch_size=8, lr=3e-3,
                         optimizer="adamw", progress=False)
    res = trainer.fit()
    rows = trainer.log.rows
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert math.isfinite(res["best_val_miou"]) and 0 <= res["best_val_miou"] <= 1
    assert all(math.isfinite(float(v)) for v in d.last_losses.values())
    if method == "transkd":  # fusion in the loss, PEA linears as projectors; all trained
        assert set(d.loss_modules) == {"csf"}
        assert set(d.projectors) == {f"pea_{i}" for i in range(4)}
        assert all(isinstance(p.proj, torch.nn.Linear) for p in d.projectors.values())
        assert all(p.requires_grad for p in d.loss_modules.parameters())
    else:
        assert set(d.projectors) == {f"hcl_{i}" for i in range(4)} and not d.loss_modules
    # the teacher is frozen: no gradients, weights unchanged
    assert all(p.grad is None for p in t.parameters())
    assert all(torch.equal(t_before[k], v) for k, v in t.state_dict().items())
    exported = d.export()
    keys = set(exported.state_dict())
    assert keys == fresh_keys
    assert not any(k.startswith(("levels", "csf", "pea", "proj")) for k in keys)
    assert not any(m._forward_hooks for m in exported.modules())
