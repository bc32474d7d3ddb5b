"""Text tooling: tokenizers trained here (byte-level BPE, characters) in Hugging Face format,
and exact per-token UTF-8 byte counts so bits per byte compares different tokenizers."""

from .tokenizer import (
    SPECIAL,
    encode_with_bytes,
    load_tokenizer,
    require_pad,
    train_bpe,
    train_char,
)

__all__ = [
    "SPECIAL", "encode_with_bytes", "load_tokenizer", "require_pad", "train_bpe", "train_char"
]
