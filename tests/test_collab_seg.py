"""CNN-Transformer collaborative learning, segmentation form: the vit-seg model, the dense
losses (bsd_pixel, bsd_region_map, bsd_region_feat, hfd_map: hand values, float64
gradchecks), the collaborative_seg / dml_seg recipes (errors) and a tiny canvas fit."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import crossdistill as cd
import crossdistill.methods.collab_seg  # noqa: F401  (registers the recipes and losses)
import crossdistill.models.vit_seg  # noqa: F401  (registers vit-seg)
from crossdistill.data import Dataset
from crossdistill.data.canvas import make_canvases
from crossdistill.errors import ConfigError
from crossdistill.losses.collab_seg import (
    HFDMapLoss,
    Patchify,
    RegionFeatureBSDLoss,
    TokensUp,
    at_positions,
    bsd_pixel,
    bsd_region_map,
    region_index,
    region_selection,
)
from crossdistill.losses.hetero import dml
from crossdistill.methods import METHODS, build
from crossdistill.methods.collab_seg import (
    A_LOGITS,
    B_LOGITS,
    BestMembersByTask,
    SegPair,
    evaluate_members,
)
from crossdistill.methods.collaborative import CollaborativePair

LN2, LN3 = math.log(2), math.log(3)
TASK = {"name": "segmentation", "target": "seg", "num_classes": 11}
FAST = dict(batch_size=8, lr=3e-3, optimizer="adamw", progress=False)


# -- the model -------------------------------------------------------------------------------
def test_vit_seg_shapes_taps_and_sizes():
    torch.manual_seed(0)
    m = cd.models.create("vit-seg", num_classes=5, img_size=16, patch=4, dim=8, depth=2, heads=2,
                         decoder_dim=6)
    assert m.stages == ["blocks.0", "blocks.1", "decoder"] and m.feature_path == "head"
    seen = {}
    for path in ("patch_embed", "blocks.1", "decoder"):
        m.get_submodule(path).register_forward_hook(
            lambda mod, i, o, p=path: seen.__setitem__(p, tuple(o.shape)))
    assert m(torch.randn(2, 1, 16, 16)).shape == (2, 5, 16, 16)
    assert seen == {"patch_embed": (2, 16, 8), "blocks.1": (2, 16, 8), "decoder": (2, 6, 16, 16)}
    assert m(torch.randn(1, 1, 24, 20)).shape == (1, 5, 24, 20)  # positions resized
    with pytest.raises(ConfigError, match="img_size"):
        cd.models.create("vit-seg", img_size=30)
    with pytest.raises(ConfigError, match="heads"):
        cd.models.create("vit-seg", dim=10, heads=3)
    with pytest.raises(ConfigError, match="decoder_dim"):
        cd.models.create("vit-seg", decoder_dim=0)
    with pytest.raises(ConfigError, match="vit-seg.input"):
        m(torch.randn(1, 1, 18, 16))


# -- pixel-wise BSD --------------------------------------------------------------------------
def _pixels():
    """Four pixels, K = 2 (logits with hand probabilities):
    p0 y=0: a [3/4, 1/4] right, b [1/4, 3/4] wrong          -> a teaches;
    p1 y=1: a [1/3, 2/3], b [1/5, 4/5] both right, b surer  -> b teaches (and a, compare off);
    p2 y=0: both wrong                                       -> nothing;
    p3 y=-100                                                -> nothing."""
    za = torch.tensor([[[LN3, 0.0], [0.0, LN2], [0.0, 1.0], [LN3, 0.0]]])
    zb = torch.tensor([[[0.0, LN3], [0.0, math.log(4)], [0.0, 2.0], [LN3, 0.0]]])
    y = torch.tensor([[0, 1, 0, -100]])
    return za, zb, y


def test_bsd_pixel_hand_values():
    za, zb, y = _pixels()
    kl_ab0 = 0.5 * LN3  # KL([3/4, 1/4] || [1/4, 3/4])
    kl_ba1 = 0.2 * math.log(3 / 5) + 0.8 * math.log(6 / 5)  # KL([1/5, 4/5] || [1/3, 2/3])
    kl_ab1 = math.log(5 / 3) / 3 + 2 / 3 * math.log(5 / 6)  # KL([1/3, 2/3] || [1/5, 4/5])
    out = bsd_pixel([za, zb], y=y)
    assert out.shape == (1, 4)
    assert out[0].tolist() == pytest.approx([kl_ab0, kl_ba1, 0.0, 0.0], abs=1e-6)
    out = bsd_pixel([za, zb], y=y, compare=False)
    assert out[0].tolist() == pytest.approx([kl_ab0, kl_ba1 + kl_ab1, 0.0, 0.0], abs=1e-6)
    # T = 2: KL of the softened distributions x T^2, selection still at T = 1
    r = math.sqrt(3)
    soft = (r - 1) / (r + 1) * 0.5 * LN3  # KL(softmax([ln3, 0]/2) || softmax([0, ln3]/2))
    assert float(bsd_pixel([za, zb], y=y, temperature=2.0)[0, 0]) == pytest.approx(4 * soft)


def test_bsd_pixel_teacher_side_is_detached():
    za, zb, y = _pixels()
    za, zb = za.clone().requires_grad_(True), zb.clone().requires_grad_(True)
    bsd_pixel([za, zb], y=y)[0, 0].backward()  # p0: a teaches b
    assert torch.equal(za.grad, torch.zeros_like(za))
    assert zb.grad[0, 0].tolist() == pytest.approx([0.25 - 0.75, 0.75 - 0.25])  # p_b - p_a


def test_bsd_pixel_in_a_term_averages_over_labelled_pixels():
    za, zb, y = _pixels()
    term = cd.Term("bsd_pixel", student=["x", "y"], teacher=None)
    assert term.needs_labels
    from crossdistill.context import Context

    value = bsd_pixel([za, zb], y=y)
    assert float(term.reduce(value, Context(y=y))) == pytest.approx(float(value.sum()) / 3)


# -- region-wise BSD, logits -------------------------------------------------------------------
def test_region_index_and_selection():
    assert region_index(5, 3, 2).tolist() == [[0, 0, 1], [0, 0, 1], [0, 0, 1], [2, 2, 3],
                                              [2, 2, 3]]
    za, zb, y = _region_maps()
    za, zb = F.log_softmax(za, -1), F.log_softmax(zb, -1)
    a_wins, b_wins = region_selection(za, zb, y, 2)
    assert a_wins.tolist() == [[1.0, 0.0, 1.0, 0.0]] and b_wins.tolist() == [[0.0, 1.0, 0.0, 0.0]]
    a_wins, b_wins = region_selection(za, zb, y, 1)  # CE_a ln(32/9) < CE_b ln(16/3)
    assert a_wins.tolist() == [[1.0]] and b_wins.tolist() == [[0.0]]


def _region_maps():
    """A 2 x 2 map, K = 2 (row-major pixels):
    p0 y=0: a [3/4, 1/4], b [1/2, 1/2];  p1 y=1: a [1/2, 1/2], b [1/4, 3/4];
    p2 y=0: a [3/4, 1/4], b [1/2, 1/2];  p3 y=-100: a [3/4, 1/4], b [1/4, 3/4]."""
    za = torch.tensor([[[[LN3, 0.0], [0.0, 0.0]], [[LN3, 0.0], [LN3, 0.0]]]])
    zb = torch.tensor([[[[0.0, 0.0], [0.0, LN3]], [[0.0, 0.0], [0.0, LN3]]]])
    y = torch.tensor([[[0, 1], [0, -100]]])
    return za, zb, y


def test_bsd_region_map_hand_values():
    za, zb, y = _region_maps()
    kl_ab0 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # KL([3/4,1/4] || [1/2,1/2])
    kl_ba1 = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)  # KL([1/4,3/4] || [1/2,1/2])
    kl_ab1 = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)  # KL([1/2,1/2] || [1/4,3/4])
    # one region per pixel: the lower-CE peer of each pixel teaches; p3 has no label
    out = bsd_region_map([za, zb], y=y, grid=2)
    assert out.shape == (1, 2, 2)
    assert out.flatten().tolist() == pytest.approx([kl_ab0, kl_ba1, kl_ab0, 0.0], abs=1e-6)
    # one region: a has the lower summed CE, so a teaches at every labelled pixel
    out = bsd_region_map([za, zb], y=y, grid=1)
    assert out.flatten().tolist() == pytest.approx([kl_ab0, kl_ab1, kl_ab0, 0.0], abs=1e-6)
    out = bsd_region_map([za, zb], y=y, grid=1, temperature=2.0)
    pa, pb = F.softmax(torch.tensor([LN3, 0.0]) / 2, -1), torch.tensor([0.5, 0.5])
    assert float(out[0, 0, 0]) == pytest.approx(4 * float((pa * (pa / pb).log()).sum()))


def test_bsd_region_map_errors():
    za, zb, y = _region_maps()
    with pytest.raises(ConfigError, match="bsd_region_map.grid"):
        bsd_region_map([za, zb], y=y, grid=3)
    with pytest.raises(ConfigError, match="bsd_region_map.y"):
        bsd_region_map([za, zb], y=y[:, 0])
    with pytest.raises(ConfigError, match="bsd_region_map.inputs"):
        bsd_region_map([za[0], zb[0]], y=y[0])
    with pytest.raises(ConfigError, match="bsd_region_map.student"):
        bsd_region_map(za, y=y)
    with pytest.raises(ConfigError, match="bsd_pixel.temperature"):
        bsd_pixel([za, zb], y=y, temperature=0.0)
    with pytest.raises(ConfigError, match="bsd_pixel.inputs"):
        bsd_pixel([za, zb[..., :1]], y=y)


# -- region-wise BSD, features; HFD --------------------------------------------------------
def _unit_projector(proj):
    """A conv1x1 projector made (almost) the identity: weight 1, BN in eval with unit stats."""
    with torch.no_grad():
        proj.proj[0].weight.fill_(1.0)
    proj.eval()
    return proj


def test_bsd_region_feat_hand_value():
    za, zb, y = _region_maps()
    loss = RegionFeatureBSDLoss([(1, 1, 2, 2), (1, 1, 2, 2), (1, 2, 2, 2), (1, 2, 2, 2)], grid=2)
    _unit_projector(loss.ab), _unit_projector(loss.ba)
    fa = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    fb = torch.tensor([[[[0.0, 0.0], [1.0, 1.0]]]])
    s = 1 / math.sqrt(1 + 1e-5)  # the BN in eval
    # b wins p1 only: a's projection learns b there; a wins p0, p2: b's projection learns a
    hand = (2 * s - 0) ** 2 / 4 + ((0 - 1) ** 2 + (s - 3) ** 2) / 4
    assert float(loss([fa, fb, za, zb], y=y).detach()) == pytest.approx(hand, rel=1e-5)
    # tokens are reshaped to their map; grids may differ between the two peers
    loss = RegionFeatureBSDLoss([(1, 4, 3), (1, 2, 4, 4), (1, 4, 4, 5), (1, 4, 4, 5)], grid=2)
    out = loss([torch.randn(1, 4, 3), torch.randn(1, 2, 4, 4), torch.randn(1, 4, 4, 5),
                torch.randn(1, 4, 4, 5)], y=torch.randint(0, 5, (1, 4, 4)))
    assert out.dim() == 0 and math.isfinite(float(out.detach()))
    with pytest.raises(ConfigError, match="bsd_region_feat.student"):
        RegionFeatureBSDLoss([(1, 5, 3), (1, 2, 4, 4), (1, 4, 4, 5), (1, 4, 4, 5)])
    with pytest.raises(ConfigError, match="bsd_region_feat.grid"):
        RegionFeatureBSDLoss([(1, 4, 3), (1, 2, 4, 4), (1, 4, 4, 5), (1, 4, 4, 5)], grid=3)


def test_hfd_map_bridges_and_value():
    cnn, vit = (2, 3, 8, 8), (2, 4, 6)  # a (3, 8, 8) map and 4 tokens of width 6 (2 x 2 grid)
    loss = HFDMapLoss([cnn, vit])
    assert isinstance(loss.ab, Patchify) and loss.ab.proj.kernel_size == (4, 4)
    assert isinstance(loss.ba, TokensUp)  # reshape + 1x1 conv + BN + upsampling
    fa, fb = torch.randn(*cnn), torch.randn(*vit)
    assert loss.ab(fa).shape == vit and loss.ba(fb).shape == cnn
    ref = F.mse_loss(loss.ab(fa), fb) + F.mse_loss(loss.ba(fb), fa)  # HFDLoss's maths
    assert float(loss([fa, fb])) == pytest.approx(float(ref))
    # a patchify of averaging weights is average pooling (here 2 x 2)
    with torch.no_grad():
        p = Patchify((1, 4, 4), (4, 1))  # to a 2 x 2 token grid of width 1
        p.proj.weight.fill_(0.25), p.proj.bias.zero_()
        x = torch.arange(16.0).view(1, 1, 4, 4)
        assert p(x).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    assert isinstance(HFDMapLoss([(2, 3, 8, 8), (2, 5, 4, 4)]).ab, Patchify)  # map -> map
    with pytest.raises(ConfigError, match="hfd.student"):
        HFDMapLoss([(2, 3, 8, 8)])


def _pupil_gradcheck(loss, ref, inputs):
    """Mutual losses detach whichever side teaches, so a finite difference of the loss itself
    also sees the teacher side move. ``ref`` is the same formula with every teacher side a
    constant copy of the check point's values: gradcheck it (float64), then require the loss's
    autograd gradient to equal ref's at that point."""
    assert torch.autograd.gradcheck(ref, inputs)
    g_loss = torch.autograd.grad(loss(*inputs).sum(), inputs)
    g_ref = torch.autograd.grad(ref(*inputs).sum(), inputs)
    for a, b in zip(g_loss, g_ref):
        assert torch.allclose(a, b, atol=1e-10)
        assert a.abs().sum() > 0


