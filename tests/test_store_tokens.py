"""Teacher stores beyond classification: per-token / per-pixel logits, vocabularies past the
int16 range, memory-mapped shards and the sparse top-k accessor."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

import crossdistill as cd
from crossdistill import ConfigError
from crossdistill.adapters import ModelIO
from crossdistill.teachers import TeacherStore, cache_teacher, topk_decode
from crossdistill.teachers.store import index_dtype


class TinyLM(nn.Module):
    """(B, L) token ids -> (B, L, V) logits."""

    def __init__(self, vocab_out, vocab_in=50, dim=8):
        super().__init__()
        self.emb = nn.Embedding(vocab_in, dim)
        self.head = nn.Linear(dim, vocab_out)

    def forward(self, input_ids):
        return self.head(self.emb(input_ids))


def _tokens(n=12, length=5, vocab_in=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_in, (n, length), generator=g)
    return cd.data.Dataset({"input_ids": ids, "idx": torch.arange(n)}, name="toks")


def _lm(vocab, seed=0):
    torch.manual_seed(seed)
    return TinyLM(vocab).eval()


def _indices_dtype(store_dir):
    shard = json.loads((store_dir / "manifest.json").read_text())["shards"][0]
    with safe_open(str(store_dir / shard), "pt") as f:
        return f.get_tensor("logits.indices").dtype


IO = ModelIO(inputs={"input_ids": "input_ids"})


def test_per_token_topk_large_vocab_round_trip(tmp_path):
    vocab, k, length = 40_000, 4, 5
    data, lm = _tokens(length=length), _lm(vocab)
    cache_teacher(lm, data, tmp_path, io=IO, topk=k, batch_size=5, progress=False)
    store = TeacherStore(tmp_path)
    with torch.no_grad():
        z = lm(data["input_ids"])
    ref_vals, ref_ids = z.topk(k, -1)
    ref_lse = torch.logsumexp(z, -1)
    assert (ref_ids > 32_767).any()  # the range int16 indices used to wrap

    ids = torch.tensor([7, 0, 11, 3])
    vals, got_ids, lse = store.lookup_topk(ids)
    assert got_ids.dtype == torch.int64 and vals.dtype == lse.dtype == torch.float32
    assert got_ids.shape == (4, length, k) and lse.shape == (4, length)
    assert torch.equal(got_ids, ref_ids[ids])  # exact, no wrap
    torch.testing.assert_close(vals, ref_vals[ids].half().float())
    torch.testing.assert_close(lse, ref_lse[ids].half().float())

    full = store.lookup(ids, "logits")
    assert full.shape == (4, length, vocab) and full.dtype == torch.float32
    want = topk_decode(ref_vals[ids].half(), ref_ids[ids], ref_lse[ids].half(), vocab)
    torch.testing.assert_close(full, want)

    m = store.manifest
    assert m["vocab_size"] == m["num_classes"] == vocab
    assert m["positions_per_sample"] == length and m["index_dtype"] == "uint16"
    per_sample = length * k * 2 + length * k * 2 + length * 2  # fp16 values, u16 ids, fp16 lse
    assert m["bytes_per_sample_signals"] == per_sample and m["bytes_per_sample"] == 8 + per_sample
    assert m["bytes_per_token"] == store.bytes_per_token == per_sample / length == 18
    assert _indices_dtype(tmp_path) == torch.uint16


def test_per_token_full_precision_store(tmp_path):
    vocab, length = 40_000, 5
    data, lm = _tokens(length=length), _lm(vocab, seed=1)
    cache_teacher(lm, data, tmp_path, io=IO, batch_size=8, progress=False)
    store = TeacherStore(tmp_path)
    ids = torch.tensor([11, 2, 5])
    with torch.no_grad():
        ref = lm(data["input_ids"][ids])
    got = store.lookup(ids, "logits")
    assert got.shape == (3, length, vocab)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)  # fp16 storage
    assert store.manifest["bytes_per_token"] == vocab * 2
    assert store.manifest["index_dtype"] is None
    with pytest.raises(ConfigError, match="not a top-k store"):
        store.lookup_topk(ids)


class PixelHead(nn.Module):
    """(B, 1, H, W) images -> (B, K, H, W) per-pixel logits (class axis 1, like torchvision)."""

    def __init__(self, classes=6):
        super().__init__()
        self.conv = nn.Conv2d(1, classes, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def test_memory_mapped_shards_and_cross_shard_lookups(tmp_path):
    torch.manual_seed(0)
    n, classes = 23, 6
    x = torch.randn(n, 1, 4, 4)
    ids = 100 + 3 * torch.arange(n)  # sparse sample ids
    data = cd.data.Dataset({"x": x, "idx": ids}, {"x": "image"}, name="pix")
    head = PixelHead(classes).eval()
    io = ModelIO(class_dim=1)
    cache_teacher(
        head, data, tmp_path, io=io, dtype="float32", batch_size=7, shard_size=5, progress=False
    )
    store = TeacherStore(tmp_path)
    m = store.manifest
    assert len(m["shards"]) == 5  # exactly shard_size rows per shard: 5, 5, 5, 5, 3
    assert [len(a["idx"]) for a in store._arrays] == [5, 5, 5, 5, 3]
    assert m["positions_per_sample"] == 16 and m["bytes_per_token"] == classes * 4

    # nothing is loaded: no buffers, every signal is a view of a memory-mapped file
    assert not list(store.buffers()) and not list(store.parameters())
    assert all(isinstance(a, np.memmap) for s in store._arrays for a in s.values())
    store.to(torch.float64)  # moving the store copies nothing and changes nothing
    assert all(isinstance(a, np.memmap) for s in store._arrays for a in s.values())

    pick = torch.tensor([22, 0, 4, 5, 14, 10, 19, 9, 20, 3])  # rows across all five shards
    with torch.no_grad():
        ref = head(x[pick]).movedim(1, -1)
    got = store.lookup(ids[pick], "logits")
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    assert got.shape == (10, 4, 4, classes)
    torch.testing.assert_close(got, ref)
    assert torch.equal(store.rows(ids[pick]), pick)  # global row = position in the split
    store.check(data=data)
    with pytest.raises(ConfigError, match="not in the teacher store"):
        store.lookup(torch.tensor([101]), "logits")  # between stored ids
    with pytest.raises(ConfigError, match="not in the teacher store"):
        store.lookup(torch.tensor([10_000]), "logits")


def test_per_pixel_topk_decode_any_leading_dims():
    torch.manual_seed(0)
    z = torch.randn(2, 3, 4, 10)
    vals, ids = z.topk(3, -1)
    lse = torch.logsumexp(z, -1)
    rec = topk_decode(vals, ids, lse, 10)
    flat = topk_decode(vals.reshape(-1, 3), ids.reshape(-1, 3), lse.reshape(-1), 10)
    torch.testing.assert_close(rec, flat.reshape(2, 3, 4, 10))
    torch.testing.assert_close(rec.gather(-1, ids), vals)
    torch.testing.assert_close(rec.softmax(-1).sum(-1), torch.ones(2, 3, 4))


def test_index_dtype_by_vocabulary(tmp_path):
    assert index_dtype(10) == index_dtype(256) == torch.uint8
    assert index_dtype(257) == index_dtype(65_536) == torch.uint16
    assert index_dtype(65_537) == torch.int32
    for vocab, want in ((200, torch.uint8), (300, torch.uint16), (70_000, torch.int32)):
        out = tmp_path / str(vocab)
        data, lm = _tokens(n=4, length=2), _lm(vocab)
        cache_teacher(lm, data, out, io=IO, topk=3, progress=False)
        assert _indices_dtype(out) == want
        assert TeacherStore(out).manifest["index_dtype"] == str(want).removeprefix("torch.")
        with torch.no_grad():
            ref = lm(data["input_ids"]).topk(3, -1).indices
        assert torch.equal(TeacherStore(out).lookup_topk(torch.arange(4))[1], ref)


def test_token_store_errors(tmp_path):
    data, lm = _tokens(n=4, length=2), _lm(300)
    with pytest.raises(ConfigError, match="store.topk"):
        cache_teacher(lm, data, tmp_path, io=IO, topk=300, progress=False)
    with pytest.raises(ConfigError, match="teacher.inputs"):
        cache_teacher(lm, data, tmp_path, progress=False)  # default io reads batch["x"]


def test_bfloat16_store_reads_through_the_memory_map(tmp_path):
    data, lm = _tokens(n=6, length=3), _lm(500)
    cache_teacher(lm, data, tmp_path, io=IO, dtype="bfloat16", shard_size=4, progress=False)
    with torch.no_grad():
        ref = lm(data["input_ids"]).bfloat16().float()
    torch.testing.assert_close(TeacherStore(tmp_path).lookup(torch.arange(6), "logits"), ref)


def test_observed_store_keeps_one_logprob_per_token(tmp_path):
    vocab, length = 300, 5
    data, lm = _tokens(length=length), _lm(vocab)
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, vocab, (12, length), generator=g)
    labels[:, -1] = -100
    data = cd.data.Dataset({**data.tensors, "labels": labels}, name="toks")
    cache_teacher(lm, data, tmp_path, io=IO, observed="labels", batch_size=5, progress=False)
    store = TeacherStore(tmp_path)
    assert store.taps == ["token_logprob"] and not store.is_topk
    m = store.manifest
    assert m["bytes_per_token"] == 4 and m["observed"] == "labels"
    ids = torch.tensor([4, 0, 9])
    got = store.lookup(ids, "token_logprob")
    with torch.no_grad():
        lp = lm(data["input_ids"][ids]).log_softmax(-1)
    want = lp.gather(-1, labels[ids].clamp_min(0).unsqueeze(-1)).squeeze(-1)
    want[:, -1] = 0.0
    torch.testing.assert_close(got, want)
    with pytest.raises(ConfigError, match="stored taps: token_logprob"):
        store.lookup(ids, "logits")
    store.verify_against(lm, data, n=6)  # recomputes the observed log-probs: they match
    with pytest.raises(ConfigError, match="do not match"):
        store.verify_against(_lm(vocab, seed=9), data, n=6)  # another teacher's weights


def test_observed_needs_a_target_key_and_no_topk(tmp_path):
    data, lm = _tokens(), _lm(20)
    with pytest.raises(ConfigError, match="store.observed"):
        cache_teacher(lm, data, tmp_path, io=IO, observed="labels", progress=False)
    with pytest.raises(ConfigError, match="drop --topk"):
        cache_teacher(lm, data, tmp_path, io=IO, observed="input_ids", topk=2, progress=False)
