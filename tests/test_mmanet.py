"""MMANet: MAD (golden, gradient, row vs column weighting), MAR (only weak patterns count),
the complete-input teacher, weak-combination mining and a tiny end-to-end run."""

from __future__ import annotations

import math

import pytest
import torch
from av_helpers import tiny_av as _av
from torch import nn

import crossdistill as cd
from crossdistill import Distiller, Term
from crossdistill.data.dataset import Dataset
from crossdistill.errors import ConfigError
from crossdistill.losses.crossmodal import MARLoss, entropy_weights, mad, mad_loss, mar_ce
from crossdistill.losses.relations import sp
from crossdistill.methods import METHODS, build
from crossdistill.methods.mmanet import mine_weak, mmanet_distill
from crossdistill.registry import LOSSES

FS = [[1.0, 2.0], [0.0, 1.0], [2.0, -1.0]]
FT = [[0.5, 1.0], [1.0, 1.0], [-1.0, 0.0]]
ZT = [[2.0, 0.0], [0.0, 0.0], [1.0, -1.0]]  # teacher logits: sample 1 the most uncertain


def _hand_gram(f):
    """Row-normalised F F^T with plain Python."""
    g = [[sum(a * b for a, b in zip(fi, fj)) for fj in f] for fi in f]
    return [[x / math.sqrt(sum(v * v for v in row)) for x in row] for row in g]


def _hand_entropy(z):
    e = [math.exp(v) for v in z]
    p = [v / sum(e) for v in e]
    return -sum(q * math.log(q) for q in p)


def _hand_mad():
    gs, gt = _hand_gram(FS), _hand_gram(FT)
    d2 = [[(gs[i][j] - gt[i][j]) ** 2 for j in range(3)] for i in range(3)]
    h = [_hand_entropy(z) for z in ZT]
    w = [x / sum(h) for x in h]
    row = sum(w[i] * sum(d2[i]) / 3 for i in range(3))
    col = sum(d2[i][j] * w[j] for i in range(3) for j in range(3))
    return row, col, w


def t64(x, grad=False):
    return torch.tensor(x, dtype=torch.float64, requires_grad=grad)


def test_mad_golden_3x2():
    row, col, w = _hand_mad()
    assert torch.allclose(entropy_weights(t64(ZT)), t64(w))
    assert mad_loss(t64(FS), t64(FT), t64(ZT)).item() == pytest.approx(row, rel=1e-12)
    got_col = mad_loss(t64(FS), t64(FT), t64(ZT), weighting="column").item()
    assert got_col == pytest.approx(col, rel=1e-12)
    # the registered term form: student [F_s], teacher [F_t, z_t]
    assert mad([t64(FS)], [t64(FT), t64(ZT)]).item() == pytest.approx(row, rel=1e-12)


def test_mad_row_vs_column():
    row, col, _ = _hand_mad()
    # the paper weights samples (rows); the official code weights columns and sums
    assert abs(col / 3 - row) > 1e-3 * row
    # with uniform weights (equal teacher entropies) row = SP and column = B * SP
    flat = torch.zeros(3, 2, dtype=torch.float64)
    s, t = t64(FS), t64(FT)
    assert mad_loss(s, t, flat).item() == pytest.approx(sp(s, t).item(), rel=1e-12)
    assert mad_loss(s, t, flat, weighting="column").item() == pytest.approx(3 * sp(s, t).item())
    # a row's weight follows its own sample: moving only row/column 1 apart changes the
    # row form by w_1 times that row's error, and the column form by w_1 times the column's
    torch.manual_seed(0)
    fs, ft, z = torch.randn(5, 4).double(), torch.randn(5, 4).double(), torch.randn(5, 3).double()
    w = entropy_weights(z)
    from crossdistill.losses.relations import _sp_gram

    d2 = (_sp_gram(fs) - _sp_gram(ft)).pow(2)
    assert mad_loss(fs, ft, z).item() == pytest.approx(float((w * d2.mean(1)).sum()))
    assert mad_loss(fs, ft, z, weighting="column").item() == pytest.approx(
        float((w * d2.sum(0)).sum())
    )


def test_mad_gradcheck():
    torch.manual_seed(0)
    fs = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    ft, z = torch.randn(4, 5).double(), torch.randn(4, 3).double()
    for weighting in ("row", "column"):
        fn = lambda x, w=weighting: mad_loss(x, ft, z, weighting=w)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (fs,))
    # maps flatten: (B, C, H, W) student vs (B, D) teacher
    fm = torch.randn(4, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: mad_loss(x, ft, z), (fm,))


