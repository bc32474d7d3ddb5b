"""Cross-tokenizer KD: the shakespeare_pair source and the uld / uld_hybrid / mined / alm losses."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import crossdistill as cd
from crossdistill.context import Context
from crossdistill.data.text_pair import shakespeare_pair_split
from crossdistill.data.text_source import shakespeare_split
from crossdistill.errors import ConfigError
from crossdistill.losses.crosstok import (
    MinEDLoss,
    ULDHybridLoss,
    _sorted_l1,
    alm,
    alm_chunks,
    binarised_ce,
    mined_map,
    mined_positions,
    uld,
)
from crossdistill.text import train_char
from crossdistill.text.align import vocab_bytes

MAX = 12_000  # characters of tiny Shakespeare: tokenizers train in well under a second


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def pair(cache):
    return shakespeare_pair_split("train", tokenizer="char", teacher_tokenizer="bpe",
                                  teacher_vocab_size=300, block=32, max_chars=MAX,
                                  cache_dir=cache)


class Paired:
    """A stand-in training Dataset: just the two tokenizers a stateful loss reads."""

    def __init__(self, student_text="ab", teacher_text="abc"):
        self.tokenizer, self.teacher_tokenizer = train_char(student_text), train_char(teacher_text)
        self.info = {}


# -- the data source ------------------------------------------------------------------------


def test_student_side_is_the_shakespeare_source(pair, cache):
    ref = shakespeare_split("train", tokenizer="char", block=32, max_chars=MAX, cache_dir=cache)
    for k in ("input_ids", "labels", "token_bytes", "attention_mask", "idx"):
        assert torch.equal(pair[k], ref[k]), k
    assert pair.info["tokenizer"] == ref.info["tokenizer"]  # same train-split tokenizer
    t_ref = shakespeare_split("train", tokenizer="bpe", vocab_size=300, block=32,
                              max_chars=MAX, cache_dir=cache)
    assert pair.info["teacher_tokenizer"] == t_ref.info["tokenizer"]  # a bpe teacher's own
    assert pair.num_classes == len(pair.tokenizer)


def _label_bytes(vocab, ids, chunk, k):
    return b"".join(vocab[int(i)] for i, c in zip(ids, chunk) if c == k)


@pytest.mark.parametrize("teacher_block", [None, 9])
def test_teacher_reads_its_own_tokens_and_chunks_cover_the_same_bytes(cache, teacher_block):
    data = shakespeare_pair_split("train", tokenizer="char", teacher_tokenizer="bpe",
                                  teacher_vocab_size=300, block=32, max_chars=MAX,
                                  cache_dir=cache, teacher_block=teacher_block)
    tok_s, tok_t = data.tokenizer, data.teacher_tokenizer
    vs, vt = vocab_bytes(tok_s), vocab_bytes(tok_t)
    for r in (0, 1, len(data) // 2, len(data) - 1):
        att = data["teacher_attention_mask"][r].bool()
        t_ids = data["teacher_input_ids"][r][att]
        t_lab = data["teacher_labels"][r][att]
        s_lab = data["labels"][r][data["labels"][r] >= 0]
        s_win = tok_s.decode(data["input_ids"][r][:1]) + tok_s.decode(s_lab)
        t_win = tok_t.decode(t_ids[:1]) + tok_t.decode(t_lab)
        # the same text: the teacher's window covers the student's (or, when cut, lies in it)
        assert tok_s.decode(s_lab) in t_win or tok_t.decode(t_lab) in s_win
        head = slice(0, len(t_ids))
        assert not torch.equal(data["teacher_input_ids"][r][head], data["input_ids"][r][head])
        c_s, c_t = data["chunk_s"][r], data["chunk_t"][r]
        assert (c_t[~att] == -1).all() and (data["teacher_labels"][r][~att] == -100).all()
        nb = [len(vt[int(i)]) for i in t_lab]
        assert data["teacher_token_bytes"][r][att].tolist() == nb
        n = int(c_s.max()) + 1
        assert n == int(c_t.max()) + 1 and n > 3
        for k in range(n):
            a = _label_bytes(vs, data["labels"][r], c_s, k)
            b = _label_bytes(vt, data["teacher_labels"][r], c_t, k)
            assert a == b and a, (r, k)
    if teacher_block:
        assert data["teacher_input_ids"].shape[1] == 9
        assert (data["chunk_s"] == -1).float().mean() > 0.3  # beyond the teacher's cut
    else:
        assert data.info["teacher_block"] == data.info["teacher_block_needed"]


def test_pair_source_errors(cache):
    with pytest.raises(ConfigError, match="teacher_tokenizer"):
        shakespeare_pair_split("train", teacher_tokenizer="wordpiece", max_chars=MAX,
                               cache_dir=cache)
    with pytest.raises(ConfigError, match="teacher_block"):
        shakespeare_pair_split("train", teacher_block=0, max_chars=MAX, cache_dir=cache)
    assert "shakespeare_pair" in cd.DATASETS


# -- golden values by hand ------------------------------------------------------------------


def _logits(*rows):
    return torch.log(torch.tensor(rows, dtype=torch.float64)).unsqueeze(0)


def test_uld_golden_positional_pairs():
    s = _logits([0.7, 0.2, 0.1], [0.3, 0.3, 0.4], [0.1, 0.1, 0.8])
    t = _logits([0.5, 0.5], [0.9, 0.1])
    y = torch.tensor([[1, -100, 2]])  # scored student positions 0 and 2
    batch = {"teacher_labels": torch.tensor([[0, 1]])}
    # k=0: sorted [.7 .2 .1] vs [.5 .5 0] -> .2+.3+.1; k=1: [.8 .1 .1] vs [.9 .1 0] -> .1+0+.1
    out = uld(s, t, y=y, batch=batch)
    assert out.shape == (1,)
    assert out.item() == pytest.approx((0.6 + 0.2) / 2)
    assert cd.LOSSES.meta("uld")["default_weight"] == 1.5  # the paper's 1 * CE + 1.5 * ULD
    # fewer teacher tokens: only k < min(n_s, n_t) pairs count
    one = uld(s, t, y=y, batch={"teacher_labels": torch.tensor([[0, -100]])})
    assert one.item() == pytest.approx(0.6)


@pytest.mark.parametrize("vq, vp", [(7, 29), (29, 7), (13, 13)])
def test_sorted_l1_topk_equals_the_padded_sort(vq, vp):
    """The top-k form equals the definition (both sides sorted, the smaller zero-padded), in
    value and gradient, whichever side is larger."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 5, vq, generator=g, dtype=torch.float64).softmax(-1).requires_grad_()
    p = torch.randn(3, 5, vp, generator=g, dtype=torch.float64).softmax(-1)
    w = max(vq, vp)
    pad = lambda x: torch.nn.functional.pad(x.sort(-1, descending=True).values,  # noqa: E731
                                            (0, w - x.shape[-1]))
    ref = (pad(q) - pad(p)).abs().sum(-1)
    out = _sorted_l1(q, p)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    (g_ref,) = torch.autograd.grad(ref.sum(), q)
    (g_out,) = torch.autograd.grad(out.sum(), q)
    torch.testing.assert_close(g_out, g_ref, rtol=0, atol=1e-12)


