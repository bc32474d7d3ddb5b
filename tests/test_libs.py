"""LIBS: LCS alignment, edit distance, the context- and frame-level losses, the digit-string
data, the seq2seq models, the CER task and a tiny end-to-end (teacher, then LIBS)."""

from __future__ import annotations

import math

import pytest
import torch

import crossdistill as cd
from crossdistill.data.av_seq import EOS
from crossdistill.errors import ConfigError
from crossdistill.losses.libs import (
    LIBSContextLoss,
    LIBSFrameLoss,
    attend,
    context_pairs,
    lcs_pairs,
    masked_frame_mse,
)
from crossdistill.methods import build
from crossdistill.models.seq import seq_io
from crossdistill.tasks.cer import ErrorRate, edit_distance

P = -100


# -- alignment and edit distance -------------------------------------------------------------
def test_lcs_pairs_golden():
    # hyp 1 2 3 4 vs ref 1 3 4 5: LCS 1 3 4 at hyp 0, 2, 3 and ref 0, 1, 2
    assert lcs_pairs([1, 2, 3, 4], [1, 3, 4, 5]) == [(0, 0), (2, 1), (3, 2)]
    # 1 1 2 vs 1 2 1: length 2; heads match, then the tie skips hyp's second 1
    assert lcs_pairs([1, 1, 2], [1, 2, 1]) == [(0, 0), (2, 1)]
    assert lcs_pairs([7, 8], [1, 2]) == []
    assert lcs_pairs([], [1]) == [] and lcs_pairs([3], [3]) == [(0, 0)]
    # teacher dropped a digit: every remaining step pairs with its ground-truth position
    assert lcs_pairs([5, 9], [5, 2, 9]) == [(0, 0), (1, 2)]


def test_edit_distance_golden():
    assert edit_distance(list("kitten"), list("sitting")) == 3
    assert edit_distance([1, 2, 3], []) == 3 and edit_distance([], []) == 0
    assert edit_distance([1, 2, 3], [1, 3]) == 1  # one deletion
    assert edit_distance([1, 2], [2, 1]) == 2  # two substitutions
    assert edit_distance([4], [4, 4, 4]) == 2  # two insertions


def test_context_pairs_lcs_vs_all():
    pred = torch.tensor([[5, 9, P, P, P], [1, 2, 3, P, P]])
    y = torch.tensor([[5, 2, 9, EOS, P], [1, 3, EOS, P, P]])
    b, t, s = context_pairs(pred, y, EOS, "lcs")
    assert list(zip(b.tolist(), t.tolist(), s.tolist())) == [(0, 0, 0), (0, 1, 2),
                                                             (1, 0, 0), (1, 2, 1)]
    b, t, s = context_pairs(pred, y, EOS, "all")  # positional, teacher errors included
    assert list(zip(b.tolist(), t.tolist(), s.tolist())) == [(0, 0, 0), (0, 1, 1),
                                                             (1, 0, 0), (1, 1, 1)]


# -- context level ----------------------------------------------------------------------------
def test_context_loss_golden():
    c_s = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]])  # (1, 3 steps, 2)
    c_t = torch.tensor([[[1.0, 1.0], [3.0, 0.0], [9.0, 9.0]]])
    pred = torch.tensor([[4, 6, P]])  # the teacher says 4 6; the truth is 4 5 6
    y = torch.tensor([[4, 5, 6, EOS]])
    mod = LIBSContextLoss([(1, 3, 2)], [(1, 3, 2), (1, 3)])
    with torch.no_grad():
        mod.proj.weight.copy_(torch.eye(2))
        mod.proj.bias.zero_()
    # pairs: teacher step 0 <-> student step 0, teacher step 1 <-> student step 2
    want = (((1 - 1) ** 2 + (0 - 1) ** 2) / 2 + ((2 - 3) ** 2 + (2 - 0) ** 2) / 2) / 2
    assert mod([c_s], [c_t, pred], y=y).item() == pytest.approx(want)
    # nothing matched: 0, with a gradient path
    zero = mod([c_s], [c_t, torch.tensor([[7, P, P]])], y=y)
    assert zero.item() == 0.0 and zero.requires_grad
    with pytest.raises(ConfigError, match="libs_context.align"):
        LIBSContextLoss([(1, 3, 2)], [(1, 3, 2), (1, 3)], align="some")


