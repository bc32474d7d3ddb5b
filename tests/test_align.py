"""The byte-offset chunk alignment (text/align.py): properties over real tokenizers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crossdistill.errors import ConfigError
from crossdistill.text import train_bpe, train_char
from crossdistill.text.align import chunks, spans_from_bytes, token_spans, vocab_bytes

CORPUS = ("First Citizen: Before we proceed any further, hear me speak.\n"
          "naïve café 日本語 🙂 -- don't; well... (yes)!\t\n") * 30


@pytest.fixture(scope="module")
def toks():
    return {"bpe": train_bpe(CORPUS, 300), "bpe2": train_bpe(CORPUS, 400),
            "char": train_char(CORPUS)}


def _check_cover(spans_a, spans_b, ca, cb, n):
    """Every byte in one chunk on both sides; ids contiguous and monotone; same bytes."""
    for c in (ca, cb):
        closed = c[c >= 0]
        assert (np.diff(closed) >= 0).all() and (np.diff(closed) <= 1).all()
        assert (c[c < 0] == -1).all() and (np.flatnonzero(c < 0) >= len(closed)).all()
        if n:
            assert closed[0] == 0 and closed[-1] == n - 1
    for k in range(n):
        ra, rb = spans_a[ca == k], spans_b[cb == k]
        assert len(ra) and len(rb)
        assert (ra[0, 0], ra[-1, 1]) == (rb[0, 0], rb[-1, 1])


TEXT = st.lists(
    st.sampled_from(list("abc de,.!'\n\tï日🙂é") + ["  ", "...", "the ", "e\u0301"]),
    min_size=1, max_size=30,
).map("".join)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT, pair=st.sampled_from([("bpe", "char"), ("char", "bpe"), ("bpe", "bpe2")]))
def test_chunks_cover_every_byte_on_both_sides(toks, text, pair):
    _, sa = token_spans(toks[pair[0]], text)
    _, sb = token_spans(toks[pair[1]], text)
    ca, cb, n = chunks(sa, sb)
    assert sa[-1, 1] == sb[-1, 1] == len(text.encode())
    assert (ca >= 0).all() and (cb >= 0).all()  # same text: every token in a closed chunk
    _check_cover(sa, sb, ca, cb, n)


def test_multibyte_utf8_and_split_punctuation(toks):
    text = "naïve café 日本語 🙂 -- don't; well..."
    ids_b, sb = token_spans(toks["bpe"], text)
    ids_c, sc = token_spans(toks["char"], text)
    assert len(ids_c) == len(text)  # one token per character, bytes are 1-4 each
    assert sc[:, 1].tolist()[-1] == len(text.encode())
    cb, cc, n = chunks(sb, sc)
    _check_cover(sb, sc, cb, cc, n)
    # a 4-byte emoji is one chunk of one char token, whatever the BPE does with its bytes
    e = text.index("🙂")
    k = cc[e]
    assert (cc == k).sum() == 1 and (sc[cc == k, 1] - sc[cc == k, 0]).sum() == 4
    # "..." is one or more BPE tokens but three char tokens: they share chunks
    dots = [cc[i] for i in range(len(text) - 3, len(text))]
    assert set(dots) <= set(cb.tolist())


def test_bos_on_one_side_joins_the_first_chunk():
    a = spans_from_bytes([0, 3, 2, 1])  # BOS (0 bytes) then tokens of 3, 2, 1 bytes
    b = spans_from_bytes([1, 2, 3])
    ca, cb, n = chunks(a, b)
    assert ca.tolist() == [0, 0, 1, 1] and cb.tolist() == [0, 0, 1] and n == 2
    both = chunks(spans_from_bytes([0, 3, 3]), spans_from_bytes([0, 3, 3]))
    assert both[0].tolist() == [0, 0, 1] and both[2] == 2  # BOS never its own chunk


def test_hand_example_and_uneven_ends():
    a = spans_from_bytes([2, 1, 3])  # "ab|c|def"
    b = spans_from_bytes([1, 2, 1, 1])  # "a|bc|d|e" (cut before "f")
    ca, cb, n = chunks(a, b)
    assert (ca.tolist(), cb.tolist(), n) == ([0, 0, -1], [0, 0, -1, -1], 1)
    with pytest.raises(ConfigError, match="start at byte"):
        chunks(spans_from_bytes([1], start=1), spans_from_bytes([1]))
    with pytest.raises(ConfigError, match="contiguous"):
        chunks(np.array([[0, 1], [2, 3]]), spans_from_bytes([3]))


def test_vocab_bytes_maps_byte_level_entries_to_bytes(toks):
    vb, vc = vocab_bytes(toks["bpe"]), vocab_bytes(toks["char"])
    assert vb[0] == vc[0] == b"<|endoftext|>"
    assert b" " in vb and b" " in vc  # byte-level 'Ġ' is the space byte
    assert "日".encode() in vc and len(vb) == len(toks["bpe"])