def _jsd(p, q, beta):
    m = [beta * a + (1 - beta) * b for a, b in zip(p, q)]
    kl = lambda x, z: sum(a * math.log(a / c) for a, c in zip(x, z) if a > 0)  # noqa: E731
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def test_uld_hybrid_golden_matched_and_unmatched():
    data = Paired("ab", "abc")  # student eot unk a b; teacher eot unk a b c
    mod = ULDHybridLoss((1, 1, 4), (1, 1, 5), num_samples=1, data=data)
    assert mod.matched_t.tolist() == [0, 1, 2, 3] and mod.weight == pytest.approx(4 / 5)
    q, p = [0.1, 0.1, 0.5, 0.3], [0.05, 0.05, 0.4, 0.2, 0.3]
    out = mod(_logits(q), _logits(p), y=torch.tensor([[2]]),
              batch={"teacher_labels": torch.tensor([[2]])})
    # no unmatched student entries: TRL skips the sorted part, so only the matched JSD counts
    assert out.item() == pytest.approx(0.8 * _jsd(p[:4], q, 0.5), rel=1e-9)
    fixed = ULDHybridLoss((1, 1, 4), (1, 1, 5), num_samples=1, data=data, matched_weight=0.25)
    assert fixed.weight == 0.25


def test_mined_map_golden():
    t = [b"the", b"a", b"xyz", b"<|endoftext|>", b"zq"]
    s = [b"<|endoftext|>", b"t", b"h", b"a", b"x"]
    assert mined_map(t, s, {0}).tolist() == [1, 3, 4, 0, 1]  # ties: common prefix, then id


