"""Synthetic paraphrase pairs from tiny Shakespeare turns (sentence-pair scoring, pair AUC).

Lines are the speaker turns of :mod:`crossdistill.data.turns` (its contiguous blocks decide
the split, so no line, and no neighbouring text, is in two splits), each cut to its first
``max_words`` words so that it fits a short encoder window; lines shorter than ``min_words``
are left out. For each of ``n_lines`` anchor lines drawn (seeded) from the split:

- a **positive** pair ``(line, perturb(line))``: every word dropped with probability
  ``drop`` (at least one kept), the rest shuffled when ``shuffle``;
- a **negative** pair ``(line, other)``: ``negatives="random"`` another line of the split,
  ``"next"`` the turn that follows it in the play (same scene: a harder negative),
  ``"mixed"`` one or the other by a seeded coin per anchor.

So each anchor is in one positive and one negative pair (balanced labels). The perturbations,
draws and coins come from a generator seeded by ``(seed, split)``: the same pairs every run,
and independent ones per split.

:func:`paraphrase_dataset` tokenizes both sides for bi-encoders (``a_ids`` / ``a_mask``,
``b_ids`` / ``b_mask``: ``[CLS] side [SEP]``, ``max_tokens``) and the pair for cross-encoders
(``pair_ids`` / ``pair_mask`` / ``pair_types``: ``[CLS] a [SEP] b [SEP]``, each side's
content cut as in its own encoding, so both kinds of model see the same words). ``y`` is the
synthetic label (1 paraphrase, 0 not), or ``-100`` with ``hide_labels`` (an unsupervised
train split: the labels stay on ``data.gold`` for diagnostics only). ``orders="both"`` adds
every pair again as ``(b, a)`` (Trans-Encoder trains its cross-encoder on both orders).
:func:`with_features` attaches a frozen encoder's embeddings of both sides (``emb_a`` /
``emb_b``), computed once per distinct text.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError
from .dataset import IGNORE_INDEX, Dataset

NEGATIVES = ("random", "next", "mixed")
ORDERS = ("ab", "both")
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}


def clip_words(text: str, max_words: int) -> str:
    return " ".join(text.split()[:max_words])


def perturb(text: str, rng: np.random.Generator, drop: float = 0.5,
            shuffle: bool = True) -> str:
    """``text`` with each word dropped with probability ``drop`` (at least one kept), the
    remaining words shuffled if ``shuffle``."""
    words = text.split()
    if not words:
        return text
    keep = [w for w, r in zip(words, rng.random(len(words))) if r >= drop]
    if not keep:
        keep = [words[int(rng.integers(len(words)))]]
    if shuffle:
        keep = [keep[i] for i in rng.permutation(len(keep))]
    return " ".join(keep)


def _check(name: str, value, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"data.{name}", value, allowed)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def paraphrase_pairs(split: str, *, n_lines: int | None = None, drop: float = 0.5,
                     shuffle: bool = True, negatives: str = "mixed", max_words: int = 16,
                     min_words: int = 4, seed: int = 0, root=None, block_turns: int = 40,
                     split_seed: int = 0, max_chars: int | None = None
                     ) -> list[tuple[str, str, int]]:
    """``(a, b, label)`` rows of ``split``: per anchor its positive, then its negative."""
    from . import SPLITS
    from .turns import turn_pairs

    _check("split", split, split in SPLITS, f"allowed: {', '.join(SPLITS)}")
    _check("negatives", negatives, negatives in NEGATIVES, f"one of {', '.join(NEGATIVES)}")
    _check("drop", drop, isinstance(drop, (int, float)) and not isinstance(drop, bool)
           and 0 < drop < 1, "a word-dropout probability in (0, 1)")
    _check("max_words", max_words, _int(max_words) and max_words >= 2, "an integer >= 2")
    _check("min_words", min_words, _int(min_words) and 1 <= min_words <= max_words,
           f"an integer in 1..max_words ({max_words})")
    _check("n_lines", n_lines, n_lines is None or (_int(n_lines) and n_lines >= 2),
           "an integer >= 2, or null for every line")
    _check("seed", seed, _int(seed) and seed >= 0, "an integer >= 0")
    pairs = turn_pairs(split, root=root, block_turns=block_turns, split_seed=split_seed,
                       max_chars=max_chars)
    cands = [(clip_words(a, max_words), clip_words(b, max_words)) for a, b in pairs
             if len(a.split()) >= min_words and len(b.split()) >= min_words]
    if len(cands) < 2:
        raise ConfigError("data.min_words", min_words,
                          f"split {split!r} has {len(cands)} line(s) of >= {min_words} words; "
                          "lower min_words or use more text")
    n = len(cands) if n_lines is None else n_lines
    if n > len(cands):
        raise ConfigError("data.n_lines", n_lines,
                          f"at most {len(cands)} (the eligible lines of split {split!r})")
    rng = np.random.default_rng([seed, _SPLIT_CODE[split]])
    picks = np.sort(rng.choice(len(cands), n, replace=False))
    rows = []
    for i in picks.tolist():
        line, nxt = cands[i]
        rows.append((line, perturb(line, rng, drop, shuffle), 1))
        use_next = negatives == "next" or (negatives == "mixed" and rng.random() < 0.5)
        if use_next and nxt != line:
            other = nxt
        else:
            j = int(rng.integers(len(cands) - 1))
            j += j >= i  # any other line
            other = cands[j][0]
            while other == line:  # a repeated line ("My lord.") is not a negative
                j = int(rng.integers(len(cands)))
                other = cands[j][0]
        rows.append((line, other, 0))
    return rows


def _specials(tok) -> tuple[int, int, int]:
    cls = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
    sep = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    if cls is None or sep is None or tok.pad_token_id is None:
        raise ConfigError("data.tokenizer", type(tok).__name__,
                          "a tokenizer with cls/sep (or bos/eos) and pad tokens")
    return int(cls), int(sep), int(tok.pad_token_id)


def encode_sides(tok, texts: list[str], max_tokens: int) -> list[list[int]]:
    """Each text's content token ids, cut to ``max_tokens - 2`` (room for cls and sep)."""
    ids = tok(list(texts), add_special_tokens=False, truncation=True,
              max_length=max_tokens - 2)["input_ids"]
    return [list(x[:max_tokens - 2]) for x in ids]