# -- frame level ------------------------------------------------------------------------------
def test_frame_loss_golden_and_masks():
    torch.manual_seed(0)
    mod = LIBSFrameLoss([(2, 4, 3), (2,)], [(2, 5, 3), (2,)])
    with torch.no_grad():
        mod.proj.weight.copy_(torch.eye(3))
        mod.proj.bias.zero_()
    h_v, h_a = torch.randn(2, 4, 3), torch.randn(2, 5, 3)
    v_len, a_len = torch.tensor([4, 2]), torch.tensor([1, 1])
    # one valid audio frame: every video state's aligned feature is that frame
    per = [((h_v[b, i] - h_a[b, 0]) ** 2).mean() for b in range(2) for i in range(v_len[b])]
    want = sum(per) / len(per)
    got = mod([h_v, v_len], [h_a, a_len])
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    # padding (past the lengths) changes nothing
    h_v2, h_a2 = h_v.clone(), h_a.clone()
    h_v2[1, 2:] += 100.0
    h_a2[:, 1:] -= 50.0
    assert mod([h_v2, v_len], [h_a2, a_len]).item() == pytest.approx(got.item(), rel=1e-5)


def test_attend_golden():
    q = torch.tensor([[[1.0, 0.0]]])
    k = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    v = torch.tensor([[[2.0], [4.0], [100.0]]])
    w = torch.tensor([math.exp(1 / math.sqrt(2)), 1.0])
    want = (w[0] * 2 + w[1] * 4) / w.sum()
    got = attend(q, k, v, torch.tensor([[True, True, False]]))
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_frame_loss_gradcheck():
    torch.manual_seed(0)
    q = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 5, 2, dtype=torch.float64, requires_grad=True)
    p = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    km = torch.tensor([[True] * 5, [True, True, False, False, False]])
    qm = torch.tensor([[True] * 3, [True, False, False]])
    assert torch.autograd.gradcheck(
        lambda q, k, v, p: masked_frame_mse(p, attend(q, k, v, km), qm), (q, k, v, p))
    mod = LIBSFrameLoss([(2, 3, 4), (2,)], [(2, 5, 2), (2,)]).double()
    h_a = torch.randn(2, 5, 2, dtype=torch.float64)
    lens = torch.tensor([3, 1]), torch.tensor([5, 2])
    h_v = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h: mod([h, lens[0]], [h_a, lens[1]]), (h_v,))


# -- data -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def strings():
    n = {"train": 64, "val": 24, "test": 24}
    return [cd.data.load_split("av_seq", s, n=n) for s in ("train", "val", "test")]


def test_data_shapes_and_content(strings):
    tr, va, _ = strings
    assert len(tr) == 64 and len(va) == 24
    assert tr["audio"].shape[0] == 64 and tr["audio"].shape[2] == 40
    assert tr["video"].shape[2] == 28 and tr["text"].shape == (64, 4)
    assert tr["labels"].shape == (64, 5)
    L = tr["text_len"]
    assert ((L >= 2) & (L <= 4)).all()
    assert torch.equal(tr["video_len"], 28 * L)
    assert (tr["audio_len"] <= tr["audio"].shape[1]).all() and (tr["audio_len"] > 0).all()
    for i in range(64):
        n = int(L[i])
        assert tr["labels"][i, n] == EOS and (tr["labels"][i, n + 1:] == P).all()
        assert torch.equal(tr["labels"][i, :n], tr["text"][i, :n])
        assert (tr["text"][i, n:] == P).all()
        assert (tr["video"][i, 28 * n:] == 0).all()
    # a video frame is an image column: the first digit's image read left to right
    mnist = cd.data.load("mnist", "train")
    k = int((mnist.idx == tr["image_ids"][0, 0]).nonzero())
    assert torch.equal(tr["video"][0, :28], mnist.x[k, 0].T)
    assert mnist.y[k] == tr["text"][0, 0]
    # seeded
    again = cd.data.load_split("av_seq", "train", n={"train": 64})
    assert torch.equal(again["audio"], tr["audio"]) and torch.equal(again["text"], tr["text"])


def test_video_noise_degrades_only_the_video(strings):
    tr = strings[0]
    noisy = cd.data.load_split("av_seq", "train", n={"train": 64}, video_noise=1.5)
    assert torch.equal(noisy["audio"], tr["audio"]) and torch.equal(noisy["text"], tr["text"])
    valid = torch.arange(tr["video"].shape[1])[None] < tr["video_len"][:, None]
    diff = (noisy["video"] - tr["video"])[valid]
    assert 1.4 < float(diff.std()) < 1.6 and (noisy["video"][~valid] == 0).all()  # pads stay 0
    again = cd.data.load_split("av_seq", "train", n={"train": 64}, video_noise=1.5)
    assert torch.equal(again["video"], noisy["video"])  # seeded
    with pytest.raises(ConfigError, match="data.video_noise"):
        cd.data.load_split("av_seq", "val", n=8, video_noise=-1.0)