def test_mined_golden_kl_at_chunk_starts():
    mod = MinEDLoss((1, 3, 4), (1, 2, 5), num_samples=1, data=Paired("ab", "abc"))
    assert mod.mapping.tolist() == [0, 1, 2, 3, 2]  # 'c' -> 'a' (distance 1, smallest id)
    qs = [[0.1, 0.2, 0.3, 0.4], [0.25] * 4, [0.4, 0.3, 0.2, 0.1]]
    ps = [[0.1, 0.1, 0.2, 0.2, 0.4], [0.2] * 5]
    batch = {"chunk_s": torch.tensor([[0, 0, 1]]), "chunk_t": torch.tensor([[0, 1]])}
    out = mod(_logits(*qs), _logits(*ps), batch=batch)

    def kl(p, q):
        pm = [p[0], p[1], p[2] + p[4], p[3]]
        return sum(a * math.log(a / b) for a, b in zip(pm, q))

    # a sum over the 2 aligned positions; the Term divides by mined_positions (2)
    assert out.item() == pytest.approx(kl(ps[0], qs[0]) + kl(ps[1], qs[2]), rel=1e-9)
    assert mined_positions(Context(batch=batch)).item() == 2


def _alm_case():
    s = torch.randn(1, 4, 3, dtype=torch.float64)
    t = torch.randn(1, 3, 5, dtype=torch.float64)
    y = torch.tensor([[0, 1, 2, -100]])
    batch = {"teacher_labels": torch.tensor([[1, 4, -100]]),
             "chunk_s": torch.tensor([[0, 0, 1, -1]]), "chunk_t": torch.tensor([[0, 1, -1]])}
    return s, t, y, batch


@pytest.mark.parametrize("tau", [1.0, 100.0])
def test_alm_golden_binarised_ce(tau):
    s, t, y, batch = _alm_case()
    ls, lt = s.log_softmax(-1)[0], t.log_softmax(-1)[0]
    chunks_s = [ls[0, 0] + ls[1, 1], ls[2, 2]]
    chunks_t = [lt[0, 1], lt[1, 4]]

    def bce(a, b):  # tokenkit: y = exp(logP / tau - 1e-6)
        yt, ys = math.exp(a / tau - 1e-6), math.exp(b / tau - 1e-6)
        return -(yt * math.log(ys) + (1 - yt) * math.log(1 - ys))

    want = sum(bce(float(a), float(b)) for a, b in zip(chunks_t, chunks_s))  # sum, 2 chunks
    assert alm(s, t, y=y, batch=batch, tau=tau).item() == pytest.approx(want, rel=1e-9)
    assert alm_chunks(Context(batch=batch)).item() == 2
    term = cd.Term("alm", tau=tau)  # the Term divides the sum by the chunk count
    ctx = Context(y=y, mask=y != -100, batch=batch)
    got = term.reduce(alm(s, t, y=y, batch=batch, tau=tau), ctx)
    assert got.item() == pytest.approx(want / 2, rel=1e-9)
    # a teacher that keeps one log-prob per token (B, Lt) gives the same value
    per_token = lt.gather(-1, batch["teacher_labels"].clamp_min(0)[0, :, None])[:, 0][None]
    assert alm(s, per_token, y=y, batch=batch, tau=tau).item() == pytest.approx(want, rel=1e-12)


