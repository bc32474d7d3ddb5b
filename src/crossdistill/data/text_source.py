"""The ``shakespeare`` source: LM blocks of tiny Shakespeare with a tokenizer trained here.

The text (embedded, or a user's plain-text file via ``root``) is split into contiguous
train / val / test ranges of 90 / 5 / 5 % of the characters, in that order
(``data.text.contiguous_split``); ``max_chars`` first keeps only a prefix (toy runs). The
tokenizer (``bpe`` at ``vocab_size``, or ``char``) is trained on the train range only and
cached under ``cache_dir`` by a hash of (text, kind, vocab size), in Hugging Face format.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import ConfigError
from ..schema import Count, Width

KINDS = ("bpe", "char")


def tokenizer_for(train_text: str, kind: str, vocab_size: int, cache_dir: str | Path):
    from ..text.tokenizer import load_tokenizer, train_bpe, train_char

    if kind not in KINDS:
        raise ConfigError("data.params.tokenizer", kind, f"allowed: {', '.join(KINDS)}")
    key = hashlib.sha256(f"{kind}/{vocab_size}/".encode() + train_text.encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"{kind}-{vocab_size}-{key}"
    if (path / "tokenizer.json").is_file():
        return load_tokenizer(path), path
    tok = (
        train_bpe(train_text, vocab_size, out_dir=path)
        if kind == "bpe"
        else train_char(train_text, out_dir=path)
    )
    return tok, path


def shakespeare_split(
    split: str,
    *,
    root: str | None = None,
    tokenizer: str = "bpe",
    vocab_size: Count = 512,
    block: Width = 64,
    max_chars: int | None = None,
    cache_dir: str = "runs/cache/tokenizers",
):
    from .text import contiguous_split, lm_dataset, shakespeare

    text = shakespeare(root)
    if max_chars is not None:
        if not isinstance(max_chars, int) or max_chars < 1000:
            raise ConfigError("data.params.max_chars", max_chars, "an integer >= 1000")
        text = text[:max_chars]
    if not isinstance(block, int) or not 2 <= block <= 4096:
        raise ConfigError("data.params.block", block, "an integer in 2..4096")
    parts = contiguous_split(text)
    tok, path = tokenizer_for(parts["train"], tokenizer, int(vocab_size), cache_dir)
    data = lm_dataset(parts[split], tok, block=block, name="shakespeare", split=split)
    data.info.update(tokenizer=str(path), tokenizer_kind=tokenizer, chars=len(parts[split]))
    data.tokenizer = tok
    return data
