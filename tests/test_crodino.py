"""CroDiNo-KD: the disentangling losses (golden values, gradients), the co-training recipe
end to end on tiny image + audio tensors, decoupled augmentation, and the fusion-teacher
KD / FitNet baselines it is compared with."""

import math

import pytest
import torch
import torch.nn.functional as F
from av_helpers import tiny_av as _av

import crossdistill as cd
from crossdistill import Distiller, Trainer
from crossdistill.errors import ConfigError
from crossdistill.losses.disentangle import (
    CroDiNoLoss,
    cross_correlation,
    info_nce,
    orthogonality,
)
from crossdistill.methods import METHODS, build
from crossdistill.methods.collaborative import BestMembers
from crossdistill.methods.crodino import DecoupledAugment, shift
from crossdistill.methods.members import Members

FAST = dict(batch_size=16, lr=3e-3, optimizer="adamw", progress=False)




def _group():
    torch.manual_seed(0)
    image = cd.models.create("cnn", num_classes=4, in_channels=1, img_size=8, channels=(4, 8))
    audio = cd.models.create("audio-cnn", num_classes=4, img_size=(6, 10), channels=(8, 8))
    return Members({"image": image, "audio": audio}, reads={"image": "image", "audio": "audio"})


# -- losses: golden values --------------------------------------------------------------
def test_info_nce_golden():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    tau = 0.5
    # cosines: a0.b0 = 1, a0.b1 = 1/sqrt2, a1.b0 = 0, a1.b1 = 1/sqrt2
    r = 1 / math.sqrt(2)
    row0 = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(r / tau)))
    row1 = -math.log(math.exp(r / tau) / (math.exp(0.0) + math.exp(r / tau)))
    col0 = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(0.0)))
    col1 = -math.log(math.exp(r / tau) / (math.exp(r / tau) + math.exp(r / tau)))
    got = info_nce([a, b], temperature=tau)
    want = torch.tensor([(row0 + col0) / 2, (row1 + col1) / 2])
    assert torch.allclose(got, want, atol=1e-6)
    one_way = info_nce([a, b], temperature=tau, symmetric=False)
    assert torch.allclose(one_way, torch.tensor([row0, row1]), atol=1e-6)
    # a teacher tap is a constant
    s = a.clone().requires_grad_()
    t = b.clone().requires_grad_()
    info_nce(s, t).sum().backward()
    assert s.grad is not None and t.grad is None
    # leading dims: (B, P, D) contrasts all B*P positions, returns (B, P)
    assert info_nce([torch.randn(2, 3, 4), torch.randn(2, 3, 4)]).shape == (2, 3)


def test_orthogonality_and_cross_correlation_golden():
    sh = torch.tensor([[1.0, 2.0], [3.0, 0.0], [-1.0, 1.0]])
    pr = torch.tensor([[0.0, 1.0, 1.0], [2.0, 0.0, 1.0], [1.0, 1.0, -2.0]])
    n = 3
    # orthogonality, by hand: centre columns, unit rows, mean of squares of Z_s^T Z_p / N
    zs = sh - sh.mean(0)
    zs = zs / zs.norm(dim=1, keepdim=True)
    zp = pr - pr.mean(0)
    zp = zp / zp.norm(dim=1, keepdim=True)
    want = sum(
        (sum(zs[k, i] * zp[k, j] for k in range(n)) / n) ** 2 for i in range(2) for j in range(3)
    ) / 6
    assert torch.allclose(orthogonality([sh, pr]), want, atol=1e-6)
    # cross-correlation = mean squared Pearson correlation between the columns
    want = 0.0
    for i in range(2):
        for j in range(3):
            r = torch.corrcoef(torch.stack([sh[:, i], pr[:, j]]))[0, 1]
            want += float(r) ** 2 / 6
    assert abs(float(cross_correlation([sh, pr], eps=0.0)) - want) < 1e-5
    # decorrelated parts score 0; identical parts score high
    x = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]])
    z = torch.tensor([[1.0], [1.0], [-1.0], [-1.0]])
    assert float(cross_correlation([x, z])) < 1e-8 and float(orthogonality([x, z])) < 1e-8
    assert float(cross_correlation([x, x])) > 0.99