def test_alm_padding_and_unaligned_positions_do_not_count():
    s, t, y, batch = _alm_case()
    base = alm(s, t, y=y, batch=batch)
    s2, t2 = s.clone(), t.clone()
    s2[0, 3], t2[0, 2] = 1e4, -1e4  # the unaligned student position, the teacher padding
    assert alm(s2, t2, y=y, batch=batch).item() == pytest.approx(base.item(), rel=1e-12)
    lp = torch.full((1, 3), float("nan"), dtype=torch.float64)  # a store's padding: NaN
    lp[0, :2] = t.log_softmax(-1)[0, [0, 1], [1, 4]]
    assert torch.isfinite(alm(s, lp, y=y, batch=batch))
    none = {**batch, "chunk_s": torch.full((1, 4), -1)}
    zero = alm(s.requires_grad_(), t, y=y, batch=none)
    assert zero.item() == 0.0 and zero.requires_grad
    # stable at the extremes: log-probs near 0 and very negative stay finite
    ext = binarised_ce(torch.tensor([0.0, -1e4]), torch.tensor([-1e4, 0.0]), 100)
    assert torch.isfinite(ext).all()


def test_gradients_float64():
    s, t, y, batch = _alm_case()
    s = s.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: alm(x, t, y=y, batch=batch, tau=2.0), (s,))
    y2, b2 = torch.tensor([[1, -100, 2, 0]]), {"teacher_labels": torch.tensor([[0, 1, 3]])}
    assert torch.autograd.gradcheck(lambda x: uld(x, t, y=y2, batch=b2).sum(), (s,))
    data = Paired("ab", "abc")
    s4 = torch.randn(1, 4, 4, dtype=torch.float64, requires_grad=True)
    hyb = ULDHybridLoss((1, 4, 4), (1, 3, 5), num_samples=1, data=data)
    assert torch.autograd.gradcheck(lambda x: hyb(x, t, y=y2, batch=b2).sum(), (s4,))
    mn = MinEDLoss((1, 4, 4), (1, 3, 5), num_samples=1, data=data)
    assert torch.autograd.gradcheck(lambda x: mn(x, t, batch=batch), (s4,))


# -- errors -------------------------------------------------------------------------------


def test_errors_name_the_missing_pair():
    s, t, y, batch = _alm_case()
    with pytest.raises(ConfigError, match="shakespeare_pair"):
        alm(s, t, y=y, batch={"labels": y})
    with pytest.raises(ConfigError, match="shakespeare_pair"):
        uld(s, t, y=y, batch={})
    with pytest.raises(ConfigError, match="shakespeare_pair"):
        MinEDLoss((1, 4, 3), (1, 3, 5), num_samples=1, data=cd.data.Dataset({"x": torch.zeros(2)}))
    with pytest.raises(ConfigError, match="teacher_input_ids"):  # teacher fed the student's ids
        alm(s, torch.randn(1, 4, 5), y=y, batch=batch)
    with pytest.raises(ConfigError, match="vocabulary"):
        alm(s, t[..., :3], y=y, batch=batch)
    with pytest.raises(ConfigError, match="at least"):
        MinEDLoss((1, 4, 3), (1, 3, 5), num_samples=1, data=Paired("ab", "abc"))


# -- end to end ---------------------------------------------------------------------------


def _gpt(vocab, seed):
    from crossdistill.models.hf import create_hf

    torch.manual_seed(seed)
    return create_hf("gpt2", config={"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 64,
                                     "vocab_size": vocab})


