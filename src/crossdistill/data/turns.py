"""Text pairs for retrieval: a speaker's turn in tiny Shakespeare and the turn that answers it.

The text (embedded, or a user's file in the same layout: ``Name:`` on its own line, the
speech below, a blank line between turns) is cut into turns; a turn's text is its lines
joined by spaces, without the speaker's name (which would give the match away: the answer
is always another speaker). Turns are grouped into contiguous blocks of ``block_turns``,
and whole blocks go to train / val / test (fractions ``0.8 / 0.1 / 0.1`` of the blocks, by a
permutation seeded by ``split_seed``); pairs are formed inside a block only, so no turn is
in two splits and neighbouring text never leaks across them. With ``stride: 1`` (the
default) every turn but a block's last starts a pair, so pair i's answer is pair i+1's query;
``stride: 2`` keeps every second pair, and then no turn is in two pairs (a gallery without
near-duplicates of the query, what a retrieval evaluation usually wants).

:func:`turn_pairs` gives the strings; the registered ``shakespeare_turns`` source tokenizes
both sides for text towers (``query_ids`` / ``query_mask`` / ``gallery_ids`` /
``gallery_mask``, padded to ``max_tokens``), with all-MiniLM-L6-v2's own tokenizer
(``tokenizer: minilm``, the text extra) or a BPE / char tokenizer trained here on the train
split's turns; the strings stay on ``data.texts`` for teachers that read raw text.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError
from .dataset import Dataset

FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
TOKENIZERS = ("minilm", "bpe", "char")


def parse_turns(text: str) -> list[tuple[str, str]]:
    """``(speaker, speech)`` of each turn, in order."""
    turns = []
    for chunk in text.replace("\r\n", "\n").split("\n\n"):
        lines = [ln.strip() for ln in chunk.strip().split("\n") if ln.strip()]
        if len(lines) < 2 or not lines[0].endswith(":"):
            continue  # not a turn (a stray line): skipped
        turns.append((lines[0][:-1], " ".join(lines[1:])))
    return turns


def _blocks(n_turns: int, block_turns: int, seed: int) -> dict[str, list[int]]:
    n_blocks = n_turns // block_turns
    if n_blocks < 3:
        raise ConfigError("data.block_turns", block_turns,
                          f"at most {n_turns // 3}: the text has {n_turns} turns and each "
                          "split needs a block")
    order = np.random.default_rng(seed).permutation(n_blocks)
    n_val = max(1, round(FRACTIONS["val"] * n_blocks))
    n_test = max(1, round(FRACTIONS["test"] * n_blocks))
    return {"val": sorted(order[:n_val].tolist()),
            "test": sorted(order[n_val:n_val + n_test].tolist()),
            "train": sorted(order[n_val + n_test:].tolist())}


def turn_pairs(split: str, *, root=None, block_turns: int = 40, split_seed: int = 0,
               max_chars: int | None = None, stride: int = 1) -> list[tuple[str, str]]:
    """``(turn, next turn)`` strings of ``split`` (module docstring)."""
    from . import SPLITS
    from .text import shakespeare

    if split not in SPLITS:
        raise ConfigError("data.split", split, f"allowed: {', '.join(SPLITS)}")
    if isinstance(block_turns, bool) or not isinstance(block_turns, int) or block_turns < 2:
        raise ConfigError("data.block_turns", block_turns, "an integer >= 2")
    if isinstance(stride, bool) or stride not in (1, 2):
        raise ConfigError("data.stride", stride, "1 (every turn starts a pair) or 2 (no turn "
                          "in two pairs)")
    text = shakespeare(root)
    if max_chars is not None:
        if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1000:
            raise ConfigError("data.max_chars", max_chars, "an integer >= 1000")
        text = text[:max_chars]
    turns = [s for _, s in parse_turns(text)]
    out = []
    for b in _blocks(len(turns), block_turns, split_seed)[split]:
        block = turns[b * block_turns:(b + 1) * block_turns]
        out += list(zip(block[:-1], block[1:]))[::stride]
    return out


def _tokenizer(kind: str, train_text: str, vocab_size: int, cache_dir: str):
    """``minilm``, ``bpe`` / ``char`` (trained here on the train text), or the path of a
    user's Hugging Face tokenizer directory (e.g. the student text model's own)."""
    if not isinstance(kind, str):
        raise ConfigError("data.tokenizer", kind, f"one of {', '.join(TOKENIZERS)} or a path")
    if kind not in TOKENIZERS:
        if "/" in kind or kind.startswith((".", "~")):
            from ..text.minilm import load_tokenizer

            return load_tokenizer(kind)
        raise ConfigError("data.tokenizer", kind,
                          f"one of {', '.join(TOKENIZERS)}, or a tokenizer directory's path")
    if kind == "minilm":
        from transformers import AutoTokenizer

        from ..text.minilm import minilm_path

        return AutoTokenizer.from_pretrained(str(minilm_path("data.tokenizer")),
                                             local_files_only=True)
    from .text_source import tokenizer_for

    return tokenizer_for(train_text, kind, vocab_size, cache_dir)[0]


def _ids(tok, texts: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tok(texts, padding="max_length", truncation=True, max_length=max_tokens,
              return_tensors="pt")
    return enc["input_ids"].long(), enc["attention_mask"].long()


def shakespeare_turns(split: str, *, root=None, tokenizer: str = "minilm",
                      vocab_size: int = 2000, max_tokens: int = 48, block_turns: int = 40,
                      split_seed: int = 0, max_chars: int | None = None, stride: int = 1,
                      cache_dir: str = "runs/cache/tokenizers") -> Dataset:
    """The tokenized pairs of ``split``; ``idx`` is the pair's position in the split, the
    retrieval task's target (query i matches gallery item i)."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not (
            4 <= max_tokens <= 512):
        raise ConfigError("data.max_tokens", max_tokens, "an integer in 4..512")
    pairs = turn_pairs(split, root=root, block_turns=block_turns, split_seed=split_seed,
                       max_chars=max_chars, stride=stride)
    train_text = ""
    if tokenizer in ("bpe", "char"):  # a tokenizer trained here reads the train turns only
        train = pairs if split == "train" else turn_pairs(
            "train", root=root, block_turns=block_turns, split_seed=split_seed,
            max_chars=max_chars)
        train_text = "\n".join(q for q, _ in train)
    tok = _tokenizer(tokenizer, train_text, vocab_size, cache_dir)
    if tok.pad_token_id is None:
        raise ConfigError("data.tokenizer", tokenizer, "a tokenizer with a pad token")
    q, qm = _ids(tok, [a for a, _ in pairs], max_tokens)
    g, gm = _ids(tok, [b for _, b in pairs], max_tokens)
    data = Dataset(
        {"query_ids": q, "query_mask": qm, "gallery_ids": g, "gallery_mask": gm,
         "idx": torch.arange(len(pairs))},
        {"query_ids": "tokens", "query_mask": "value", "gallery_ids": "tokens",
         "gallery_mask": "value"},
        name="shakespeare-turns",
        split=split,
        num_classes=0,
        info={"construction": f"tiny Shakespeare turns and their answers, blocks of "
              f"{block_turns} turns split {FRACTIONS} (seed {split_seed}), stride {stride}",
              "pairs": len(pairs), "tokenizer": tokenizer, "max_tokens": max_tokens},
    )
    data.texts = {"query": [a for a, _ in pairs], "gallery": [b for _, b in pairs]}
    data.tokenizer = tok
    return data
