import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from crossdistill.data import Dataset  # noqa: E402
from crossdistill.data.text import (  # noqa: E402
    TokenBlocks,
    contiguous_split,
    lm_dataset,
    shakespeare,
    write_tokens,
)
from crossdistill.errors import ConfigError  # noqa: E402
from crossdistill.text import (  # noqa: E402
    SPECIAL,
    encode_with_bytes,
    load_tokenizer,
    require_pad,
    train_bpe,
    train_char,
)

SHARED = Path("/work/shared/data/tinyshakespeare/input.txt")
MULTI = "naïve café — 東京 😀\n\tend"


@pytest.fixture(scope="module")
def text():
    return shakespeare()[:30_000]


@pytest.fixture(scope="module")
def bpe(text):
    return train_bpe(text, 300)


@pytest.fixture(scope="module")
def char(text):
    return train_char(text + MULTI)


@pytest.fixture(params=["bpe", "char"])
def tok(request, bpe, char):
    return bpe if request.param == "bpe" else char


# -- the corpus and splits -----------------------------------------------------------------


def test_embedded_asset():
    t = shakespeare()
    assert t.startswith("First Citizen:") and len(t) > 1_000_000
    if SHARED.is_file():
        assert t == SHARED.read_text(encoding="utf-8")
        assert shakespeare(SHARED.parent) == t  # a directory reads its input.txt


def test_user_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        shakespeare(tmp_path / "nope.txt")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe")
    with pytest.raises(ConfigError, match="UTF-8"):
        shakespeare(bad)
    good = tmp_path / "good.txt"
    good.write_text(MULTI, encoding="utf-8")
    assert shakespeare(good) == MULTI
    with pytest.raises(ConfigError, match="input.txt"):
        shakespeare(tmp_path)


def test_contiguous_split():
    t = "".join(chr(65 + i % 26) for i in range(10_001))
    parts = contiguous_split(t)
    assert list(parts) == ["train", "val", "test"]
    assert "".join(parts.values()) == t
    assert [len(p) for p in parts.values()] == [9001, 500, 500]
    assert t.startswith(parts["train"]) and t.endswith(parts["test"])
    assert [len(p) for p in contiguous_split(t, (0.5, 0.25, 0.25)).values()] == [5000, 2501, 2500]
    for bad in [(0.9, 0.1), (0.9, 0.2, 0.1), (0, 0.5, 0.5), (1.0, -0.5, 0.5)]:
        with pytest.raises(ConfigError, match="data.fractions"):
            contiguous_split(t, bad)


# -- tokenizers ----------------------------------------------------------------------------


def test_bpe_and_char_basics(bpe, char, text, tmp_path):
    from transformers import AutoTokenizer

    assert len(bpe) == 300
    for t in (bpe, char):
        assert t.bos_token == t.eos_token == t.pad_token == SPECIAL
        require_pad(t)
    assert len(char) == len(set(text + MULTI)) + 2  # + <|endoftext|> and <unk>
    assert char.decode(char(MULTI + text[:500])["input_ids"]) == MULTI + text[:500]
    assert len(char(MULTI)["input_ids"]) == len(MULTI)
    assert bpe.decode(bpe(MULTI)["input_ids"]) == MULTI  # byte level: no unknowns
    for t, kind in ((bpe, "bpe"), (char, "char")):
        d = tmp_path / kind
        t.save_pretrained(d)
        for loaded in (AutoTokenizer.from_pretrained(d), load_tokenizer(d),
                       load_tokenizer(d / "tokenizer.json")):
            assert loaded(MULTI)["input_ids"] == t(MULTI)["input_ids"]
            assert loaded.decode(t(MULTI)["input_ids"]) == MULTI
    assert (train_char("abc", out_dir=tmp_path / "c") and
            (tmp_path / "c" / "tokenizer.json").is_file())


def test_tokenizer_errors(tmp_path, bpe):
    with pytest.raises(ConfigError, match="vocab_size"):
        train_bpe("hello", 100)
    with pytest.raises(ConfigError, match="non-empty"):
        train_char("")
    with pytest.raises(ConfigError, match="no such path"):
        load_tokenizer(tmp_path / "none", field="data.tokenizer")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match="files present: tokenizer.json") as e:
        load_tokenizer(tmp_path / "broken")
    assert "\n" not in str(e.value)
    bpe_no_pad = train_bpe("hello world", 260)
    bpe_no_pad.pad_token = None
    with pytest.raises(ConfigError, match="no pad token where one is needed"):
        require_pad(bpe_no_pad, "teacher.tokenizer")


@pytest.mark.parametrize("s", [MULTI, "", " ", "a", "\n\n", "x" * 50, f"a{SPECIAL}b", "東"])
def test_bytes_exact_examples(tok, s):
    ids, nbytes = encode_with_bytes(tok, s)
    assert len(ids) == len(nbytes)
    assert sum(nbytes) == len(s.encode("utf-8"))
    assert all(n >= 0 for n in nbytes)


def test_bytes_per_token_bpe(bpe):
    # each byte-level token's own bytes, even where a multi-byte character is split
    from crossdistill.text.tokenizer import _BYTE_OF

    ids, nbytes = encode_with_bytes(bpe, MULTI)
    pieces = [bytes(_BYTE_OF[c] for c in t) for t in bpe.convert_ids_to_tokens(ids)]
    assert [len(p) for p in pieces] == nbytes
    assert b"".join(pieces) == MULTI.encode("utf-8")


