"""DistillFSS: the few-shot episodes, the prototype teacher, the support-free student, the
focal / coarse-map losses (hand values, float64 gradchecks), the recipe's stages and a tiny
end-to-end run of each stage."""

from __future__ import annotations

import math

import pytest
import torch

import crossdistill as cd
import crossdistill.methods.distillfss as DF
import crossdistill.models.fewshot as MF
from crossdistill.data.fewshot import class_canvases, fewshot_dataset, layout
from crossdistill.errors import ConfigError
from crossdistill.losses.distillfss import focal, fss_coarse_mse, fss_focal, fss_focal_kd
from crossdistill.methods import build
from crossdistill.registry import DATASETS, LOSSES, METHODS, MODELS

TINY = dict(size=40, crop=12, min_digits=2, max_digits=3, normalize=False)


@pytest.fixture(scope="module")
def novel():
    """A 2-shot novel task: the leave-one-out shots, val and test queries."""
    kw = dict(TINY, shots=2)
    return (fewshot_dataset("train", None, episodes="shots", **kw),
            fewshot_dataset("val", 10, **kw), fewshot_dataset("test", 10, **kw))


# -- data ------------------------------------------------------------------------------------
def test_class_canvases_golden_masks():
    k = 20
    y = torch.arange(k) % 2
    x = torch.full((k, 1, 6, 6), 0.8)  # every digit is a 6x6 block of ink
    targets = torch.tensor([1, 1, 1, 1])
    img, mask = class_canvases(x, y, targets, pool=(0,), size=24, max_digits=3, seed=0,
                               min_digits=3)
    count, _, _ = layout(4, 24, (6, 6), 3, 3, 0)
    assert torch.equal(count, torch.full((4,), 3))
    assert mask.sum((1, 2)).tolist() == [36] * 4  # one target digit, two distractors of 0
    assert (img > 0.5).sum((1, 2, 3)).tolist() == [108] * 4  # three digits, no overlap
    assert bool((img[:, 0] > 0.5)[mask.bool()].all())
    img2, mask2 = class_canvases(x, y, targets, pool=(0,), size=24, max_digits=3, seed=0,
                                 min_digits=3)
    assert torch.equal(img, img2) and torch.equal(mask, mask2)


def test_episodes_keys_supports_and_leave_one_out(novel):
    shots, val, test = novel
    assert set(val.keys()) == {"image", "mask", "cls", "support_image", "support_mask", "idx"}
    assert val["support_image"].shape == (10, 2, 1, 40, 40)
    assert val["cls"].tolist() == [5, 6, 7, 8, 9] * 2
    assert set(val["mask"].unique().tolist()) <= {0, 1}
    assert bool((val["mask"].flatten(1).sum(1) > 0).all())  # the target is always there
    # one fixed support set per class, shared by every query and every split
    assert torch.equal(val["support_image"][0], val["support_image"][5])
    assert torch.equal(val["support_image"][0], test["support_image"][0])
    assert not torch.equal(val["support_image"][0], val["support_image"][1])
    # shots: 2 x 5 rows, each with the other shot of its class as its support
    assert len(shots) == 10 and shots["cls"].tolist() == [5, 5, 6, 6, 7, 7, 8, 8, 9, 9]
    assert torch.equal(shots["support_image"][0, 0], shots["image"][1])
    assert torch.equal(shots["support_mask"][1, 0], shots["mask"][0].float())
    assert torch.equal(shots["image"][0], val["support_image"][0, 0])  # the task's own shots
    other = fewshot_dataset("val", 10, shots=2, support_seed=1, **TINY)
    assert not torch.equal(other["support_image"][0], val["support_image"][0])
    assert torch.equal(other["image"], val["image"])  # same queries, another task
    ink = val["image"][:, 0] > 0.5
    assert bool(ink[val["mask"].bool()].all())


def test_base_episodes_and_registered_source():
    base = fewshot_dataset("val", 10, role="base", shots=2, **TINY)
    assert set(base["cls"].tolist()) == {0, 1, 2, 3, 4}
    assert not torch.equal(base["support_image"][0], base["support_image"][5])  # own supports
    d = cd.data.load_split("fewshot-canvas", "test", n=5, shots=1, **TINY)
    assert len(d) == 5 and d.num_classes == 2 and d.info["classes"] == [5, 6, 7, 8, 9]
    assert DATASETS.meta("fewshot-canvas")["task"] == "segmentation"


