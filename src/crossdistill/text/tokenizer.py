"""Tokenizers trained here, saved in Hugging Face format, and exact per-token byte counts.

Both kinds are built with the ``tokenizers`` library and wrapped as a
``PreTrainedTokenizerFast`` (``TokenizersBackend`` in transformers 5), so a saved directory
loads with ``transformers.AutoTokenizer.from_pretrained(dir)`` and HF models and our own
code see the same object. ``<|endoftext|>`` is the one special token, used as bos, eos
and pad (GPT-2's convention), so no pad id ever collides with a real character.

Bits per byte divides the summed NLL by the UTF-8 bytes the scored tokens cover, which is
only meaningful if those byte counts are exact: :func:`encode_with_bytes` guarantees
``sum(nbytes) == len(text.encode("utf-8"))`` for any tokenizer whose offsets are monotone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import ConfigError, describe

SPECIAL = "<|endoftext|>"  # bos = eos = pad
UNK = "<unk>"  # char tokenizer only: characters never seen in the training text
MIN_BPE_VOCAB = 257  # 256 byte tokens + the special token


def _wrap(backend, out_dir, *, unk: str | None = None):
    from transformers import PreTrainedTokenizerFast

    kwargs = dict(bos_token=SPECIAL, eos_token=SPECIAL, pad_token=SPECIAL)
    if unk is not None:
        kwargs["unk_token"] = unk
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, clean_up_tokenization_spaces=False, **kwargs
    )
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(out_dir))
    return tok


def _check_text(text, field: str) -> None:
    if not isinstance(text, str) or not text:
        raise ConfigError(field, type(text).__name__, "a non-empty str to train the tokenizer on")


def train_bpe(text: str, vocab_size: int, out_dir=None):
    """Byte-level BPE (GPT-2 style, no prefix space): every UTF-8 byte is in the base
    vocabulary, so any text encodes without unknowns and decodes back exactly.
    ``vocab_size`` counts the 256 bytes and the special token; a small text can end with
    fewer merges than asked for. Saved to ``out_dir`` (HF format) when given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    _check_text(text, "tokenizer.text")
    is_int = isinstance(vocab_size, int) and not isinstance(vocab_size, bool)
    if not is_int or vocab_size < MIN_BPE_VOCAB:
        raise ConfigError(
            "tokenizer.vocab_size", vocab_size,
            f"an integer >= {MIN_BPE_VOCAB} (256 byte tokens + {SPECIAL})",
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([text], trainer)
    return _wrap(backend, out_dir)


def train_char(text: str, out_dir=None):
    """One token per character of ``text`` (sorted, so the vocabulary is a pure function of
    the character set), plus ``<|endoftext|>`` (id 0) and ``<unk>`` (id 1) for characters
    absent from the training text (e.g. in a held-out split). Decoding is exact for every
    seen character: tokens are joined with nothing in between."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    _check_text(text, "tokenizer.text")
    chars = sorted(set(text) - {SPECIAL, UNK})
    vocab = {SPECIAL: 0, UNK: 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([SPECIAL, UNK])
    return _wrap(backend, out_dir, unk=UNK)


MAX_TOKENIZER_BYTES = 200_000_000  # 200 MB: large HF vocabularies are ~20 MB


def _check_tokenizer_json(p: Path, field: str, files: str) -> None:
    """``tokenizer.json`` must be a JSON object with a ``model`` section (the ``tokenizers``
    format); bad UTF-8/JSON or another kind of JSON file is one line naming what it is."""
    try:
        if p.stat().st_size > MAX_TOKENIZER_BYTES:
            raise ConfigError(field, str(p), f"larger than {MAX_TOKENIZER_BYTES:,} bytes")
        spec = json.loads(p.read_bytes())
    except json.JSONDecodeError as err:
        raise ConfigError(
            field, str(p), f"{p.name} is not valid JSON (line {err.lineno}, column {err.colno}: "
            f"{err.msg}); files present: {files}"
        ) from None
    except (UnicodeDecodeError, OSError) as err:
        why = getattr(err, "strerror", None) or "not UTF-8 text"
        raise ConfigError(field, str(p), f"{p.name} is unreadable ({why})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        keys = ", ".join(list(spec)[:6]) if isinstance(spec, dict) else type(spec).__name__
        raise ConfigError(
            field, str(p), f"{p.name} is JSON but not a tokenizer (no 'model' section; it has "
            f"{keys}); give a tokenizer.json saved by the tokenizers library"
        )


def load_tokenizer(path, field: str = "tokenizer"):
    """A tokenizer from a Hugging Face directory (or a bare ``tokenizer.json``), offline."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(field, str(path), "no such path; expected a tokenizer directory "
                          "(tokenizer.json, tokenizer_config.json) or a tokenizer.json file")
    names = sorted(f.name for f in p.iterdir())[:20] if p.is_dir() else [p.name]
    files = ", ".join(names) or "none"
    if p.is_file():
        _check_tokenizer_json(p, field, files)
    elif (p / "tokenizer.json").is_file():
        _check_tokenizer_json(p / "tokenizer.json", field, files)
    elif not any((p / n).is_file() for n in ("tokenizer_config.json", "vocab.json",
                                              "tokenizer.model", "vocab.txt")):
        raise ConfigError(field, str(path), "a directory without a tokenizer (no tokenizer.json "
                          f"or tokenizer_config.json); files present: {files}")
    try:
        if p.is_file():
            from tokenizers import Tokenizer
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast(
                tokenizer_object=Tokenizer.from_file(str(p)), clean_up_tokenization_spaces=False
            )
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as err:  # corrupt JSON, missing files, unknown class: one clear line
        raise ConfigError(
            field, str(path),
            f"not a loadable tokenizer ({describe(err, 200)}); files present: {files}",
        ) from None