def test_gradcheck():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    p = torch.randn(4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: info_nce([x, y], temperature=0.5), (a, b))
    assert torch.autograd.gradcheck(lambda x, y: orthogonality([x, y]), (a, p))
    assert torch.autograd.gradcheck(lambda x, y: cross_correlation([x, y]), (a, p))


def test_loss_errors_name_the_field():
    with pytest.raises(ConfigError, match="info_nce.inputs"):
        info_nce([torch.randn(3, 2), torch.randn(3, 4)])
    with pytest.raises(ConfigError, match="cross_correlation.inputs"):
        cross_correlation([torch.randn(1, 2), torch.randn(1, 2)])
    with pytest.raises(ConfigError, match="crodino.split"):
        CroDiNoLoss([(2, 8), (2, 8)], split="halves")
    with pytest.raises(ConfigError, match="crodino.disentangle"):
        CroDiNoLoss([(2, 8), (2, 8)], disentangle="mi")
    with pytest.raises(ConfigError, match="crodino.shared_dim"):
        CroDiNoLoss([(2, 8), (2, 8)], split="channels", shared_dim=8)
    with pytest.raises(ConfigError, match="crodino.student"):
        CroDiNoLoss([(2, 8)])


def test_crodino_loss_is_the_sum_of_its_parts():
    torch.manual_seed(0)
    mod = CroDiNoLoss([(6, 5), (6, 7)], shared_dim=3, private_dim=2, temperature=0.2,
                      nce_weight=0.5, disentangle_weight=2.0)
    e1, e2 = torch.randn(6, 5), torch.randn(6, 7)
    (s1, p1), (s2, p2) = mod.parts(0, e1), mod.parts(1, e2)
    assert s1.shape == (6, 3) and p2.shape == (6, 2)
    want = 0.5 * info_nce([s1, s2], temperature=0.2).mean() + 2.0 * (
        cross_correlation([s1, p1]) + cross_correlation([s2, p2])
    ) / 2
    assert torch.allclose(mod([e1, e2]), want, atol=1e-6)
    ch = CroDiNoLoss([(6, 5), (6, 7)], shared_dim=3, split="channels", disentangle="orthogonal")
    assert len(list(ch.parameters())) == 0
    s, p = ch.parts(1, e2)
    assert torch.equal(s, e2[:, :3]) and torch.equal(p, e2[:, 3:])


# -- decoupled augmentation --------------------------------------------------------------
def test_shift_golden_and_decoupled_draws():
    x = torch.arange(16.0).view(1, 1, 4, 4)

    g = torch.Generator().manual_seed(0)
    out = shift(x, 1, 1, g)
    g = torch.Generator().manual_seed(0)
    dy = torch.randint(0, 3, (1,), generator=g)
    dx = torch.randint(0, 3, (1,), generator=g)
    want = F.pad(x, (1, 1, 1, 1))[..., int(dy):int(dy) + 4, int(dx):int(dx) + 4]
    assert torch.equal(out, want)
    assert torch.equal(shift(x, 0, 0, g), x)

    class State:
        generator = torch.Generator().manual_seed(3)

    batch = {"image": torch.randn(64, 1, 8, 8), "audio": torch.randn(64, 1, 6, 10)}
    aug = DecoupledAugment({"image": [2, 2], "audio": [0, 3]})
    out = aug({k: v.clone() for k, v in batch.items()}, State())
    assert out["image"].shape == (64, 1, 8, 8) and out["audio"].shape == (64, 1, 6, 10)
    moved_img = (out["image"] != batch["image"]).flatten(1).any(1)
    moved_aud = (out["audio"] != batch["audio"]).flatten(1).any(1)
    assert moved_img.any() and moved_aud.any()
    assert not torch.equal(moved_img, moved_aud)  # independent draws per modality
    with pytest.raises(ConfigError, match="prepare.shifts.audio"):
        DecoupledAugment({"audio": [0, -1]})
    with pytest.raises(ConfigError, match="prepare.shifts"):
        aug({"image": batch["image"]}, State())