@pytest.mark.parametrize("kw, field", [
    (dict(shots=0), "data.shots"),
    (dict(shots=1, episodes="shots"), "data.shots"),
    (dict(shots=True), "data.shots"),
    (dict(base=[0, 1, 5], novel=[5, 6]), "data.novel"),
    (dict(novel=[5, 10]), "data.novel"),
    (dict(novel=[]), "data.novel"),
    (dict(base=[1, 1]), "data.base"),
    (dict(base="01234"), "data.base"),
    (dict(role="held"), "data.role"),
    (dict(episodes="all"), "data.episodes"),
    (dict(distractors="none"), "data.distractors"),
    (dict(min_digits=3, max_digits=2), "data.min_digits"),
    (dict(episodes="shots", role="base"), "data.role"),
    (dict(crop=40), "data.crop"),
])
def test_config_errors(kw, field):
    with pytest.raises(ConfigError) as err:
        fewshot_dataset("val", 5, **{**TINY, **kw})
    assert err.value.field == field
    with pytest.raises(ConfigError, match="data.n"):
        fewshot_dataset("train", 7, episodes="shots", **TINY)


# -- losses ----------------------------------------------------------------------------------
def test_focal_hand_values():
    z = torch.tensor([[0.0, math.log(3.0)]])  # p = (1/4, 3/4)
    v1 = focal(z, torch.tensor([1]))
    assert float(v1) == pytest.approx((1 / 4) ** 2 * math.log(4 / 3))
    v0 = focal(z, torch.tensor([0]))
    assert float(v0) == pytest.approx((3 / 4) ** 2 * math.log(4))
    ce = torch.nn.functional.cross_entropy(z, torch.tensor([0]))
    assert float(focal(z, torch.tensor([0]), gamma=0.0)) == pytest.approx(float(ce))
    w = torch.tensor([2.0, 0.5])  # the official weighted branch crashes; this one weighs
    assert float(fss_focal(z, y=torch.tensor([0]), weights=[2.0, 0.5])) == pytest.approx(
        2 * float(v0))
    assert float(focal(z, torch.tensor([1]), weights=w)) == pytest.approx(0.5 * float(v1))
    assert float(focal(z, torch.tensor([-100]))) == 0.0
    # the teacher's argmax is the target; class_dim=1 reads (B, K, H, W) maps
    t = torch.tensor([[5.0, -1.0]])
    assert float(fss_focal_kd(z, t)) == pytest.approx(float(v0))
    zm = torch.randn(2, 2, 3, 3)
    y = torch.randint(0, 2, (2, 3, 3))
    assert torch.allclose(fss_focal(zm, y=y, class_dim=1),
                          fss_focal(zm.movedim(1, -1), y=y))


def test_coarse_mse_hand_value_and_errors():
    s = [torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 1, 1)]
    t = [torch.ones(1, 2, 2, 2), torch.full((1, 2, 1, 1), 3.0)]
    assert float(fss_coarse_mse(s, t)) == pytest.approx((1 + 9) / 2)
    with pytest.raises(ConfigError):
        fss_coarse_mse(s, t[:1])
    with pytest.raises(ConfigError):
        fss_coarse_mse([torch.zeros(1, 2, 2, 2)], [torch.zeros(1, 2, 1, 1)])
    with pytest.raises(ConfigError):
        fss_focal(torch.zeros(1, 2), y=torch.tensor([0]), weights=[1.0])
    with pytest.raises(ConfigError):
        fss_focal(torch.zeros(1, 2), y=torch.tensor([0]), class_dim=3)


def test_gradchecks_float64():
    torch.manual_seed(0)
    z = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[0, 1, -100], [1, 1, 0]])
    zt = torch.randn(2, 3, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: fss_focal(a, y=y, weights=[0.7, 1.3]), (z,))
    assert torch.autograd.gradcheck(lambda a: fss_focal_kd(a, zt, gamma=2.0), (z,))
    a = torch.randn(1, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, 2, 1, 1, dtype=torch.float64, requires_grad=True)
    ta, tb = torch.randn(1, 2, 2, 2).double(), torch.randn(1, 2, 1, 1).double()
    assert torch.autograd.gradcheck(lambda p, q: fss_coarse_mse([p, q], [ta, tb]), (a, b))
    f = torch.randn(1, 2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    m = (torch.rand(1, 2, 4, 4) > 0.5).double()
    assert torch.autograd.gradcheck(lambda x: MF.masked_average_pool(x, m)[0], (f,))


# -- models ----------------------------------------------------------------------------------
def test_masked_average_pool_and_cosine_golden():
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 1, 2, 2)
    m = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    fg, bg = MF.masked_average_pool(f, m)
    assert float(fg) == 1.0 and float(bg) == pytest.approx(3.0)
    q = torch.tensor([[1.0, 0.0], [1.0, 1.0]]).view(1, 2, 1, 2)  # pixels (1, 1) and (0, 1)
    c = MF.CoarseMap()(q, torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 2.0]]))
    assert torch.allclose(c[0, :, 0, 0], torch.tensor([1.0, 1 / math.sqrt(2)]))
    assert torch.allclose(c[0, :, 0, 1], torch.tensor([1 / math.sqrt(2), 1.0]))


