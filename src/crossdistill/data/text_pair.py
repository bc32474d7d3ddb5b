"""The ``shakespeare_pair`` source: the same text windows under a student and a teacher tokenizer.

For cross-tokenizer distillation (ULD, MinED, ALM). The student side *is* the
``shakespeare`` source's split (same text, contiguous 90/5/5 split, tokenizer trained on the
train range only and cached, same blocks): ``input_ids``, ``labels``, ``token_bytes``,
``attention_mask``, so the lm task's bits per byte stays exact. The teacher side is the
teacher tokenizer's own tokenization of the whole split (trained on the same train range, so
a ``shakespeare`` teacher config with the same kind, vocabulary size and ``max_chars`` reads
exactly these ids), cut to the tokens that overlap each student window:

* ``teacher_input_ids``/``teacher_labels``/``teacher_attention_mask``/``teacher_token_bytes``
  (N, teacher_block), position-aligned like the student's, padded with the pad id, label
  -100, mask 0 and 0 bytes (so the teacher's own bits per byte is exact too). Feed the
  teacher these (``teacher: {inputs: {input_ids: teacher_input_ids, attention_mask:
  teacher_attention_mask}}``), never the student's ids.
* ``chunk_s`` (N, block) / ``chunk_t`` (N, teacher_block): the chunk id
  (:func:`crossdistill.text.align.chunks`) of each *label* token, -1 where none. Chunk ids
  start at 0 per window. The window's first chunk holds both sides' first input tokens,
  whose text neither side predicts, so it is dropped (-1); so are tokens beyond the last
  common byte boundary (the teacher cut at ``teacher_block``, or its last token running
  past the student window's end).

``teacher_block`` defaults to the longest teacher window of the split, so nothing is cut.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError
from ..schema import Count, Width
from .dataset import IGNORE_INDEX, Dataset
from .text import LM_KINDS, _tokens, contiguous_split, shakespeare
from .text_source import KINDS, shakespeare_split, tokenizer_for

PAIR_KINDS = {**LM_KINDS, "teacher_input_ids": "tokens", "teacher_labels": "tokens",
              "teacher_attention_mask": "mask", "teacher_token_bytes": "value",
              "chunk_s": "value", "chunk_t": "value"}


def _ranges(sp_s, sp_t, block: int, n_blocks: int) -> list[tuple[int, int, int, int]]:
    """Per student block ``(lo, hi, i0, i1)``: its window tokens ``lo .. hi`` (inputs and the
    last label) and the teacher tokens ``i0 .. i1`` that overlap those bytes."""
    out = []
    for i in range(n_blocks):
        lo = i * block
        hi = min(lo + block, len(sp_s) - 1)
        a, b = sp_s[lo, 0], sp_s[hi, 1]
        i0 = int(np.searchsorted(sp_t[:, 1], a, side="right"))
        i1 = int(np.searchsorted(sp_t[:, 0], b, side="left")) - 1
        out.append((lo, hi, i0, i1))
    return out


def _label_chunks(c: np.ndarray, n_labels: int, width: int) -> np.ndarray:
    """Chunk ids of the label tokens (window tokens 1..), first chunk dropped, -1 padded."""
    row = np.full(width, -1, dtype=np.int64)
    lab = c[1 : 1 + min(n_labels, width)] - 1  # chunk 0 holds the unscored first inputs
    row[: len(lab)] = np.where(lab >= 0, lab, -1)
    return row


def shakespeare_pair_split(
    split: str,
    *,
    root: str | None = None,
    tokenizer: str = "char",
    vocab_size: Count = 512,
    teacher_tokenizer: str = "bpe",
    teacher_vocab_size: Count = 512,
    block: Width = 64,
    teacher_block: Width | None = None,
    max_chars: int | None = None,
    cache_dir: str = "runs/cache/tokenizers",
) -> Dataset:
    """One split as student blocks plus the teacher's own tokens and the chunk alignment."""
    if teacher_tokenizer not in KINDS:
        raise ConfigError("data.params.teacher_tokenizer", teacher_tokenizer,
                          f"allowed: {', '.join(KINDS)}")
    student = shakespeare_split(split, root=root, tokenizer=tokenizer, vocab_size=vocab_size,
                                block=block, max_chars=max_chars, cache_dir=cache_dir)
    text = shakespeare(root)
    parts = contiguous_split(text if max_chars is None else text[:max_chars])
    t_tok, t_path = tokenizer_for(parts["train"], teacher_tokenizer, int(teacher_vocab_size),
                                  cache_dir)
    from ..text.align import chunks, spans_from_bytes

    ids_s, nb_s = _tokens(student.tokenizer, parts[split])
    ids_t, nb_t = _tokens(t_tok, parts[split])
    sp_s, sp_t = spans_from_bytes(nb_s), spans_from_bytes(nb_t)
    n = len(student)
    ranges = _ranges(sp_s, sp_t, block, n)
    need = max(i1 - i0 for _, _, i0, i1 in ranges)
    width = need if teacher_block is None else teacher_block
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ConfigError("data.params.teacher_block", teacher_block, "a positive integer")
    pad = t_tok.pad_token_id if t_tok.pad_token_id is not None else 0
    t_in = np.full((n, width), pad, dtype=np.int64)
    t_lab = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
    t_att = np.zeros((n, width), dtype=np.int64)
    t_bytes = np.zeros((n, width), dtype=np.int64)
    ch_s = np.full((n, block), -1, dtype=np.int64)
    ch_t = np.full((n, width), -1, dtype=np.int64)
    n_labels = (student["labels"] != IGNORE_INDEX).sum(1).tolist()
    for r, (lo, hi, i0, i1) in enumerate(ranges):
        m = min(i1 - i0, width)  # teacher inputs i0 .. i0+m-1, labels i0+1 .. i0+m
        t_in[r, :m] = ids_t[i0 : i0 + m]
        t_lab[r, :m] = ids_t[i0 + 1 : i0 + m + 1]
        t_att[r, :m] = 1
        t_bytes[r, :m] = nb_t[i0 + 1 : i0 + m + 1]
        win_t = sp_t[i0 : i0 + m + 1].copy()
        win_t[0, 0] = sp_s[lo, 0]  # a teacher token straddling the start: align from there
        c_s, c_t, _ = chunks(sp_s[lo : hi + 1], win_t)  # past a cut: -1 on both sides
        ch_s[r] = _label_chunks(c_s, n_labels[r], block)
        ch_t[r] = _label_chunks(c_t, m, width)
    tensors = {k: student[k] for k in student.keys()}
    tensors.update({k: torch.from_numpy(v) for k, v in (
        ("teacher_input_ids", t_in), ("teacher_labels", t_lab),
        ("teacher_attention_mask", t_att), ("teacher_token_bytes", t_bytes),
        ("chunk_s", ch_s), ("chunk_t", ch_t))})
    info = dict(student.info)
    info.update(teacher_tokenizer=str(t_path), teacher_tokenizer_kind=teacher_tokenizer,
                teacher_vocab_size=len(t_tok), teacher_block=width, teacher_block_needed=need,
                chunks=int((ch_s.max(1) + 1).sum()))
    data = Dataset(tensors, PAIR_KINDS, name="shakespeare_pair", split=split,
                   num_classes=student.num_classes, info=info)
    data.tokenizer, data.teacher_tokenizer = student.tokenizer, t_tok
    return data
