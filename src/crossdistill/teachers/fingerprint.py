"""Fingerprints that tie stored teacher signals to exactly one teacher, dataset and transform."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def weights_hash(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (names, dtypes, shapes, bytes), 16 hex chars."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        _update(h, name, t)
    return h.hexdigest()[:16]


def _update(h, name: str, t: torch.Tensor) -> None:
    """Feed one named tensor (name, dtype, shape, raw bytes) into the hash ``h``."""
    t = t.detach().cpu().contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())


def transform_description(data) -> dict:
    """What was done to the raw inputs before the teacher saw them (no random parts): for
    images the size and normalisation, for text the tokenizer (its cache name: kind, size and
    a hash of its training text) and the block length (the context)."""
    info = data.info
    tok = info.get("tokenizer")
    return {
        "dataset": data.name,
        "split": data.split,
        "img_size": info.get("img_size"),
        "normalize": {
            "mean": round(info.get("mean", 0.0), 6),
            "std": round(info.get("std", 1.0), 6),
        },
        "split_seed": info.get("split_seed"),
        "augment": None,
        "tokenizer": None if tok is None else str(tok).replace("\\", "/").rsplit("/", 1)[-1],
        "block": info.get("block"),
    }


def inputs_fingerprint(data, keys) -> str:
    """SHA-256 over the sample ids and the tensors the teacher reads (names, dtypes, shapes,
    bytes), 16 hex chars. Labels are left out on purpose: stored signals depend only on the
    inputs, so a store made on the full split also serves a run that hides some labels."""
    h = hashlib.sha256()
    for k in ("idx", *keys):
        _update(h, k, data.tensors[k])
    return h.hexdigest()[:16]