def test_data_no_leakage(strings):
    ids = {}
    for d in strings:
        ids[d.split] = ({int(v) for v in d["clip_ids"].flatten() if v >= 0},
                        {int(v) for v in d["image_ids"].flatten() if v >= 0},
                        set(d.info["speakers"]))
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        for part in range(3):
            assert not ids[a][part] & ids[b][part], (a, b, part)
    with pytest.raises(ConfigError, match="data.max_len"):
        cd.data.load_split("av_seq", "val", min_len=3, max_len=2)


# -- models and task --------------------------------------------------------------------------
def test_seq2seq_outputs_and_padding():
    torch.manual_seed(0)
    m = cd.models.create("seq2seq", in_features=6, hidden=8).eval()
    x, lens = torch.randn(2, 9, 6), torch.tensor([9, 5])
    labels = torch.tensor([[1, 2, EOS, P, P], [3, EOS, P, P, P]])
    out = m(x, lens, labels)
    assert out["logits"].shape == (2, 5, 11) and out["context"].shape == (2, 5, 8)
    assert out["encoder"].shape == (2, 5, 8) and out["encoder_len"].tolist() == [5, 3]
    assert out["pred"].shape == (2, 5) and out["pred_context"].shape == (2, 5, 8)
    x2 = x.clone()
    x2[1, 5:] = 50.0  # padding frames do not reach any state of sample 1
    out2 = m(x2, lens, labels)
    assert torch.allclose(out2["logits"][1], out["logits"][1], atol=1e-5)
    assert torch.allclose(out2["encoder"][1, :3], out["encoder"][1, :3], atol=1e-5)
    m.train()
    assert "pred" not in m(x, lens, labels)  # no decoding in training


def test_cer_task_golden():
    task = ErrorRate()
    y = torch.tensor([[1, 2, 3, EOS, P], [4, 5, EOS, P, P]])
    pred = torch.tensor([[1, 3, P, P, P], [4, 5, 6, P, P]])  # 1 deletion, 1 insertion
    logits = torch.zeros(2, 5, 11)
    sums: dict = {}
    task.update(sums, logits, {"labels": y}, keep=torch.tensor([True, True]),
                out={"logits": logits, "pred": pred})
    res = task.compute({k: float(v) for k, v in sums.items()})
    assert res["cer"] == pytest.approx(2 / 5) and res["ser"] == 1.0 and res["n"] == 2
    assert res["loss"] == pytest.approx(math.log(11))
    sums = {}
    task.update(sums, logits, {"labels": y}, keep=torch.tensor([True, False]),
                out={"pred": pred})
    assert task.compute({k: float(v) for k, v in sums.items()})["cer"] == pytest.approx(1 / 3)


# -- end to end -------------------------------------------------------------------------------
def test_libs_end_to_end(strings, tmp_path):
    tr, va, te = strings
    kw = dict(batch_size=16, lr=3e-3, optimizer="adamw", progress=False, seed=0, epochs=1)
    torch.manual_seed(0)
    teacher = cd.models.create("seq2seq", in_features=40, hidden=16)
    d = cd.Distiller(teacher, None, [cd.Term("ce")], task="cer", io=seq_io("audio"))
    res = cd.Trainer(d, tr, va, te, **kw).fit()
    assert res["test_cer"] >= 0.0 and math.isfinite(res["test_loss"])
    for params in ({}, {"context_align": "all"}):
        torch.manual_seed(1)
        student = cd.models.create("seq2seq", in_features=28, hidden=16)
        r = build("libs", student, teacher, **params)
        assert [t.name for t in r.terms] == ["ce", "libs_seq", "libs_context", "libs_frame"]
        d = cd.Distiller(student, teacher, r.terms, task="cer", io=seq_io("video"),
                         teacher_io=seq_io("audio"))
        t = cd.Trainer(d, tr, va, te, out_dir=tmp_path / str(len(params)), **kw)
        res = t.fit()
        assert 0.0 <= res["test_cer"] < float("inf") and "teacher_val_cer" in res
        row = t.log.rows[-1]
        for k in ("loss_ce", "loss_libs_seq", "loss_libs_context", "loss_libs_frame"):
            assert math.isfinite(row[k])
        out = d.export()  # the clean student, no loss heads
        assert set(out.state_dict()) == set(student.state_dict())
    with pytest.raises(ConfigError, match="method.teacher"):
        build("libs", student, None)
