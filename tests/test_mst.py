"""MST-Distill: masks and temporary hooks, the gate (golden, gradient from the KD term, load
balance), the three-stage driver end to end, and the KD / FitNet / CRD baselines with a
multimodal teacher and an image student."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import crossdistill as cd
from crossdistill import Distiller, Trainer
from crossdistill.data.dataset import Dataset
from crossdistill.errors import ConfigError
from crossdistill.losses.crossmodal import MSTLoss, load_balance, route
from crossdistill.methods import METHODS, build
from crossdistill.methods.members import Members
from crossdistill.methods.mst import (
    MaskedExpert,
    MaskNet,
    make_experts,
    mst_distill,
    stage1_terms,
)
from crossdistill.registry import LOSSES


def _av(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    image = torch.randn(n, 1, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float()
    audio = torch.randn(n, 1, 6, 10, generator=g) - y.view(-1, 1, 1, 1).float()
    return Dataset({"image": image, "audio": audio, "y": y},
                   {"image": "image", "audio": "audio", "y": "label"}, num_classes=4)


def _models(seed=0):
    torch.manual_seed(seed)
    t = cd.models.create("fusion", num_classes=4, img_size=8, audio_size=(6, 10), width=4, dim=8)
    a = cd.models.create("audio-cnn", num_classes=4, img_size=(6, 10), channels=(8,))
    s = cd.models.create("cnn", num_classes=4, in_channels=1, img_size=8, channels=(4, 8))
    return t, a, s


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# -- masks and masked experts -----------------------------------------------------------------


def test_masknet_shapes():
    torch.manual_seed(0)
    for x, spatial in ((torch.randn(5, 7), 0), (torch.randn(5, 7, 9), 1),
                       (torch.randn(5, 7, 3, 4), 2)):
        m = MaskNet(7, spatial, heads=3)(x)
        assert m.shape == (5, 7) and (m > 0).all() and (m < 1).all()
    assert MaskNet(64).hidden == 30  # the official sizing: 64 // (2 * 3) * 3
    with pytest.raises(ConfigError, match="mst.layers"):
        MaskNet(4, 3)


def test_masked_expert_hooks_are_temporary():
    t, _, _ = _models()
    t.eval()
    d = _av(6, 0)
    x, a = d.tensors["image"], d.tensors["audio"]
    plain = t(x, a)
    for layer in ("audio_branch.stage3", "fc:input"):
        net = MaskNet(16 if layer.startswith("audio") else 8, 2 if layer.startswith("a") else 0)
        e = MaskedExpert(t, layer, net)
        masked = e(x, a)
        assert masked.shape == plain.shape and not torch.allclose(masked, plain)
        assert _hooks(t) == 0 and torch.equal(t(x, a), plain)  # the base model is untouched
        with torch.no_grad():  # an all-ones mask gives back the plain model
            net.fc.bias.fill_(60.0)
            net.fc.weight.zero_()
        assert torch.allclose(e(x, a), plain, atol=1e-5)
        with pytest.raises(RuntimeError):
            e(x.repeat(1, 2, 1, 1), a)  # a forward that fails still removes its hook
        assert _hooks(t) == 0
    # frozen base in eval mode, even when the expert trains
    e.train()
    assert not t.training and e.masknet.training
    assert not any(p.requires_grad for p in t.parameters())
    with pytest.raises(ConfigError, match="mst.layers"):
        MaskedExpert(t, "audio_branch.stage9", net)
    with pytest.raises(ConfigError, match="mst.layers"):
        MaskedExpert(t, "fc:weight", net)


def test_make_experts_defaults():
    t, a, _ = _models()
    batch = _av(4, 0).batch(torch.arange(4))
    ex = make_experts(t, a, batch)
    assert ex.names == ["t0", "t1", "a0", "a1"]
    assert [ex[n].layer for n in ex.names] == [
        "audio_branch.stage3", "fc:input", "block1", "fc:input"]
    assert ex.member_io("a0") == {"inputs": ["audio"]}
    z = ex.logits(image=batch["image"], audio=batch["audio"])
    assert all(v.shape == (4, 4) for v in z.values())


# -- the gate ---------------------------------------------------------------------------------


def test_load_balance_golden_and_gradcheck():
    g = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]], dtype=torch.float64)
    gbar = [0.4, 0.4, 0.2]
    want = sum(1 / 3 * math.log((1 / 3) / p) for p in gbar)
    assert load_balance(g.log()).item() == pytest.approx(want, rel=1e-12)
    assert load_balance(torch.full((4, 5), 0.2).log()).item() == pytest.approx(0.0, abs=1e-7)
    logits = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: load_balance(z.log_softmax(-1)), (logits,))


def test_route_forms():
    torch.manual_seed(0)
    e = torch.randn(3, 4, 5)
    g = torch.softmax(torch.randn(3, 4), -1)
    mix = (g.unsqueeze(-1) * e).sum(1)
    assert torch.allclose(route(e, g.log()), mix, atol=1e-6)
    top = e[torch.arange(3), g.argmax(-1)]
    assert torch.allclose(route(e, g.log(), "top1"), top)
    assert torch.allclose(route(e, g.log(), "top1_st"), top, atol=1e-6)
    with pytest.raises(ConfigError, match="mst.routing"):
        route(e, g.log(), "top2")


def _gate_loss(routing, k=4, n_exp=4):
    torch.manual_seed(0)
    return MSTLoss([(6, k)], [(6, k)] * n_exp, routing=routing)


def test_mst_loss_golden():
    loss = _gate_loss("mixture").double()
    torch.manual_seed(1)
    z = torch.randn(6, 4, dtype=torch.float64)
    experts = [torch.randn(6, 4, dtype=torch.float64) for _ in range(4)]
    with torch.no_grad():
        g = torch.softmax(loss.gate.fc2(loss.gate.fc1(z)), -1)
        target = sum(g[:, i : i + 1] * experts[i] for i in range(4))
        p, q = torch.softmax(target / 4, -1), torch.log_softmax(z / 4, -1)
        kd = 16 * (p * (p.log() - q)).sum(-1).mean()
        lb = (0.25 * (math.log(0.25) - g.mean(0).log())).sum()
        assert loss([z], experts).item() == pytest.approx(float(kd + lb), rel=1e-10)
        assert loss.last["kd"].item() == pytest.approx(float(kd), rel=1e-10)
    zz = z.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: loss([x], experts), (zz,))


@pytest.mark.parametrize("routing,flows", [("mixture", True), ("top1_st", True), ("top1", False)])
def test_gate_gets_a_gradient_from_the_kd_term(routing, flows):
    """The official top-1-by-index gives the gate no KD gradient; mixture and
    straight-through top-1 do."""
    loss = _gate_loss(routing)
    torch.manual_seed(2)
    z = torch.randn(6, 4, requires_grad=True)  # the student's logits
    experts = [torch.randn(6, 4) * 3 for _ in range(4)]
    loss.parts(z, experts)["kd"].backward()
    grad = loss.gate.fc1.weight.grad
    norm = 0.0 if grad is None else grad.abs().sum().item()
    assert (norm > 1e-6) == flows
    assert z.grad.abs().sum() > 0  # the student always gets the KD gradient


def test_mst_loss_and_recipe_errors():
    with pytest.raises(ConfigError, match="mst.teacher"):
        MSTLoss([(6, 4)], [(6, 4)])
    with pytest.raises(ConfigError, match="mst.teacher"):
        MSTLoss([(6, 4)], [(6, 4), (6, 3)])
    t, a, s = _models()
    with pytest.raises(ConfigError, match="method.teacher"):
        build("mst", s, t)
    ex = make_experts(t, a, _av(4, 0).batch(torch.arange(4)))
    with pytest.raises(ConfigError, match="method.routing"):
        build("mst", s, ex, routing="top2")
    r = build("mst", s, ex)
    assert [x.loss for x in r.terms] == ["ce", "mst"]
    assert [str(x) for x in r.terms[1].teacher] == ["t0", "t1", "a0", "a1"]
    with pytest.raises(ConfigError, match=r"mst.epochs\[2\]"):
        mst_distill(t, a, s, _av(8, 0), _av(8, 1), epochs=(1, 1, 0))
    with pytest.raises(ConfigError, match="mst.epochs"):
        mst_distill(t, a, s, _av(8, 0), _av(8, 1), epochs=(1, 1))
    meta = METHODS.meta("mst")
    assert meta["paper"].startswith("MST-Distill") and meta["year"] == 2025
    assert LOSSES.meta("mst")["stateful"] and LOSSES.get("mst").__doc__


def test_stage1_kl_targets_are_detached():
    terms = stage1_terms()
    assert [t.name for t in terms] == ["ce_t", "ce_a", "ce_s", "kl_ta", "kl_ts", "kl_as"]
    from crossdistill.losses.hetero import dml

    za = torch.randn(3, 4, requires_grad=True)
    zb = torch.randn(3, 4, requires_grad=True)
    # KL(sg(p_b) || p_a) + KL(sg(p_a) || p_b): each side gets only its own pull; the value
    # is T^2 times the KL (the 16 at T = 4)
    T = 4.0
    got = dml([za, zb], temperature=T).mean()
    pa, pb = torch.softmax(za / T, -1), torch.softmax(zb / T, -1)
    want = 16 * ((pb * (pb.log() - pa.log())).sum(-1) + (pa * (pa.log() - pb.log())).sum(-1))
    assert got.item() == pytest.approx(want.mean().item(), rel=1e-5)
    ga, = torch.autograd.grad(got, za)
    only_a = 16 * (pb.detach() * (pb.detach().log() - torch.log_softmax(za / T, -1))).sum(-1)
    ga_want, = torch.autograd.grad(only_a.mean(), za)
    assert torch.allclose(ga, ga_want, atol=1e-6)


# -- end to end -------------------------------------------------------------------------------


def test_mst_distill_three_stages(one_thread):
    t, a, s = _models()
    tr, va, te = _av(32, 1), _av(16, 2), _av(16, 3)
    keys = set(s.state_dict())
    before = {k: v.clone() for k, v in s.state_dict().items()}
    out = mst_distill(t, a, s, tr, va, te, epochs=(1, 1, 1), batch_size=16, lr=3e-3)
    assert set(out["stage1"]["val_acc"]) == {"t", "a", "s"}
    assert set(out["stage1"]["test"]["t"]) >= {"acc", "loss"}
    kl = out["stage2"]["val_kl"]
    assert set(kl) == {"t0", "t1", "a0", "a1"} and all(math.isfinite(v) for v in kl.values())
    res = out["results"]
    assert 0.0 <= res["test_acc"] <= 1.0 and 0.0 <= res["best_val_acc"] <= 1.0
    assert sum(res["routes"].values()) == 32  # one top-1 pick per training sample
    # the student: trained, clean (no hooks), same keys; the teachers carry no hooks either
    assert set(out["student"].state_dict()) == keys
    assert any(not torch.equal(before[k], v) for k, v in s.state_dict().items())
    assert _hooks(s) == 0 and _hooks(t) == 0 and _hooks(a) == 0
    assert any(p.requires_grad for p in s.parameters())
    assert isinstance(out["experts"], Members) and isinstance(out["gate"], nn.Module)


# -- baselines: KD, FitNet, CRD with a multimodal (or audio) teacher and an image student ----


@pytest.mark.parametrize("method,params", [
    ("kd", {}),
    ("fitnet", {"student_tap": "fc:input", "teacher_tap": "fc:input", "weight": 1.0}),
    ("crd", {"num_negatives": 8}),
])
def test_baselines_with_a_fusion_teacher(method, params, one_thread):
    t, a, s = _models()
    tr, va = _av(32, 1), _av(16, 2)
    for teacher, t_io in ((t, {"inputs": ["image", "audio"]}), (a, {"inputs": ["audio"]})):
        recipe = build(method, s, teacher, **params)
        d = Distiller(s, teacher, recipe.terms, io={"inputs": ["image"]}, teacher_io=t_io,
                      num_samples=int(tr.idx.max()) + 1)
        res = Trainer(d, tr, va, epochs=1, batch_size=16, lr=3e-3, optimizer="adamw",
                      progress=False).fit()
        assert all(math.isfinite(float(v)) for v in d.last_losses.values())
        assert 0.0 <= res["best_val_acc"] <= 1.0 and 0.0 <= res["teacher_val_acc"] <= 1.0
    # FitNet's default taps (last stages) bridge an image map to the fusion audio branch's
    assert build("fitnet", s, t).terms[1].teacher[0].path == "audio_branch.stage3"


def test_baseline_driver_shares_the_stage3_settings(one_thread):
    from crossdistill.methods.mst import baseline_distill

    t, _, s = _models()
    out = baseline_distill("crd", t, s, _av(32, 1), _av(16, 2), _av(16, 3), epochs=1,
                           batch_size=16, params={"num_negatives": 8, "kd_weight": 0.9})
    assert 0.0 <= out["results"]["test_acc"] <= 1.0
    assert set(out["student"].state_dict()) == set(s.state_dict())