def _teacher(width=4, seed=0):
    torch.manual_seed(seed)
    return cd.models.create("proto-fss", width=width, img_size=40).eval()


def test_teacher_shapes_shot_order_and_errors():
    t = _teacher()
    x, sup = torch.randn(2, 1, 40, 40), torch.randn(2, 3, 1, 40, 40)
    sm = (torch.rand(2, 3, 40, 40) > 0.8).float()
    with torch.no_grad():
        z = t(x, sup, sm)
        z2 = t(x, sup.flip(1), sm.flip(1))  # prototypes pool over the shots: order-free
    assert z.shape == (2, 2, 40, 40) and torch.allclose(z, z2, atol=1e-5)
    with pytest.raises(ConfigError, match="support"):
        t(x, sup[:, :, :, :20], sm)
    with pytest.raises(ConfigError, match="support_mask"):
        t(x, sup, sm[:, :2])


def test_student_reuses_teacher_and_support_path_is_the_teacher():
    t = _teacher()
    torch.manual_seed(1)
    s = MF.student_from_teacher(t, [5, 6]).eval()
    for n in ("enc1", "enc2", "enc3", "decoder"):
        a, b = getattr(s, n).state_dict(), getattr(t, n).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    x, sup = torch.randn(3, 1, 40, 40), torch.randn(3, 2, 1, 40, 40)
    sm = (torch.rand(3, 2, 40, 40) > 0.8).float()
    cls = torch.tensor([5, 6, 5])
    with torch.no_grad():
        z = s(x, cls)
        out = s(x, cls, sup, sm)
        zt = t(x, sup, sm)
    assert z.shape == (3, 2, 40, 40) and torch.equal(out["logits"], z)
    assert torch.allclose(out["support_logits"], zt, atol=1e-5)  # refinement's teacher path
    # the class block of each query
    with torch.no_grad():
        feats = s.encode(x)
        maps = s.distilled_maps(feats, s.class_index(cls))
        assert torch.allclose(maps[1][1], s.blocks[1][1](feats[2][1:2])[0])
        assert torch.allclose(maps[0][2], s.blocks[0][0](feats[1][2:3])[0])
    with pytest.raises(ConfigError, match="cls"):
        s(x, torch.tensor([5, 3, 6]))
    with pytest.raises(ConfigError, match="width"):
        MF.DistillFSSNet([5], 1, 8).load_teacher(t)


def test_frozen_encoder_keeps_its_statistics():
    t = _teacher()
    s = MF.student_from_teacher(t, [5]).train()
    assert not any(p.requires_grad for n in MF.ENCODER for p in getattr(s, n).parameters())
    assert all(not m.training for n in MF.ENCODER for m in getattr(s, n).modules())
    before = s.enc1[1].running_mean.clone()
    s(torch.randn(4, 1, 40, 40), torch.tensor([5] * 4)).sum().backward()
    assert torch.equal(before, s.enc1[1].running_mean)
    assert s.blocks[0][0][0].weight.grad is not None