# -- the recipe ---------------------------------------------------------------------------
def test_registered_and_recipe_errors():
    meta = METHODS.meta("crodino")
    assert meta["paper"].startswith("Revisiting Cross-Modal") and meta["year"] == 2025
    g = _group()
    with pytest.raises(ConfigError, match="method.student"):
        build("crodino", g["image"], None)
    with pytest.raises(ConfigError, match="method.teacher"):
        build("crodino", g, g["image"])
    with pytest.raises(ConfigError, match="crodino.taps"):
        build("crodino", g, None, taps={"depth": "fc:input"})
    recipe = build("crodino", g, None, shared_dim=4)
    assert [t.name for t in recipe.terms] == ["ce_image", "ce_audio", "crodino"]
    assert [str(x) for x in recipe.terms[-1].student] == ["image.fc:input", "audio.fc:input"]


@pytest.mark.parametrize("split", ["head", "channels"])
def test_crodino_end_to_end(split):
    g = _group()
    recipe = build("crodino", g, None, shared_dim=4, split=split, temperature=0.2)
    d = Distiller(g, None, recipe.terms, io=g.io(),
                  prepare=[DecoupledAugment({"image": [1, 1], "audio": [0, 2]})])
    train, val = _av(64, 1), _av(32, 2)
    keep = BestMembers(g, val)
    res = Trainer(d, train, val, epochs=2, callbacks=[keep], **FAST).fit()
    assert all(math.isfinite(float(v)) for v in d.last_losses.values())
    assert set(d.last_losses) == {"ce_image", "ce_audio", "crodino"}
    assert 0.0 <= res["best_val_acc"] <= 1.0
    keep.restore()
    for name in g.names:  # each unimodal network runs alone at test
        acc = cd.evaluate(g[name], val, io=g.member_io(name))["acc"]
        assert 0.0 <= acc <= 1.0
    heads = [k for k in d.trainable_state() if k.startswith("loss_modules.crodino.heads")]
    assert bool(heads) == (split == "head")
    exported = d.export()
    assert set(exported.state_dict()) == set(g.state_dict())
    # members stay plain zoo models: same keys as a fresh one
    fresh = cd.models.create("cnn", num_classes=4, in_channels=1, img_size=8, channels=(4, 8))
    assert set(exported["image"].state_dict()) == set(fresh.state_dict())


def test_crodino_aligns_shared_parts():
    """A few steps of the alignment term alone raise the paired shared parts' similarity."""
    g = _group()
    recipe = build("crodino", g, None, shared_dim=4, disentangle_weight=0.0)
    d = Distiller(g, None, recipe.terms[-1:], io=g.io())
    data = _av(64, 1)
    batch = {k: data.tensors[k] for k in ("image", "audio", "y")}
    d.build(batch)
    mod = d.loss_modules["crodino"]
    d.eval()
    with torch.no_grad():
        before = float(d(batch).losses["crodino"])
    Trainer(d, data, None, epochs=6, **FAST).fit()
    d.eval()
    with torch.no_grad():
        after = float(d(batch).losses["crodino"])
    assert math.isfinite(mod.last["nce"]) and after < before


# -- the claim's baselines: fusion teacher -> image student ---------------------------------
@pytest.mark.parametrize("method", ["kd", "fitnet"])
def test_fusion_teacher_to_image_student_baselines(method):
    torch.manual_seed(0)
    teacher = cd.models.create("fusion", num_classes=4, image_size=8, audio_size=(6, 10),
                               width=4, dim=8)
    student = cd.models.create("cnn", num_classes=4, in_channels=1, img_size=8, channels=(4, 8))
    params = {"student_tap": "fc:input", "teacher_tap": "fc:input"} if method == "fitnet" else {}
    recipe = build(method, student, teacher, **params)
    d = Distiller(student, teacher, recipe.terms, io={"inputs": ["image"]},
                  teacher_io={"inputs": ["image", "audio"]})
    res = Trainer(d, _av(64, 1), _av(32, 2), epochs=1, **FAST).fit()
    assert all(math.isfinite(float(v)) for v in d.last_losses.values())
    assert 0.0 <= res["best_val_acc"] <= 1.0
    assert set(d.export().state_dict()) == set(student.state_dict())
