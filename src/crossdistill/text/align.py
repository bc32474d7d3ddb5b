"""Byte-offset chunk alignment between two tokenizations of the same text.

The one alignment every cross-tokenizer loss uses (ULD's hybrid, MinED, ALM). Bytes are the
unit, not characters: a byte-level BPE token may hold part of a multi-byte character, and
:func:`~crossdistill.text.tokenizer.encode_with_bytes` gives exact per-token byte counts.

A *chunk* is the shortest run of tokens on both sides that covers the same bytes: walking
both token sequences, a chunk closes at every byte offset where a token ends on *both*
sides (Minixhofer et al., 2025, ALM's alignment matrices; TRL GOLD's byte groups). Rules:

* Every byte belongs to exactly one chunk, on both sides, and chunk ids are contiguous and
  non-decreasing along each sequence (property-tested).
* Zero-byte tokens (a BOS, an added special token) never open or close a chunk: they join
  the chunk of the byte before them, and at the very start (a BOS on one side only, or on
  both) the first chunk. So a one-sided BOS is attached to chunk 0, never its own chunk.
* If the two sides end at different bytes (one was truncated), tokens after the last common
  boundary are in no closed chunk: id -1.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError

NO_CHUNK = -1


def spans_from_bytes(nbytes, start: int = 0) -> np.ndarray:
    """``(n, 2)`` ``[start, end)`` byte spans of consecutive tokens with ``nbytes`` bytes each."""
    nb = np.asarray(nbytes, dtype=np.int64).reshape(-1)
    if len(nb) and nb.min() < 0:
        raise ConfigError("nbytes", int(nb.min()), "non-negative byte counts")
    ends = start + np.cumsum(nb)
    return np.stack([ends - nb, ends], axis=1) if len(nb) else np.zeros((0, 2), np.int64)


def token_spans(tok, text: str) -> tuple[list[int], np.ndarray]:
    """Token ids of ``text`` (no special tokens added) and their UTF-8 byte spans."""
    from .tokenizer import encode_with_bytes

    ids, nbytes = encode_with_bytes(tok, text)
    return ids, spans_from_bytes(nbytes)


def _check_spans(spans, side: str) -> np.ndarray:
    sp = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    if len(sp) == 0:
        raise ConfigError(f"align.{side}", 0, "at least one token per side")
    if (sp[:, 1] < sp[:, 0]).any() or (sp[1:, 0] != sp[:-1, 1]).any():
        raise ConfigError(f"align.{side}", "spans", "contiguous [start, end) byte spans")
    return sp


def chunks(spans_a, spans_b) -> tuple[np.ndarray, np.ndarray, int]:
    """Chunk id per token of each side, and the number of closed chunks.

    ``spans_a``/``spans_b``: ``(n, 2)`` contiguous ``[start, end)`` byte spans of the same
    text under two tokenizers (:func:`token_spans`, :func:`spans_from_bytes`); both must
    start at the same byte. A token ending at byte ``e`` gets the number of common
    boundaries (token ends on both sides, after the start) below ``e``; see the module
    docstring for zero-byte tokens and uneven ends (-1)."""
    a, b = _check_spans(spans_a, "a"), _check_spans(spans_b, "b")
    if a[0, 0] != b[0, 0]:
        raise ConfigError("align.b", int(b[0, 0]), f"both sides start at byte {int(a[0, 0])}")
    start = a[0, 0]
    common = np.intersect1d(a[:, 1], b[:, 1])
    common = common[common > start]
    out = []
    for sp in (a, b):
        ids = np.searchsorted(common, sp[:, 1], side="left").astype(np.int64)
        last = common[-1] if len(common) else start
        ids[sp[:, 1] > last] = NO_CHUNK
        out.append(ids)
    return out[0], out[1], int(len(common))


def vocab_bytes(tok) -> list[bytes]:
    """The bytes each vocabulary id stands for (id order, ``len(tok)`` entries): byte-level
    BPE entries mapped back through GPT-2's byte table (so ``'Ġ'`` is ``b' '``), other
    tokenizers' ids decoded one at a time; special tokens are their literal text. Used to find
    exact vocabulary matches (hybrid ULD) and edit distances (MinED) between tokenizers."""
    from .tokenizer import _BYTE_OF, _backend, _is_byte_level

    backend = _backend(tok)
    byte_level = _is_byte_level(backend)
    special = {int(i): getattr(t, "content", str(t))
               for i, t in backend.get_added_tokens_decoder().items()}
    out = []
    for i in range(len(tok)):
        if i in special:
            out.append(special[i].encode("utf-8"))
            continue
        piece = backend.id_to_token(i)
        if piece is None:
            out.append(b"")
        elif byte_level and all(c in _BYTE_OF for c in piece):
            out.append(bytes(_BYTE_OF[c] for c in piece))
        else:
            out.append(backend.decode([i], skip_special_tokens=False).encode("utf-8"))
    return out


def special_ids(tok) -> set[int]:
    """Ids of the added/special tokens (``<|endoftext|>``, ``<unk>``)."""
    from .tokenizer import _backend

    return {int(i) for i in _backend(tok).get_added_tokens_decoder()}