def _pad(rows: list[list[int]], length: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def side_tensors(tok, texts: list[str], max_tokens: int):
    """``[CLS] text [SEP]`` ids and mask, padded to ``max_tokens``."""
    cls, sep, pad = _specials(tok)
    return _pad([[cls, *c, sep] for c in encode_sides(tok, texts, max_tokens)], max_tokens, pad)


def pair_tensors(tok, a: list[str], b: list[str], max_tokens: int):
    """``[CLS] a [SEP] b [SEP]`` ids, mask and token types (0 up to the first sep, 1 after),
    padded to ``2 * max_tokens``."""
    cls, sep, pad = _specials(tok)
    ca, cb = encode_sides(tok, a, max_tokens), encode_sides(tok, b, max_tokens)
    rows = [[cls, *x, sep, *y, sep] for x, y in zip(ca, cb)]
    ids, mask = _pad(rows, 2 * max_tokens, pad)
    types = torch.zeros_like(ids)
    for i, x in enumerate(ca):
        types[i, len(x) + 2:len(rows[i])] = 1
    return ids, mask, types


def paraphrase_dataset(split: str, *, tokenizer: str = "minilm", max_tokens: int = 32,
                       orders: str = "ab", hide_labels: bool = False, n_lines: int | None = None,
                       drop: float = 0.5, shuffle: bool = True, negatives: str = "mixed",
                       max_words: int = 16, min_words: int = 4, seed: int = 0, root=None,
                       block_turns: int = 40, split_seed: int = 0, max_chars: int | None = None,
                       vocab_size: int = 2000, cache_dir: str = "runs/cache/tokenizers"
                       ) -> Dataset:
    """The tokenized pairs of ``split`` (module docstring)."""
    from .turns import _tokenizer, turn_pairs

    _check("max_tokens", max_tokens, _int(max_tokens) and 4 <= max_tokens <= 256,
           "an integer in 4..256 (per side; pairs get twice that)")
    _check("orders", orders, orders in ORDERS, f"one of {', '.join(ORDERS)}")
    kw = dict(n_lines=n_lines, drop=drop, shuffle=shuffle, negatives=negatives,
              max_words=max_words, min_words=min_words, seed=seed, root=root,
              block_turns=block_turns, split_seed=split_seed, max_chars=max_chars)
    rows = paraphrase_pairs(split, **kw)
    train_text = ""
    if tokenizer in ("bpe", "char"):  # a tokenizer trained here reads the train turns only
        train_text = "\n".join(q for q, _ in turn_pairs(
            "train", root=root, block_turns=block_turns, split_seed=split_seed,
            max_chars=max_chars))
    tok = _tokenizer(tokenizer, train_text, vocab_size, cache_dir)
    a, b = [r[0] for r in rows], [r[1] for r in rows]
    gold = torch.tensor([r[2] for r in rows], dtype=torch.long)
    if orders == "both":
        a, b, gold = a + b, b + a, torch.cat([gold, gold])
    a_ids, a_mask = side_tensors(tok, a, max_tokens)
    b_ids, b_mask = side_tensors(tok, b, max_tokens)
    p_ids, p_mask, p_types = pair_tensors(tok, a, b, max_tokens)
    y = torch.full_like(gold, IGNORE_INDEX) if hide_labels else gold.clone()
    data = Dataset(
        {"a_ids": a_ids, "a_mask": a_mask, "b_ids": b_ids, "b_mask": b_mask,
         "pair_ids": p_ids, "pair_mask": p_mask, "pair_types": p_types, "y": y},
        {"a_ids": "tokens", "a_mask": "value", "b_ids": "tokens", "b_mask": "value",
         "pair_ids": "tokens", "pair_mask": "value", "pair_types": "value", "y": "label"},
        name="shakespeare-paraphrase", split=split, num_classes=2,
        info={"construction": "tiny Shakespeare turns vs their word-dropout/shuffle "
              f"perturbation (positive) or another line (negative: {negatives}); drop {drop}, "
              f"shuffle {shuffle}, first {max_words} words, seed {seed}",
              "pairs": len(rows), "orders": orders, "tokenizer": tokenizer,
              "max_tokens": max_tokens, "labels_hidden": bool(hide_labels)})
    data.texts = {"a": a, "b": b}
    data.gold = gold
    data.tokenizer = tok
    return data


def with_features(data: Dataset, encode, prefix: str = "emb",
                  texts: dict | None = None) -> Dataset:
    """``data`` plus ``{prefix}_a`` / ``{prefix}_b``: ``encode(list of distinct texts) ->
    (N, D)`` embeddings of each pair's sides (a frozen encoder run once per text).
    ``texts`` (default ``data.texts``) maps ``"a"`` / ``"b"`` (or the two keys of a
    retrieval source, e.g. ``"query"`` / ``"gallery"``) to the rows' strings."""
    texts = texts if texts is not None else getattr(data, "texts", None)
    if not isinstance(texts, dict) or len(texts) != 2:
        raise ConfigError("features.texts", None if texts is None else list(texts),
                          "the two sides' strings, e.g. data.texts of a pair dataset")
    (_, ta), (_, tb) = texts.items()
    if len(ta) != len(data) or len(tb) != len(data):
        raise ConfigError("features.texts", (len(ta), len(tb)), f"{len(data)} rows per side")
    uniq = list(dict.fromkeys([*ta, *tb]))
    where = {t: i for i, t in enumerate(uniq)}
    emb = torch.as_tensor(encode(uniq)).float()
    if emb.dim() != 2 or len(emb) != len(uniq):
        raise ConfigError("features.encode", tuple(emb.shape), f"({len(uniq)}, D) embeddings")
    ia = torch.tensor([where[t] for t in ta])
    ib = torch.tensor([where[t] for t in tb])
    tensors = {**data.tensors, f"{prefix}_a": emb[ia], f"{prefix}_b": emb[ib]}
    kinds = {**data.kinds, f"{prefix}_a": "value", f"{prefix}_b": "value"}
    out = Dataset(tensors, kinds, name=data.name, split=data.split,
                  num_classes=data.num_classes, info=dict(data.info))
    for attr in ("texts", "gold", "tokenizer"):
        if hasattr(data, attr):
            setattr(out, attr, getattr(data, attr))
    return out


def _register() -> None:
    from typing import Literal

    from ..registry import DATASETS
    from ..schema import Count, Prob, Seed

    @DATASETS.register(
        "shakespeare_paraphrase",
        description="tiny Shakespeare turns vs their word-dropout/shuffle perturbation "
        "(positive) or another line (negative), split by contiguous blocks of turns; pair AUC",
        splits=True,
        task="pair_auc",
    )
    def _shakespeare_paraphrase(
        split,
        root: str | None = None,
        split_seed: Seed = 0,
        tokenizer: Literal["minilm", "bpe", "char"] = "minilm",
        max_tokens: Count = 32,
        orders: Literal["ab", "both"] = "ab",
        hide_labels: bool = False,
        n_lines: Count | None = None,
        drop: Prob = 0.5,
        shuffle: bool = True,
        negatives: Literal["random", "next", "mixed"] = "mixed",
        max_words: Count = 16,
        min_words: Count = 4,
        seed: Seed = 0,
        block_turns: Count = 40,
        max_chars: Count | None = None,
        vocab_size: Count = 2000,
        cache_dir: str = "runs/cache/tokenizers",
    ):
        return paraphrase_dataset(
            split, root=root, split_seed=split_seed, tokenizer=tokenizer,
            max_tokens=max_tokens, orders=orders, hide_labels=hide_labels, n_lines=n_lines,
            drop=drop, shuffle=shuffle, negatives=negatives, max_words=max_words,
            min_words=min_words, seed=seed, block_turns=block_turns, max_chars=max_chars,
            vocab_size=vocab_size, cache_dir=cache_dir)


_register()
