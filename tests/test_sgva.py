"""SgVA-CLIP: the residual adapter, the val-chosen mix, the recipe, a tiny few-shot run."""

import pytest
import torch
import torch.nn.functional as F

import crossdistill as cd
from crossdistill.errors import ConfigError
from crossdistill.methods import build
from crossdistill.methods.sgva import RATIOS, AdaptedClassifier, ChooseRatio, ResidualAdapter
from crossdistill.methods.vlm_ood import TextClassifier, embedder


def _tower(seed=0, dim=16):
    torch.manual_seed(seed)
    return embedder(cd.models.create("cnn", num_classes=10, in_channels=1, img_size=8,
                                     channels=(8, 16)), dim)


def _texts(k=5, dim=16):
    return torch.randn(k, dim, generator=torch.Generator().manual_seed(3))


def test_adapter_golden():
    a = ResidualAdapter(4, ratio=0.25, reduction=2)
    f = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.allclose(a(f), 0.25 * a.mlp(f) + 0.75 * f, atol=1e-6)
        a.mlp[2].weight.zero_()
        a.mlp[2].bias.zero_()
        assert torch.allclose(a(f), 0.75 * f)
    assert a.mlp[0].out_features == 2
    with pytest.raises(ConfigError, match="adapter_ratio"):
        ResidualAdapter(4, ratio=1.5)


def test_modes_and_mix():
    tower = _tower()
    m = AdaptedClassifier(tower, _texts(), temperature=0.01)
    assert not any(p.requires_grad for p in m.image.parameters())
    x = torch.randn(4, 1, 8, 8)
    m.train()
    assert not m.image.training  # the frozen tower stays in eval
    za, z0 = m.both(x)
    assert torch.allclose(m(x), za)
    with torch.no_grad():
        f = tower(x)
        assert torch.allclose(z0, F.normalize(f, dim=-1) @ F.normalize(_texts(), dim=-1).T
                              / 0.01, atol=1e-3)
    m.eval()
    m.mix.fill_(0.3)
    with torch.no_grad():
        za, z0 = m.both(x)
        assert torch.allclose(m(x), 0.3 * za + 0.7 * z0, atol=1e-5)
    assert "mix" in m.state_dict()  # the chosen ratio travels with the best checkpoint


def test_choose_ratio_picks_the_best_on_val():
    m = AdaptedClassifier(_tower(), _texts()).eval()
    x = torch.randn(40, 1, 8, 8)
    with torch.no_grad():
        _, z0 = m.both(x)
    val = cd.data.Dataset({"x": x, "y": z0.argmax(-1)}, {"x": "image", "y": "label"})
    acc, b = ChooseRatio(m, val).choose()
    # the zero-shot logits are the labels: ratio 0 is perfect; the adapter's random init is
    # not (ties would go to the larger ratio)
    assert acc == 1.0 and b in RATIOS and float(m.mix) == pytest.approx(b)
    with pytest.raises(ConfigError, match="AdaptedClassifier"):
        ChooseRatio(TextClassifier(_tower(), _texts()), val)


def test_recipe_and_bad_inputs():
    tower = _tower()
    s = AdaptedClassifier(tower, _texts())
    t = TextClassifier(tower, _texts(), 0.01)
    r = build("sgva-clip", s, t)
    assert [x.name for x in r.terms] == ["supcon", "cross_modal", "implicit_kd"]
    assert [str(x) for x in r.terms[1].student] == ["embed_out", "text_out"]
    assert r.terms[1].params["temperature"] == 0.01 and r.terms[2].params["temperature"] == 1.0
    ce = build("sgva-clip", s, t, supcon_weight=0, cross_modal_weight=0, kd_weight=0, ce_weight=1)
    assert [x.name for x in ce.terms] == ["ce"]
    with pytest.raises(ConfigError, match="method.student"):
        build("sgva-clip", TextClassifier(tower, _texts()), t)
    with pytest.raises(ConfigError, match="method.teacher"):
        build("sgva-clip", s, None)
    with pytest.raises(ConfigError, match="method.supcon_weight"):
        build("sgva-clip", s, t, supcon_weight=0, cross_modal_weight=0, kd_weight=0)
    with pytest.raises(ConfigError, match="method.kd_weight"):
        build("sgva-clip", s, t, kd_weight=-1)


def test_tiny_few_shot_run():
    d = cd.data.load("digits", "train")
    keep = torch.isin(d.y, torch.arange(5, 10)).nonzero().flatten()
    g = torch.Generator().manual_seed(0)
    shots = torch.cat([keep[d.y[keep] == c][torch.randperm(int((d.y[keep] == c).sum()),
                                                            generator=g)[:4]]
                       for c in range(5, 10)])
    tr = d.subset(shots)
    tr.tensors["y"] = tr.y - 5
    v = cd.data.load("digits", "val")
    va = v.subset(torch.isin(v.y, torch.arange(5, 10)).nonzero().flatten())
    va.tensors["y"] = va.y - 5
    tower = _tower(1)
    teacher = TextClassifier(tower, _texts(), 0.01).eval()
    s = AdaptedClassifier(tower, _texts())
    r = build("sgva-clip", s, teacher)
    chooser = ChooseRatio(s, va)
    t = cd.Trainer(cd.Distiller(s, teacher, r.terms), tr, va, epochs=5, batch_size=20, lr=1e-2,
                   optimizer="adamw", progress=False, callbacks=[chooser])
    res = t.fit()
    losses = t.log.rows
    assert any("train_supcon" in row or "train_loss" in row for row in losses)
    assert float(s.mix) in RATIOS and 0.0 <= res["best_val_acc"] <= 1.0
    # only the adapter learned: the shared frozen tower is untouched
    assert all(p.grad is None for p in tower.parameters())