TEACHER_IO = {"inputs": {"input_ids": "teacher_input_ids",
                         "attention_mask": "teacher_attention_mask"}}


def _distiller(data, terms):
    student = _gpt(data.info["vocab_size"], 0)
    teacher = _gpt(data.info["teacher_vocab_size"], 1)
    seen = []
    teacher.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("input_ids")),
                                      with_kwargs=True)
    d = cd.Distiller(student, teacher, terms, task="lm",
                     io={"inputs": {"input_ids": "input_ids"}}, teacher_io=TEACHER_IO, data=data)
    return d, seen


@pytest.mark.slow  # ~3-9 s on the shared CPU, most of it importing transformers' GPT-2
def test_end_to_end_char_student_bpe_teacher(pair):
    train = pair.subset(range(16))
    d, seen = _distiller(train, [cd.Term("ce"), cd.Term("uld"), cd.Term("alm")])
    # val=None: the trainer's teacher-val line scores a teacher against the student's labels
    res = cd.Trainer(d, train, None, train, epochs=1, batch_size=8, lr=3e-3,
                     progress=False).fit()
    assert math.isfinite(res["test_bpb"])
    ids = [x for x in seen if x is not None]
    assert ids and all(x.shape[1] == pair["teacher_input_ids"].shape[1] for x in ids)
    rows = {tuple(r.tolist()) for r in pair["teacher_input_ids"]}
    assert all(tuple(r.tolist()) in rows for x in ids for r in x)  # its own ids, every step


def _passes_batch() -> bool:  # the distiller hands stateful losses the batch (takes_batch)
    return "takes_batch" in inspect.getsource(cd.Distiller)


@pytest.mark.slow
@pytest.mark.skipif(not _passes_batch(), reason="needs the Distiller's takes_batch hand-off")
def test_end_to_end_stateful_losses(pair):
    train = pair.subset(range(16))
    d, _ = _distiller(train, [cd.Term("ce"), cd.Term("mined"), cd.Term("uld_hybrid")])
    res = cd.Trainer(d, train, None, train, epochs=1, batch_size=8, lr=3e-3,
                     progress=False).fit()
    assert math.isfinite(res["test_bpb"])


def test_teacher_fed_the_student_ids_is_refused_before_training(pair):
    from crossdistill.losses.crosstok import check_teacher_io

    terms = [cd.Term("ce"), cd.Term("alm")]
    terms[1].field = "terms.1"
    check_teacher_io(terms, pair, {"teacher": TEACHER_IO})  # its own ids: fine
    for bad in ({"inputs": {"input_ids": "input_ids"}}, {"inputs": ["input_ids"]}, {}):
        with pytest.raises(ConfigError, match="teacher_input_ids") as err:
            check_teacher_io(terms, pair, {"teacher": bad})
        assert err.value.field == "teacher.inputs" and "terms.1" in str(err.value)
    with pytest.raises(ConfigError, match="teachers.big.inputs"):
        check_teacher_io(terms, pair, {"big": {}}, several=True)
    check_teacher_io([cd.Term("ce"), cd.Term("kd")], pair, {"teacher": {}})  # not cross-tok


def test_top_desc_matches_torch_topk_values_and_gradients():
    from crossdistill.losses.crosstok import _top_desc

    torch.manual_seed(0)
    for shape, k in (((3, 5, 40), 17), ((7, 12), 12)):
        x = torch.randn(shape, dtype=torch.float64).softmax(-1).requires_grad_()
        got, want = _top_desc(x, k), x.topk(k, -1).values
        assert torch.equal(got, want)
        g = torch.randn_like(got)
        (a,) = torch.autograd.grad((got * g).sum(), x)
        (b,) = torch.autograd.grad((want * g).sum(), x)
        assert torch.allclose(a, b)
    h = torch.randn(4, 9).to(torch.bfloat16)  # other dtypes: torch's top-k
    assert torch.equal(_top_desc(h, 3), h.topk(3, -1).values)
