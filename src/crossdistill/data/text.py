"""Text for language modelling: tiny Shakespeare (embedded), contiguous splits, LM blocks.

Position-aligned targets: ``labels[t]`` is the token *after* ``input_ids[t]`` (the last
position of a block takes the next block's first token; -100 at the very end), so losses
and metrics never shift, and ``token_bytes[t]`` is the UTF-8 byte count of ``labels[t]``
for exact bits per byte. Blocks do not overlap; the tail of fewer than ``block`` tokens
is dropped (it is only scored as the last label of the final block).

:func:`lm_dataset` holds a split in memory; for corpora that do not fit,
:func:`write_tokens` writes a flat token file once and :class:`TokenBlocks` reads the same
blocks from a memory map, one at a time.
"""

from __future__ import annotations

import json
import lzma
import math
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from .dataset import IGNORE_INDEX, Dataset

ASSET = "assets/tinyshakespeare.txt.xz"
SPLIT_NAMES = ("train", "val", "test")
LM_KINDS = {"input_ids": "tokens", "labels": "tokens", "token_bytes": "value",
            "attention_mask": "mask"}


def shakespeare(path=None) -> str:
    """Tiny Shakespeare (Karpathy's char-rnn corpus, public domain, ~1.1M chars) from the
    package itself, so it works offline; or the text of a user's plain-text file (a
    directory is read as its ``input.txt``)."""
    if path is None:
        from importlib.resources import files

        return lzma.decompress(files("crossdistill.data").joinpath(ASSET).read_bytes()).decode()
    p = Path(path)
    if p.is_dir():
        if not (p / "input.txt").is_file():
            names = ", ".join(sorted(f.name for f in p.iterdir())[:10]) or "none"
            raise ConfigError(
                "data.root", str(path),
                f"a plain-text file, or a directory holding input.txt; found: {names}",
            )
        p = p / "input.txt"
    if not p.is_file():
        raise ConfigError("data.root", str(path), "no such file; a UTF-8 plain-text file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        msg = f"a UTF-8 plain-text file (byte {err.start} is not valid UTF-8)"
        raise ConfigError("data.root", str(path), msg) from None
    if not text:
        raise ConfigError("data.root", str(path), "a non-empty UTF-8 plain-text file")
    return text


def contiguous_split(text: str, fractions=(0.9, 0.05, 0.05)) -> dict[str, str]:
    """Train / val / test as contiguous character ranges, in that order (so no held-out
    passage leaks into training through overlap, unlike a random split of lines). Train a
    tokenizer on the ``train`` part only: held-out text must be unseen by it too."""
    fr = tuple(fractions)
    numbers = all(isinstance(f, (int, float)) and f >= 0 for f in fr)
    if len(fr) != 3 or not numbers or not math.isclose(sum(fr), 1.0, abs_tol=1e-6) or fr[0] <= 0:
        raise ConfigError("data.fractions", fractions,
                          "three non-negative numbers (train, val, test) summing to 1, train > 0")
    n = len(text)
    a = int(round(n * fr[0]))
    b = int(round(n * (fr[0] + fr[1])))
    return {"train": text[:a], "val": text[a:b], "test": text[b:]}


def _tokens(tokenizer, text: str):
    from ..text.tokenizer import encode_with_bytes

    ids, nbytes = encode_with_bytes(tokenizer, text)
    return np.asarray(ids, dtype=np.int64), np.asarray(nbytes, dtype=np.int64)


def _blocks(ids: np.ndarray, nbytes: np.ndarray, start: int, count: int, block: int):
    """``count`` blocks from block index ``start``: inputs, next-token labels, label bytes."""
    lo, hi = start * block, (start + count) * block
    x = np.asarray(ids[lo:hi], dtype=np.int64)
    y = np.full(hi - lo, IGNORE_INDEX, dtype=np.int64)
    yb = np.zeros(hi - lo, dtype=np.int64)
    nxt = np.asarray(ids[lo + 1 : hi + 1], dtype=np.int64)
    y[: len(nxt)] = nxt
    yb[: len(nxt)] = np.asarray(nbytes[lo + 1 : hi + 1], dtype=np.int64)
    shape = (count, block)
    return {
        "input_ids": torch.from_numpy(x.reshape(shape)),
        "labels": torch.from_numpy(y.reshape(shape)),
        "token_bytes": torch.from_numpy(yb.reshape(shape)),
        "attention_mask": torch.ones(shape, dtype=torch.long),
    }


def _check_block(block, n_tokens: int, field: str = "data.params.block") -> None:
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ConfigError(field, block, "a positive integer")
    if n_tokens < block:
        raise ConfigError(field, block, f"the text has only {n_tokens} tokens; use a smaller block")


def lm_dataset(text: str, tokenizer, block: int = 64, name: str = "shakespeare",
               split: str = "train") -> Dataset:
    """Non-overlapping ``block``-token windows of ``text`` with aligned next-token labels
    and label byte counts (see the module docstring); ``num_classes`` = vocabulary size."""
    ids, nbytes = _tokens(tokenizer, text)
    _check_block(block, len(ids))
    n = len(ids) // block
    t = _blocks(ids, nbytes, 0, n, block)
    info = {"block": block, "tokens": int(len(ids)), "bytes": int(nbytes.sum()),
            "scored_bytes": int(t["token_bytes"].sum()), "vocab_size": len(tokenizer)}
    return Dataset(t, LM_KINDS, name=name, split=split, num_classes=len(tokenizer), info=info)


# -- streaming: a flat token file read through a memory map ------------------------------


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _bytes_path(path: Path) -> Path:
    return path.with_name(path.name + ".bytes")


def write_tokens(ids, nbytes, path, *, vocab_size: int | None = None, append: bool = False) -> Path:
    """Write token ids to ``path`` (raw ``uint16`` when the vocabulary fits, else ``int32``),
    their byte counts to ``path.bytes`` and a JSON sidecar ``path.json`` (dtypes, counts).
    ``append=True`` adds a chunk to an existing file, so a corpus larger than memory can be
    tokenized piece by piece (split chunks at document or line boundaries)."""
    path = Path(path)
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    nbytes = np.asarray(nbytes, dtype=np.int64).reshape(-1)
    if len(ids) != len(nbytes):
        raise ConfigError("nbytes", len(nbytes), f"one byte count per token ({len(ids)})")
    if len(ids) and (ids.min() < 0 or nbytes.min() < 0):
        raise ConfigError("ids", int(min(ids.min(), nbytes.min())), "non-negative ids and bytes")
    meta = None
    if append and _sidecar(path).is_file():
        meta = json.loads(_sidecar(path).read_text())
    if meta is None:
        vocab = vocab_size if vocab_size is not None else int(ids.max()) + 1 if len(ids) else 1
        meta = {"format": "crossdistill-tokens/1", "n_tokens": 0, "vocab_size": int(vocab),
                "dtype": "uint16" if vocab <= 65535 else "int32", "bytes_dtype": "uint16"}
        mode = "wb"
    else:
        mode = "ab"
    if len(ids) and ids.max() >= meta["vocab_size"]:
        raise ConfigError("ids", int(ids.max()), f"ids below vocab_size {meta['vocab_size']}")
    if len(nbytes) and nbytes.max() > 65535:
        raise ConfigError("nbytes", int(nbytes.max()), "at most 65535 bytes per token")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, mode) as f:
        f.write(ids.astype(meta["dtype"]).tobytes())
    with open(_bytes_path(path), mode) as f:
        f.write(nbytes.astype(meta["bytes_dtype"]).tobytes())
    meta["n_tokens"] += int(len(ids))
    _sidecar(path).write_text(json.dumps(meta, indent=1))
    return path