# -- method ----------------------------------------------------------------------------------
def test_recipe_stages_and_weights():
    t = _teacher()
    s = MF.student_from_teacher(t, [5, 6])
    d = build("distillfss", s, t)
    assert [(x.loss, x.weight) for x in d.terms] == [("fss_focal_kd", 0.5),
                                                   ("fss_coarse_mse", 0.5)]
    assert [str(x) for x in d.terms[1].teacher] == list(DF.COARSE_TAPS)
    r = build("distillfss", s, t, stage="refine", class_weights=[1.0, 2.0])
    assert [(x.name, x.weight) for x in r.terms] == [
        ("focal_support", 1 / 3), ("focal", 1 / 3), ("coarse_mse", 1 / 3)]
    assert r.terms[0].params["class_dim"] == 1 and r.terms[1].params["weights"] == [1.0, 2.0]
    c = build("distillfss", s, None, stage="ce")
    assert [x.loss for x in c.terms] == ["ce"]
    wc = build("distillfss", s, None, stage="ce", class_weights=[1.0, 5.0]).terms[0]
    assert wc.loss == "fss_focal" and wc.params["gamma"] == 0.0  # weighted CE
    (tt,) = DF.teacher_terms(4.0)
    assert tt.params == {"gamma": 0.0, "weights": [1.0, 4.0]}
    with pytest.raises(ConfigError, match="fg_weight"):
        DF.teacher_terms(0)
    build("distillfss", s, t, train_decoder=False)
    assert not any(p.requires_grad for p in s.decoder.parameters())
    assert "DistillFSS" in METHODS.meta("distillfss")["paper"]
    assert METHODS.meta("distillfss")["year"] == 2025
    assert "fss_focal" in LOSSES and "proto-fss" in MODELS and "distillfss-student" in MODELS


def test_recipe_errors():
    t = _teacher()
    s = MF.student_from_teacher(t, [5])
    for kw, field in [(dict(stage="tune"), "distillfss.stage"),
                      (dict(gamma=-1), "distillfss.gamma"),
                      (dict(class_weights=[1.0]), "distillfss.class_weights"),
                      (dict(train_decoder="yes"), "distillfss.train_decoder"),
                      (dict(taps=["coarse.7"]), "distillfss.taps")]:
        with pytest.raises(ConfigError) as err:
            build("distillfss", s, t, **kw)
        assert err.value.field == field
    with pytest.raises(ConfigError, match="method.teacher"):
        build("distillfss", s, None)
    with pytest.raises(ConfigError, match="method.student"):
        build("distillfss", t, t)
    with pytest.raises(ConfigError):
        DF.distiller_kwargs("tune")
    with pytest.raises(ConfigError):
        MF.DistillFSSNet([5, 5])


def test_support_reaches_the_student_in_training_only():
    stage = DF.StudentSupport()
    b = {"support_image": torch.zeros(1), "support_mask": torch.ones(1)}
    out = stage(b, None)
    assert torch.equal(out["fss_support_mask"], b["support_mask"])
    with pytest.raises(ConfigError):
        stage({"image": torch.zeros(1)}, None)


# -- end to end ------------------------------------------------------------------------------
FAST = dict(batch_size=5, lr=3e-3, optimizer="adamw", progress=False)


@pytest.mark.parametrize("stage", ["distill", "refine", "ce"])
def test_tiny_end_to_end(stage, novel, one_thread):
    shots, val, test = novel
    t = _teacher(width=4)
    base = fewshot_dataset("train", 10, role="base", shots=2, **TINY)
    cd.Trainer(cd.Distiller(t, None, DF.teacher_terms(), **DF.teacher_kwargs()), base,
               epochs=1, **FAST).fit()
    teacher_m = cd.train.evaluate(t, test, task=DF.TASK, io=DF.TEACHER_IO)
    assert 0 <= teacher_m["iou"][1] <= 1
    torch.manual_seed(0)
    s = MF.student_from_teacher(t, [5, 6, 7, 8, 9])
    fresh = set(s.state_dict())
    recipe = build("distillfss", s, t, stage=stage)
    d = cd.Distiller(s, t if stage != "ce" else None, recipe.terms, seed=0,
                     **DF.distiller_kwargs(stage))
    calls = []
    s.register_forward_pre_hook(lambda m, a, kw: calls.append(kw.get("support") is not None),
                                with_kwargs=True)
    res = cd.Trainer(d, shots, val, test, epochs=2, seed=0, **FAST).fit()
    assert math.isfinite(res["test_miou"]) and 0 <= res["test_iou"][1] <= 1
    assert all(math.isfinite(float(v)) for v in d.last_losses.values())
    assert set(d.last_losses) == {x.name for x in recipe.terms}
    # training forwards see the support only in the refine stage, evaluation never
    assert any(calls) == (stage == "refine") and not calls[-1]
    exported = d.export()
    assert set(exported.state_dict()) == fresh
    assert not any(m._forward_hooks for m in exported.modules())
    assert exported(val["image"][:2], val["cls"][:2]).shape == (2, 2, 40, 40)