def _kl(p_logits, q_logits, T):
    lp, lq = F.log_softmax(p_logits / T, -1), F.log_softmax(q_logits / T, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def test_gradchecks_float64():
    g = torch.Generator().manual_seed(0)
    d = dict(dtype=torch.float64)
    za = torch.randn(2, 4, 4, 3, generator=g, **d).requires_grad_(True)
    zb = torch.randn(2, 4, 4, 3, generator=g, **d).requires_grad_(True)
    y = torch.randint(0, 3, (2, 4, 4), generator=g)
    y[0, 0, 0] = -100
    a0, b0 = za.detach().clone(), zb.detach().clone()
    lab = y != -100
    right_a, right_b = (a0.argmax(-1) == y) & lab, (b0.argmax(-1) == y) & lab
    pa_y = F.softmax(a0, -1).gather(-1, y.clamp_min(0)[..., None])[..., 0]
    pb_y = F.softmax(b0, -1).gather(-1, y.clamp_min(0)[..., None])[..., 0]
    for T, compare in ((2.0, True), (1.0, False)):
        ma = (right_a & (pa_y > pb_y if compare else True)).double()
        mb = (right_b & (pb_y > pa_y if compare else True)).double()
        _pupil_gradcheck(
            lambda a, b, T=T, c=compare: bsd_pixel([a, b], y=y, temperature=T, compare=c),
            lambda a, b, T=T, ma=ma, mb=mb: T * T * (ma * _kl(a0, b, T) + mb * _kl(b0, a, T)),
            (za, zb))
    a_wins, b_wins = region_selection(F.log_softmax(a0, -1), F.log_softmax(b0, -1), y, 2)
    ma, mb = (at_positions(w, 4, 4, 2) * lab for w in (a_wins, b_wins))
    _pupil_gradcheck(
        lambda a, b: bsd_region_map([a, b], y=y, grid=2, temperature=1.5),
        lambda a, b: 1.5 ** 2 * (ma * _kl(a0, b, 1.5) + mb * _kl(b0, a, 1.5)), (za, zb))
    # features: HFD (targets detached both ways) and region-wise BSD on features
    torch.manual_seed(0)
    fa = torch.randn(2, 3, 8, 8, generator=g, **d).requires_grad_(True)
    fb = torch.randn(2, 4, 5, generator=g, **d).requires_grad_(True)
    fa0, fb0 = fa.detach().clone(), fb.detach().clone()
    hfd = HFDMapLoss([tuple(fa.shape), tuple(fb.shape)]).double()
    _pupil_gradcheck(lambda a, b: hfd([a, b]),
                     lambda a, b: F.mse_loss(hfd.ab(a), fb0) + F.mse_loss(hfd.ba(b), fa0),
                     (fa, fb))
    fm = torch.randn(2, 2, 4, 4, generator=g, **d).requires_grad_(True)
    fm0 = fm.detach().clone()
    reg = RegionFeatureBSDLoss([tuple(fa.shape), tuple(fm.shape), tuple(za.shape),
                                tuple(zb.shape)], grid=2).double()
    wa, wb = at_positions(a_wins, 8, 8, 2), at_positions(b_wins, 4, 4, 2)
    _pupil_gradcheck(
        lambda a, b: reg([a, b, a0, b0], y=y),
        lambda a, b: (wb * (reg.ab(a) - fm0).pow(2).mean(1)).mean()
        + (wa * (reg.ba(b) - fa0).pow(2).mean(1)).mean(), (fa, fm))


def test_dml_per_pixel_is_the_symmetric_kl():
    za, zb, _ = _pixels()
    both = _kl(za, zb, 1.0) + _kl(zb, za, 1.0)
    assert torch.allclose(dml([za, zb]), both, atol=1e-6)
    assert float(dml([za, zb])[0, 0]) == pytest.approx(LN3)  # 2 x (1/2) ln 3 at p0


# -- recipes ---------------------------------------------------------------------------------
def _pair(size=16, seed=0):
    torch.manual_seed(seed)
    cnn = cd.models.create("seg-cnn", num_classes=11, img_size=size, width=4)
    vit = cd.models.create("vit-seg", num_classes=11, img_size=size, patch=4, dim=8, depth=1,
                           heads=2, decoder_dim=4)
    return SegPair(cnn, vit)


def test_seg_pair_taps_class_last_and_keeps_members_plain():
    pair = _pair()
    assert set(pair.state_dict()) == {f"a.{k}" for k in pair.a.state_dict()} | {
        f"b.{k}" for k in pair.b.state_dict()}
    seen = {}
    for n in ("a", "b"):
        pair.class_last[n].register_forward_hook(
            lambda m, i, o, n=n: seen.__setitem__(n, o.shape))
    pair.eval()
    x = torch.randn(2, 1, 16, 16)
    out = pair(x)
    assert seen == {"a": (2, 16, 16, 11), "b": (2, 16, 16, 11)}
    assert torch.allclose(out, (pair.a(x) + pair.b(x)) / 2)


def test_recipes_terms_and_errors():
    pair = _pair()
    r = build("collaborative_seg", pair, None)
    assert [t.name for t in r.terms] == ["ce_a", "ce_b", "hfd", "bsd_region", "bsd_pixel"]
    assert [str(x) for x in r.terms[2].student] == ["a.enc1", "b.blocks.0"]
    assert [t.weight for t in r.terms] == [1.0] * 5
    r = build("collaborative_seg", pair, None, region_on="features", hfd_weight=0.0,
              pixel_weight=0.5, temperature=2.0)
    assert [t.loss for t in r.terms] == ["ce", "ce", "bsd_region_feat", "bsd_pixel"]
    assert [str(x) for x in r.terms[2].student] == ["a.dec2", "b.decoder", A_LOGITS, B_LOGITS]
    assert r.terms[3].params["temperature"] == 2.0 and r.terms[3].weight == 0.5
    r = build("dml_seg", pair, None)
    assert [t.loss for t in r.terms] == ["ce", "ce", "dml"]
    assert [str(x) for x in r.terms[2].student] == [A_LOGITS, B_LOGITS]
    plain = CollaborativePair(pair.a, pair.b)
    for bad, match in [
        (dict(student=plain), "method.student"),
        (dict(teacher=pair.a), "method.teacher"),
        (dict(hfd_weight=-1.0), "collaborative_seg.hfd_weight"),
        (dict(pixel_weight=float("inf")), "collaborative_seg.pixel_weight"),
        (dict(temperature=0), "collaborative_seg.temperature"),
        (dict(regions=0), "collaborative_seg.regions"),
        (dict(region_on="tokens"), "collaborative_seg.region_on"),
        (dict(compare="yes"), "collaborative_seg.compare"),
        (dict(a_tap="enc9"), "collaborative_seg.a_tap"),
        (dict(b_region_tap="blocks.7", region_on="features"), "collaborative_seg.b_region_tap"),
    ]:
        kw = {"student": pair, "teacher": None, **bad}
        with pytest.raises(ConfigError, match=match):
            build("collaborative_seg", kw.pop("student"), kw.pop("teacher"), **kw)
    with pytest.raises(ConfigError, match="dml_seg.weight"):
        build("dml_seg", pair, None, weight=-1)
    with pytest.raises(ConfigError, match="method.student"):
        build("dml_seg", plain, None)
    assert "Cooperative and Reliable" in METHODS.meta("collaborative_seg")["paper"]
    assert METHODS.meta("dml_seg")["year"] == 2018


# -- end to end ------------------------------------------------------------------------------
def _canvases(n=16, size=16, seed=0):
    k = 20
    y = torch.arange(k) % 10
    x = torch.zeros(k, 1, 6, 5)
    x[:, :, 1:-1, 1:-1] = (0.55 + 0.045 * y).view(k, 1, 1, 1)
    img, seg = make_canvases(x, y, n, size=size, max_digits=2, seed=seed)
    return Dataset({"image": img, "seg": seg}, {"image": "image", "seg": "label_map"},
                   num_classes=11)


@pytest.mark.parametrize("method,kw", [("collaborative_seg", {}),
                                       ("collaborative_seg", {"region_on": "features"}),
                                       ("dml_seg", {})])
def test_tiny_canvas_fit(method, kw, one_thread):
    data, val = _canvases(), _canvases(8, seed=1)
    pair = _pair()
    recipe = build(method, pair, None, **kw)
    d = cd.Distiller(pair, None, recipe.terms, task=TASK, seed=0)
    best = BestMembersByTask(pair, val, TASK)
    trainer = cd.Trainer(d, data, val, epochs=3, seed=0, callbacks=[best], **FAST)
    trainer.fit()
    rows = trainer.log.rows
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert all(math.isfinite(float(v)) for v in d.last_losses.values())
    assert set(d.last_losses) == {t.name for t in recipe.terms}
    assert all(len(c) == 3 for c in best.curves.values())
    picked = best.restore()
    res = evaluate_members(pair, val, TASK)
    for n in ("a", "b"):  # the restored weights are each member's best epoch
        assert res[n]["miou"] == pytest.approx(picked[n][0])
        assert best.curves[n][picked[n][1]] == pytest.approx(picked[n][0])
    if method == "collaborative_seg":  # projectors live in the loss modules, not the members
        opt = {id(p) for g in trainer.opt.param_groups for p in g["params"]}
        assert "hfd" in d.loss_modules and d.loss_modules["hfd"].ab.proj.weight.requires_grad
        assert all(id(p) in opt for p in d.loss_modules.parameters())
    exported = d.export()
    assert set(exported.state_dict()) == set(pair.state_dict())
    fresh = cd.models.create("vit-seg", num_classes=11, img_size=16, patch=4, dim=8, depth=1,
                             heads=2, decoder_dim=4)
    fresh.load_state_dict(pair.b.state_dict())  # a member is a plain model