class TokenBlocks(torch.utils.data.Dataset):
    """Map-style dataset of the blocks :func:`lm_dataset` would make from the same tokens,
    read from a memory map (opened lazily per process, so DataLoader workers never copy
    the file). Items are dicts of per-sample tensors: input_ids, labels, token_bytes,
    attention_mask (each ``(block,)``) and idx."""

    kinds = {**LM_KINDS, "idx": "id"}

    def __init__(self, path, block: int = 64):
        self.path = Path(path)
        if not _sidecar(self.path).is_file() or not self.path.is_file():
            raise ConfigError("data.path", str(path),
                              "a token file written by write_tokens (with its .json and .bytes)")
        self.meta = json.loads(_sidecar(self.path).read_text())
        self.block = block
        _check_block(block, self.meta["n_tokens"], "data.block")
        self.num_classes = int(self.meta["vocab_size"])
        self._ids = self._nbytes = None

    def _open(self):
        if self._ids is None:
            n = self.meta["n_tokens"]
            self._ids = np.memmap(self.path, dtype=self.meta["dtype"], mode="r", shape=(n,))
            self._nbytes = np.memmap(_bytes_path(self.path), dtype=self.meta["bytes_dtype"],
                                     mode="r", shape=(n,))
        return self._ids, self._nbytes

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_ids"] = state["_nbytes"] = None
        return state

    def __len__(self) -> int:
        return self.meta["n_tokens"] // self.block

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"block {i} out of range ({n} blocks)")
        ids, nbytes = self._open()
        out = {k: v[0] for k, v in _blocks(ids, nbytes, i, 1, self.block).items()}
        out["idx"] = torch.tensor(i)
        return out