def test_mad_errors_and_registry():
    s = torch.randn(3, 2)
    with pytest.raises(ConfigError, match="mad.weighting"):
        mad_loss(s, s, s, weighting="cols")
    with pytest.raises(ConfigError, match="mad.teacher"):
        mad([s], s)
    with pytest.raises(ConfigError, match="mad.inputs"):
        mad_loss(s, s, torch.randn(4, 2))
    with pytest.raises(ConfigError, match="weighting"):
        Term("mad", student=["a"], teacher=["b", "logits"], weighting="diag")
    for name in ("mad", "mar"):
        meta = LOSSES.meta(name)
        assert "MMANet" in meta["paper"] and meta["year"] == 2023 and LOSSES.get(name).__doc__
    assert LOSSES.meta("mar")["stateful"]
    meta = METHODS.meta("mmanet")
    assert "MMANet" in meta["paper"] and meta["year"] == 2023


# -- MAR ------------------------------------------------------------------------------------


def _mar(weak=(("audio",),)):
    torch.manual_seed(0)
    return MARLoss([(6, 3), (6, 2), (6, 4)], None, modalities=["image", "audio"], weak=weak)


def test_mar_counts_only_the_matching_pattern():
    loss = _mar()
    e_img = torch.randn(6, 3, requires_grad=True)
    e_aud = torch.randn(6, 2, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    present = {  # only rows 1 and 4 are "audio only"
        "present_image": torch.tensor([1, 0, 1, 1, 0, 0]).bool(),
        "present_audio": torch.tensor([1, 1, 0, 1, 1, 0]).bool(),
    }
    # (row 5 has neither: never matches)
    got = loss([e_img, e_aud, torch.zeros(6, 4)], y=y, batch=present)
    z = loss.heads[1](e_aud)
    ce = nn.functional.cross_entropy(z, y, reduction="none")
    assert got.item() == pytest.approx(float((ce[1] + ce[4]).detach() / 6))
    got.backward()
    assert e_img.grad.abs().sum() == 0  # the image head never counts for audio-only rows
    rows = e_aud.grad.abs().sum(1)
    assert rows[1] > 0 and rows[4] > 0 and rows[[0, 2, 3, 5]].sum() == 0
    # a combination of both modalities: every present head of the matching rows counts
    both = _mar(weak=[["image", "audio"]])
    got = both([e_img, e_aud, torch.zeros(6, 4)], y=y, batch=present)
    ce_i = nn.functional.cross_entropy(both.heads[0](e_img), y, reduction="none")
    ce_a = nn.functional.cross_entropy(both.heads[1](e_aud), y, reduction="none")
    assert got.item() == pytest.approx(float((ce_i[[0, 3]] + ce_a[[0, 3]]).sum().detach() / 6))


def test_mar_presence_from_zero_inputs_and_labels():
    # without present_<key> the pattern is read from all-zero inputs
    image, audio = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    image[2] = 0
    logits = [torch.randn(4, 3), torch.randn(4, 3)]
    y = torch.tensor([0, 1, 2, -100])
    present = torch.tensor([[1, 1], [1, 1], [0, 1], [1, 1]]).bool()
    weak = torch.tensor([[False, True]])
    from crossdistill.losses.crossmodal import _presence

    assert torch.equal(_presence({"image": image, "audio": audio}, ["image", "audio"], "f"),
                       present)
    ce = nn.functional.cross_entropy(logits[1], y.clamp_min(0), reduction="none")
    assert mar_ce(logits, y, present, weak).item() == pytest.approx(float(ce[2] / 3))
    with pytest.raises(ConfigError, match="mar.modalities"):
        _presence({"image": image}, ["image", "audio"], "mar.modalities")


def test_mar_errors():
    with pytest.raises(ConfigError, match="mar.weak"):
        _mar(weak=[["depth"]])
    with pytest.raises(ConfigError, match="mar.weak"):
        _mar(weak=[])
    with pytest.raises(ConfigError, match="mar.student"):
        MARLoss([(6, 3), (6, 4)], None, modalities=["image", "audio"], weak=[["audio"]])


def test_term_begin_switches_on():
    t = Term("ce", begin=2.0, weight=0.5)
    assert t.weight_at(0.0) == 0.0 and t.weight_at(1.99) == 0.0 and t.weight_at(2.0) == 0.5
    ramp = Term("ce", begin=2.0, warmup=2.0, weight=1.0)  # the warm-up starts at begin
    assert ramp.weight_at(3.0) == 0.5 and ramp.weight_at(4.0) == 1.0
    with pytest.raises(ConfigError, match="begin"):
        Term("ce", begin=-1.0)


# -- the complete-input teacher, mining ----------------------------------------------------


class Record(nn.Module):
    """Logits = a + b (4 classes), remembering what it was fed."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.seen = []

    def forward(self, a, b):
        self.seen.append((a.detach().clone(), b.detach().clone()))
        return self.w * (a + b)


def _votes(n=40):
    y = torch.arange(n) % 4
    a = nn.functional.one_hot(y, 4).float()
    b = nn.functional.one_hot(torch.zeros_like(y), 4).float() * 0.5  # b alone: always 0
    return Dataset({"a": a, "b": b, "y": y}, {"a": "value", "b": "value", "y": "label"})


def test_teacher_sees_the_complete_batch():
    student, teacher = Record(), Record()
    d = Distiller(
        student, teacher, [Term("ce"), Term("kd")], io={"inputs": ["a", "b"]},
        teacher_io={"inputs": ["a", "b"]},
        prepare=[{"name": "modality_dropout", "keys": ["a", "b"], "rate": 1.0,
                  "teacher": "complete"}],
    )
    data = _votes(8)
    batch = data.batch(torch.arange(8))
    d.train()
    student.seen.clear()
    teacher.seen.clear()
    out = d(batch)
    sa, sb = student.seen[-1]
    ta, tb = teacher.seen[-1]
    # rate 1: the student keeps exactly one input per sample; the teacher sees both
    assert ((sa.abs().sum(1) > 0) ^ (sb.abs().sum(1) > 0)).all()
    assert torch.equal(ta, batch["a"]) and torch.equal(tb, batch["b"])
    assert "present_a" in out.batch and math.isfinite(out.total.item())


def test_mine_weak_finds_the_bad_combination():
    model = Record()
    assert mine_weak(model, _votes(), modalities=["a", "b"]) == [["b"]]
    assert mine_weak(model, _votes(), modalities=["a", "b"], criterion="kl") == [["b"]]
    with pytest.raises(ConfigError, match="mmanet.criterion"):
        mine_weak(model, _votes(), modalities=["a", "b"], criterion="f1")
    with pytest.raises(ConfigError, match="mmanet.modalities"):
        mine_weak(model, _votes(), modalities=["a"])


# -- recipe and end to end --------------------------------------------------------------------




def _fusion(seed):
    torch.manual_seed(seed)
    return cd.models.create("fusion", num_classes=4, img_size=8, audio_size=(6, 10), width=4,
                            dim=8)


def test_recipe_terms_and_errors():
    s, t = _fusion(0), _fusion(1)
    r = build("mmanet", s, t, weak=[["audio"]])
    assert [x.loss for x in r.terms] == ["ce", "mad", "mar"]
    assert [str(x) for x in r.terms[1].teacher] == ["fc:input", "logits"]
    assert [str(x) for x in r.terms[2].student] == ["image_branch", "audio_branch", "logits"]
    assert r.terms[1].weight_at(0.5) == 0.0 and r.terms[1].weight_at(1.0) == 1.0
    sp_r = build("mmanet", s, t, relation="sp", mar_weight=0)
    assert [x.loss for x in sp_r.terms] == ["ce", "sp"]
    with pytest.raises(ConfigError, match="method.weak"):
        build("mmanet", s, t)
    with pytest.raises(ConfigError, match="method.relation"):
        build("mmanet", s, t, relation="rkd", mar_weight=0)
    with pytest.raises(ConfigError, match="method.teacher"):
        build("mmanet", s, None, weak=[["audio"]])


def test_mmanet_end_to_end_with_dropout_and_views(one_thread):
    tr, va, te = _av(48, 1), _av(24, 2), _av(24, 3)
    teacher, student = _fusion(1), _fusion(0)
    views = {"image_only": ["audio"], "audio_only": ["image"]}
    out = mmanet_distill(teacher, student, tr, va, te, epochs=2, batch_size=16, views=views,
                         weak=[["audio"]], begin_epoch=1)
    res, d = out["results"], out["distiller"]
    losses = d.last_losses
    assert set(losses) == {"ce", "mad", "mar"}
    assert all(math.isfinite(float(v)) for v in losses.values())
    for k in ("test_acc", "test_image_only_acc", "test_audio_only_acc"):
        assert 0.0 <= res[k] <= 1.0, k
    # the MAR heads live in the loss: the exported student is the plain fusion model
    assert set(out["student"].state_dict()) == set(_fusion(0).state_dict())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in out["student"].modules())
    # the baseline: CE + the same dropout, no teacher
    base = mmanet_distill(teacher, _fusion(0), tr, va, te, method="scratch", epochs=1,
                          batch_size=16, views=views)
    assert 0.0 <= base["results"]["test_image_only_acc"] <= 1.0