def require_pad(tok, field: str = "tokenizer"):
    """``tok`` itself if it has a pad token (batching variable-length text needs one)."""
    if getattr(tok, "pad_token_id", None) is None:
        name = getattr(tok, "name_or_path", "") or type(tok).__name__
        raise ConfigError(
            field, name,
            "a tokenizer with no pad token where one is needed; set tok.pad_token "
            "(e.g. to its eos token) or use one trained here",
        )
    return tok


# -- exact byte counts -------------------------------------------------------------------


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte <-> printable-character table, inverted: vocab char -> byte value."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_OF = _bytes_to_unicode()


def _backend(tok):
    return getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None) or tok


def _is_byte_level(backend) -> bool:
    try:
        spec = json.loads(backend.to_str())
    except Exception:
        return False
    dec = spec.get("decoder") or {}
    parts = dec.get("decoders", [dec]) if dec.get("type") == "Sequence" else [dec]
    return any(d.get("type") == "ByteLevel" for d in parts if d) and spec.get("normalizer") is None


def _char_byte_starts(text: str) -> np.ndarray:
    """``starts[i]`` = UTF-8 byte offset of character ``i`` (length len(text) + 1)."""
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    width = 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)
    return np.concatenate([[0], np.cumsum(width)])


def encode_with_bytes(tok, text: str) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` (no special tokens added) and the UTF-8 bytes each token covers.

    From the character offsets: each token gets the bytes from the end of the text covered
    so far to its own end (text a tokenizer skips, e.g. stripped spaces, goes to the next
    token; anything after the last token to the last one). Byte-level BPE splits a
    multi-byte character over several tokens with the same offsets; there each token's
    own byte length is exact and is used instead. Either way the counts sum to
    ``len(text.encode("utf-8"))``, which is checked."""
    if not isinstance(text, str):
        raise ConfigError("text", type(text).__name__, "a str")
    backend = _backend(tok)
    enc = backend.encode(text, add_special_tokens=False)
    ids = list(enc.ids)
    total = len(text.encode("utf-8"))
    if not ids:
        if total:
            raise ConfigError("tokenizer", text[:40], "produced no tokens for non-empty text")
        return [], []
    starts = _char_byte_starts(text)
    ends = starts[np.asarray([e for _, e in enc.offsets], dtype=np.int64)]
    covered = np.maximum.accumulate(ends)
    nbytes = np.diff(np.concatenate([[0], covered]))
    nbytes[-1] += total - covered[-1]
    if _is_byte_level(backend):
        added = set(backend.get_added_tokens_decoder())
        own = [
            int(n) if i in added else len(t) if all(c in _BYTE_OF for c in t) else -1
            for i, t, n in zip(ids, enc.tokens, nbytes)
        ]
        if min(own) >= 0 and sum(own) == total:
            nbytes = np.asarray(own)
    nbytes = [int(n) for n in nbytes]
    if sum(nbytes) != total or min(nbytes) < 0:
        raise ConfigError("tokenizer", getattr(tok, "name_or_path", type(tok).__name__),
                          "offsets are not monotone; byte counts (bits per byte) can't be exact")
    return ids, nbytes