def test_bytes_per_token_char(char):
    ids, nbytes = encode_with_bytes(char, MULTI)
    assert nbytes == [len(c.encode("utf-8")) for c in MULTI]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.sampled_from(list("ab é—東😀\n\t\r") + [SPECIAL, "ï"]), max_size=30).map("".join)
       | st.text(max_size=30))
def test_bytes_exact_property(bpe, char, s):
    for t in (bpe, char):
        ids, nbytes = encode_with_bytes(t, s)
        assert sum(nbytes) == len(s.encode("utf-8"))
        assert min(nbytes, default=0) >= 0
    assert bpe.decode(encode_with_bytes(bpe, s)[0]) == s


# -- LM blocks -----------------------------------------------------------------------------


def test_lm_dataset_alignment(tok, text):
    part = text[:5000]
    ids, nbytes = encode_with_bytes(tok, part)
    block = 16
    d = lm_dataset(part, tok, block=block, split="val")
    assert isinstance(d, Dataset) and d.split == "val" and d.name == "shakespeare"
    n = len(ids) // block
    assert len(d) == n and d.num_classes == len(tok)
    assert d.kinds["input_ids"] == "tokens" and d.kinds["labels"] == "tokens"
    assert d.kinds["token_bytes"] == "value" and d.kinds["attention_mask"] == "mask"
    x, y, yb = d["input_ids"], d["labels"], d["token_bytes"]
    assert x.shape == y.shape == yb.shape == d["attention_mask"].shape == (n, block)
    assert x.dtype == y.dtype == torch.long and bool((d["attention_mask"] == 1).all())
    assert x.flatten().tolist() == ids[: n * block]
    assert torch.equal(y[:, :-1], x[:, 1:])  # labels[t] == input_ids[t + 1] within a block
    assert torch.equal(y[:-1, -1], x[1:, 0])  # ... and the next block's first token at the end
    assert y[-1, -1].item() == (ids[n * block] if len(ids) > n * block else -100)
    assert yb.flatten().tolist() == nbytes[1 : n * block + 1] + [0] * (len(ids) == n * block)
    # the labels cover tokens 1 .. n*block: exactly that span of the text's bytes
    covered = part.encode("utf-8")[nbytes[0] : sum(nbytes[: n * block + 1])]
    assert int(yb.sum()) == len(covered) == d.info["scored_bytes"]
    assert torch.equal(d["idx"], torch.arange(n))


def test_lm_dataset_exact_multiple_ends_with_ignore(char):
    ids, _ = encode_with_bytes(char, "abcdefgh")
    d = lm_dataset("abcdefgh", char, block=4)
    assert d["labels"].tolist() == [ids[1:5], ids[5:8] + [-100]]
    assert d["token_bytes"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    with pytest.raises(ConfigError, match="block"):
        lm_dataset("abc", char, block=4)


def test_token_blocks_match_lm_dataset(tok, text, tmp_path):
    part = text[:4000] + MULTI
    ids, nbytes = encode_with_bytes(tok, part)
    path = write_tokens(ids, nbytes, tmp_path / "val.tok", vocab_size=len(tok))
    import json

    meta = json.loads((tmp_path / "val.tok.json").read_text())
    assert meta["dtype"] == "uint16" and meta["n_tokens"] == len(ids)
    assert (tmp_path / "val.tok").stat().st_size == 2 * len(ids)
    blocks = TokenBlocks(path, block=16)
    d = lm_dataset(part, tok, block=16)
    assert len(blocks) == len(d) and blocks.num_classes == len(tok)
    for i in list(range(len(d))) + [-1]:
        item = blocks[i]
        assert set(item) == set(d.keys())
        for k in ("input_ids", "labels", "token_bytes", "attention_mask"):
            assert torch.equal(item[k], d[k][i]), k
    assert blocks[-1]["idx"].item() == len(d) - 1
    with pytest.raises(IndexError):
        blocks[len(d)]
    loader = torch.utils.data.DataLoader(blocks, batch_size=4)
    first = next(iter(loader))
    assert torch.equal(first["input_ids"], d["input_ids"][:4])


def test_write_tokens_append_and_wide(tmp_path):
    p = tmp_path / "t.bin"
    write_tokens([1, 2, 3], [1, 1, 2], p, vocab_size=70_000)
    write_tokens([69_999, 5], [3, 1], p, append=True)
    import json

    meta = json.loads((tmp_path / "t.bin.json").read_text())
    assert meta["dtype"] == "int32" and meta["n_tokens"] == 5
    b = TokenBlocks(p, block=2)
    assert len(b) == 2
    assert b[0]["input_ids"].tolist() == [1, 2] and b[0]["labels"].tolist() == [2, 3]
    assert b[1]["labels"].tolist() == [69_999, 5] and b[1]["token_bytes"].tolist() == [3, 1]
    with pytest.raises(ConfigError):
        write_tokens([1, 2], [1], p)
    with pytest.raises(ConfigError, match="write_tokens"):
        TokenBlocks(tmp_path / "missing.bin", 2)
