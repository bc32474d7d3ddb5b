"""GCP + SAD: the channel graph and group pruning (residual merge, U-Net skips, exactness of
the sliced network), the sad / bn_l1 losses (hand values, float64 gradchecks), the recipe's
errors, and a tiny sparse -> prune -> SAD run whose kill-and-resume replays the prune."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import Kill, KillAfter
from torch import nn

import crossdistill as cd
import crossdistill.methods.gcp_sad  # noqa: F401  (registers gcp_sad, sad, bn_l1, slice_inputs)
from crossdistill import prune as P
from crossdistill.data import Dataset
from crossdistill.data.canvas import make_canvases
from crossdistill.errors import ConfigError
from crossdistill.losses.features import at
from crossdistill.losses.sad import bn_l1, sad, spatial_attention
from crossdistill.methods import METHODS, build
from crossdistill.structure import apply

TASK = {"name": "segmentation", "target": "seg", "num_classes": 11}


class Res(nn.Module):
    """stem conv-BN -> h; a conv-BN -> y; head(relu(h + y)): one residual group."""

    def __init__(self, cin=1):
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(cin, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        h = torch.relu(self.bn0(self.conv0(x)))
        return self.head(torch.relu(h + self.bn1(self.conv1(h))))


class InputResidual(nn.Module):
    """``x + bn(conv(x))``: the conv's channels are tied to the model input's."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(x + self.bn(self.conv(x)))


def _apply(model, events):
    for e in events:
        apply(model, e["op"], {k: v for k, v in e.items() if k != "op"})


def _random_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=g) + 0.01
            m.bias.data = torch.randn(m.num_features, generator=g) * 0.1
            m.running_mean.data = torch.randn(m.num_features, generator=g) * 0.1
            m.running_var.data = torch.rand(m.num_features, generator=g) + 0.5
    return model


def _zero_pruned(model, plan):
    """Zero gamma and beta of every channel the plan removes: the full network then computes
    exactly what the pruned one does (the removed channels carry zeros)."""
    for e in plan.events:
        if e["op"] == "prune_channels":
            bn = model.get_submodule(e["bn"])
            drop = torch.ones(bn.num_features, dtype=torch.bool)
            drop[e["keep"]] = False
            bn.weight.data[drop] = 0.0
            bn.bias.data[drop] = 0.0


# -- group channel pruning -------------------------------------------------------------------
def test_residual_group_keeps_the_union_of_its_members():
    m = Res()
    m.bn0.weight.data = torch.tensor([1.0, 0.9, 0.1, 0.05])
    m.bn1.weight.data = torch.tensor([0.9, 0.05, 1.0, 0.02])
    g = P.analyse(m)
    prods = g.producers()
    assert g.find(prods["conv0"]) == g.find(prods["conv1"])  # joined by the addition
    # one group (same scale and type), 8 channels, ratio 0.5: the 4 smallest go (0.02, 0.05
    # of bn0 first by layer order, 0.05, 0.1): bn0 keeps {0, 1}, bn1 {0, 2}; union {0, 1, 2}
    plan = P.plan(m, 0.5)
    assert plan.groups == {"Res/x1": {"channels": 8, "pruned": 4,
                                      "threshold": pytest.approx(0.9)}}
    assert plan.residual == [["conv0", "conv1"]]
    assert plan.events == [
        {"op": "prune_channels", "path": "conv0", "keep": [0, 1, 2], "bn": "bn0",
         "next": ["conv1", "head"]},
        {"op": "prune_channels", "path": "conv1", "keep": [0, 1, 2], "bn": "bn1", "next": []},
    ]
    x = torch.randn(2, 1, 6, 6)
    m.eval()
    _zero_pruned(m, plan)
    ref = m(x)
    _apply(m, plan.events)
    m.eval()  # (the sliced BNs are new modules, in training mode)
    assert m.conv0.out_channels == m.conv1.out_channels == m.head.in_channels == 3
    assert torch.allclose(m(x), ref, atol=1e-6)


def test_resnet_shortcuts_merge_and_forward_stays_exact():
    torch.manual_seed(0)
    m = _random_bn(cd.models.create("resnet", num_classes=10, in_channels=3, img_size=16,
                                    depth=8, width=1))
    plan = P.plan(m, 0.5)
    by_path = {e["path"]: e["keep"] for e in plan.events if e["op"] == "prune_channels"}
    assert ["layer2.0.conv2", "layer2.0.shortcut.0"] in plan.residual
    assert ["conv1", "layer1.0.conv2"] in plan.residual
    assert by_path["layer2.0.conv2"] == by_path["layer2.0.shortcut.0"]
    assert by_path["conv1"] == by_path["layer1.0.conv2"]
    # each group loses exactly half of its channels before the union
    assert all(v["pruned"] == v["channels"] // 2 for v in plan.groups.values())
    assert set(plan.groups) == {"ResNet/x1", "BasicBlock/x1", "BasicBlock/x2", "BasicBlock/x4"}
    x = torch.randn(2, 3, 16, 16)
    m.eval()
    _zero_pruned(m, plan)
    ref = m(x)
    before = P.count_params(m)
    _apply(m, plan.events)
    m.eval()
    assert P.count_params(m) < before
    assert torch.allclose(m(x), ref, atol=1e-5)


def test_unet_skips_slice_the_concatenation_followers():
    torch.manual_seed(0)
    m = _random_bn(cd.models.create("seg-cnn", num_classes=11, img_size=24, width=4))
    plan = P.plan(m, 0.5)
    ops = {(e["op"], e["path"]) for e in plan.events}
    # the ConvTranspose2d followers and the decoder convs that read cat([up, skip])
    assert {("slice_inputs", "dec1.up"), ("slice_inputs", "dec1.conv.0"),
            ("slice_inputs", "dec2.up"), ("slice_inputs", "dec2.conv.0")} <= ops
    skip = next(e for e in plan.events if e["path"] == "enc2.3" and e["op"] == "prune_channels")
    cat = next(e for e in plan.events if e["path"] == "dec1.conv.0" and e["op"] == "slice_inputs")
    assert cat["keep"] == list(range(8)) + [8 + k for k in skip["keep"]]  # up (8, kept) + skip
    assert set(plan.groups) == {"SegCNN/x1", "SegCNN/x2", "SegCNN/x4", "Up/x2", "Up/x1"}
    assert plan.channels == (40, 80)
    x = torch.randn(2, 1, 24, 24)
    m.eval()
    _zero_pruned(m, plan)
    ref = m(x)
    _apply(m, plan.events)
    out = m.eval()(x)
    assert out.shape == (2, 11, 24, 24) and m.head.out_channels == 11  # the output is kept
    assert torch.allclose(out, ref, atol=1e-5)


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        h = torch.relu(self.bn0(self.conv0(x)))
        return self.head(torch.relu(self.bn1(self.conv1(h))))


def test_group_thresholds_and_min_channels():
    m = Plain()
    m.bn0.weight.data = torch.tensor([0.01, 0.02, 0.04, 0.03])
    m.bn1.weight.data = torch.tensor([1.0, 0.9, 0.8, 0.7])
    # one group: the 4 smallest are all of bn0's; each layer keeps its min_channels largest
    plan = P.plan(m, 0.5, min_channels=2)
    assert plan.events == [{"op": "prune_channels", "path": "conv0", "keep": [2, 3],
                            "bn": "bn0", "next": ["conv1"]}]
    assert plan.kept == {"conv0": (2, 4), "conv1": (4, 4)}
    assert P.plan(m, 0.5, grouping="global").events[0]["keep"] == [2]
    assert P.plan(m, 0.0).events == []


class Opaque(nn.Module):
    """a: its map is flattened with the spatial dims (channels mixed into features); b: its
    channels are sliced; c: a plain conv-BN (prunable)."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.b, self.bn_b = nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.c, self.bn_c = nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4 + 2 * 4 * 4, 3)

    def forward(self, x):
        a = self.bn_a(self.a(x)).flatten(1)
        b = self.bn_b(self.b(x))[:, :2].flatten(1)
        c = self.bn_c(self.c(x))[..., :2, :]  # a spatial slice keeps the channels
        return self.fc(torch.cat([a, b], 1)) + c.mean()


def test_opaque_uses_freeze_their_channels():
    m = Opaque()
    g = P.analyse(m, torch.zeros(2, 1, 4, 4))
    frozen = {g.spaces[i].conv: g.spaces[i].frozen for i in g.producers().values()}
    assert "flatten" in frozen["a"] and "slices its channels" in frozen["b"]
    assert "mean" in frozen["c"]  # a channel-mixing reduction
    with pytest.raises(ConfigError, match="gcp.layers.*'a'.*cannot be pruned.*flatten"):
        P.plan(m, 0.5, layers=["a"], sample=torch.zeros(2, 1, 4, 4))


def test_errors():
    m = Res()
    for bad in (-0.1, 1.0, 1.5, True, "0.5", float("nan")):
        with pytest.raises(ConfigError, match="gcp.ratio"):
            P.plan(m, bad)
    with pytest.raises(ConfigError, match=r"gcp.layers.*conv.*breaks the residual connection"):
        P.plan(InputResidual(), 0.5, layers=["conv"])
    assert P.plan(InputResidual(), 0.5).events == []  # left out when not asked for
    with pytest.raises(ConfigError, match="gcp.layers.*no such module"):
        P.plan(m, 0.5, layers=["conv9"])
    with pytest.raises(ConfigError, match="gcp.layers.*head.*not a Conv2d followed"):
        P.plan(m, 0.5, layers=["head"])
    with pytest.raises(ConfigError, match="gcp.grouping"):
        P.plan(m, 0.5, grouping="layer")
    with pytest.raises(ConfigError, match="structure.keep"):
        apply(m, "slice_inputs", {"path": "conv1", "keep": [4]})
    with pytest.raises(ConfigError, match="structure.path"):
        apply(m, "slice_inputs", {"path": "bn0", "keep": [0]})
    with pytest.raises(ConfigError, match="gcp.prune_at"):
        P.PruneAt([], at=0)


# -- losses ----------------------------------------------------------------------------------
def test_sad_hand_value():
    s = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])  # mean_c F^2 = [5, 10] -> [1, 2]/sqrt 5
    t = torch.tensor([[[[2.0, 0.0]]]])  # one channel: [4, 0] -> [1, 0]
    assert spatial_attention(s).flatten().tolist() == pytest.approx(
        [1 / math.sqrt(5), 2 / math.sqrt(5)])
    # ((1 - 1/sqrt5)^2 + 4/5) / 2 = 1 - 1/sqrt5
    assert float(sad(s, t)) == pytest.approx(1 - 1 / math.sqrt(5))
    assert float(sad(t, t)) == 0.0
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 6, 5, 5, generator=g)
    assert float(sad(a, b)) == pytest.approx(float(at(a, b, p=2.0)))  # = AT with p = 2
    with pytest.raises(ConfigError, match="sad.inputs"):
        sad(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 2, 2))


def test_bn_l1_hand_values_and_gradient_is_the_sign_term():
    gamma = torch.tensor([0.5, -0.2, 0.1, 0.4], requires_grad=True)
    assert float(bn_l1(gamma).detach()) == pytest.approx(1.2)
    # segments [2, 2], keep half: the kept are 0.5 (seg 1) and 0.4 (seg 2)
    dyn = bn_l1(gamma, segments=[2, 2], keep=0.5, kept=-0.99, rest=0.0)
    assert float(dyn.detach()) == pytest.approx(-0.99 * 0.9)
    (bn_l1(gamma) + dyn).backward()
    assert gamma.grad.tolist() == pytest.approx([0.01, -1.0, 1.0, 0.01])
    with pytest.raises(ConfigError, match="bn_l1.segments"):
        bn_l1(gamma, segments=[3], keep=0.5, kept=0.0)
    with pytest.raises(ConfigError, match="bn_l1.kept"):
        bn_l1(gamma, kept=2.0)


def test_gradchecks_float64():
    g = torch.Generator().manual_seed(0)
    d = dict(dtype=torch.float64)
    s = torch.randn(2, 3, 3, 3, generator=g, **d).requires_grad_(True)
    t = torch.randn(2, 5, 3, 3, generator=g, **d)
    assert torch.autograd.gradcheck(lambda a: sad(a, t), (s,))
    gam = (torch.rand(6, generator=g, **d) + 0.1).requires_grad_(True)  # away from the kink
    assert torch.autograd.gradcheck(
        lambda a: bn_l1(a, segments=[3, 3], keep=0.34, kept=-0.99, rest=1.0), (gam,))


def test_sparse_term_adds_s_sign_gamma_to_the_gradient():
    torch.manual_seed(0)
    m = cd.models.create("seg-cnn", num_classes=11, img_size=16, width=2)
    recipe = build("gcp_sad", m, None, stage="sparse", sparsity=0.004, epochs=10,
                   ce_weight=0.0)
    assert [t.name for t in recipe.terms] == ["bn_l1", "bn_l1_dynamic"]
    assert recipe.terms[1].weight_at(3.9) == 0.0 and recipe.terms[1].weight_at(4.0) == 0.004
    d = cd.Distiller(m, None, recipe.terms, task=TASK)
    batch = {"image": torch.randn(2, 1, 16, 16), "seg": torch.zeros(2, 16, 16).long()}
    d.train()
    d.set_progress(0, 10, steps_per_epoch=1)
    d(batch).total.backward()
    bns = [mod for p, mod in m.named_modules() if isinstance(mod, nn.BatchNorm2d)]
    assert len(bns) == 10  # every conv-BN of the U-Net may be pruned
    for bn in bns:
        assert torch.allclose(bn.weight.grad, 0.004 * bn.weight.detach().sign())
        bn.weight.grad = None
    d.set_progress(5, 10, steps_per_epoch=1)  # past 40 %: the kept 65 % get 1 %
    d(batch).total.backward()
    ratio = torch.cat([bn.weight.grad / (0.004 * bn.weight.detach().sign()) for bn in bns])
    assert sorted({round(float(r), 6) for r in ratio}) == [0.01, 1.0]
    P.release(m)
    assert not hasattr(m, P.ATTR) and P._pre_forward not in m._forward_pre_hooks.values()


def test_recipe_errors_and_registration():
    torch.manual_seed(0)
    t = cd.models.create("seg-cnn", num_classes=11, img_size=16, width=4)
    s = cd.models.create("seg-cnn", num_classes=11, img_size=16, width=4)
    with pytest.raises(ConfigError, match="gcp_sad.stage"):
        build("gcp_sad", s, t, stage="prune")
    with pytest.raises(ConfigError, match="gcp_sad.distill"):
        build("gcp_sad", s, t, distill="fitnet")
    with pytest.raises(ConfigError, match="gcp_sad.ratio"):
        build("gcp_sad", s, t, ratio=1.0)
    with pytest.raises(ConfigError, match="method.teacher"):
        build("gcp_sad", s, None, distill="sad")
    with pytest.raises(ConfigError, match="gcp_sad.epochs"):
        build("gcp_sad", s, None, stage="sparse")
    with pytest.raises(ConfigError, match="gcp_sad.sparsity"):
        build("gcp_sad", s, None, stage="sparse", epochs=4, sparsity=0.0)
    with pytest.raises(ConfigError, match="gcp_sad.taps"):
        build("gcp_sad", s, t, taps=["enc9"])
    with pytest.raises(ConfigError, match="gcp_sad.weights"):
        build("gcp_sad", s, t, taps=["enc1", "enc3"], weights=[1.0])
    with pytest.raises(ConfigError, match="gcp.layers"):
        build("gcp_sad", s, t, layers=["head"])
    r = build("gcp_sad", s, t, input_size=16, taps=["enc1", "enc3"], head_kd=0.5,
              sad_beta=1.0)
    # b = sad_beta * H * W at the probe size: 16x16 and 4x4 maps
    assert [(x.loss, x.weight) for x in r.terms] == [("ce", 1.0), ("sad", 256.0),
                                                      ("sad", 16.0), ("kd", 0.5)]
    assert r.terms[-1].params["temperature"] == 3.0
    assert r.params[1] < r.params[0] and isinstance(r.hooks[0], P.PruneAt)
    assert [x.loss for x in build("gcp_sad", s, None, distill="none").terms] == ["ce"]
    assert [x.loss for x in build("gcp_sad", s, t, distill="kd").terms] == ["ce", "kd"]
    assert METHODS.meta("gcp_sad")["year"] == 2022
    assert "Group channel pruning" in METHODS.meta("gcp_sad")["paper"]


# -- end to end ------------------------------------------------------------------------------
def _canvases(n=16, size=24):
    k = 20
    y = torch.arange(k) % 10
    x = torch.zeros(k, 1, 8, 6)
    x[:, :, 1:-1, 1:-1] = (0.55 + 0.045 * y).view(k, 1, 1, 1)
    img, seg = make_canvases(x, y, n, size=size, max_digits=2, seed=0)
    return Dataset({"image": img, "seg": seg}, {"image": "image", "seg": "label_map"},
                   num_classes=11)


FAST = dict(batch_size=8, lr=3e-3, optimizer="adamw", progress=False, seed=0)


def _unet(seed=0):
    torch.manual_seed(seed)
    return cd.models.create("seg-cnn", num_classes=11, img_size=24, width=4)


def _finetune(sparse_state, data, out_dir=None, callbacks=(), resume=False, seed=0):
    t = _unet(seed)
    t.load_state_dict(sparse_state)
    s = _unet(seed + 1)  # a fresh student holding the sparse weights
    s.load_state_dict(sparse_state)
    recipe = build("gcp_sad", s, t, ratio=0.5, input_size=24)
    d = cd.Distiller(s, t, recipe.terms, task=TASK, hooks=recipe.hooks, seed=0)
    trainer = cd.Trainer(d, data, data, epochs=2, checkpoint_every=1, out_dir=out_dir,
                         callbacks=list(callbacks), **FAST)
    trainer.fit(resume=resume)
    return d, recipe


def test_tiny_sparse_prune_sad_run_and_resume_replays_the_prune(tmp_path, one_thread):
    data = _canvases()
    m = _unet()
    fresh = set(m.state_dict())
    recipe = build("gcp_sad", m, None, stage="sparse", sparsity=0.005, epochs=2, input_size=24)
    d = cd.Distiller(m, None, recipe.terms, task=TASK, seed=0)
    trainer = cd.Trainer(d, data, data, epochs=2, **FAST)
    trainer.fit()
    assert "loss_bn_l1" in trainer.log.rows[-1]
    assert set(d.export().state_dict()) == fresh  # the gamma tap holds no weights
    P.release(m)
    assert set(m.state_dict()) == fresh and not hasattr(m, P.ATTR)
    sparse = {k: v.clone() for k, v in m.state_dict().items()}

    ref, recipe = _finetune(sparse, data, tmp_path / "a")
    events = recipe.plan.events
    assert ref.structure_log == events  # applied once, after the first step
    assert ref.student.enc3[3].out_channels < 16 and ref.student.head.out_channels == 11
    exported = ref.export()
    assert P.count_params(exported) == recipe.params[1]
    assert exported(data.tensors["image"][:2]).shape == (2, 11, 24, 24)

    with pytest.raises(Kill):  # 16 / 8 = 2 steps per epoch: die in epoch 2, after the prune
        _finetune(sparse, data, tmp_path / "b", callbacks=[KillAfter(3)])
    d2, _ = _finetune(sparse, data, tmp_path / "b", resume=True, seed=5)
    assert d2.structure_log == events  # replayed from the checkpoint, not applied again
    for (k, a), b in zip(ref.trainable_state().items(), d2.trainable_state().values()):
        assert torch.equal(a, b), k
