"""Fingerprints that tie stored teacher signals to exactly one teacher, dataset and transform."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def weights_hash(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (names, dtypes, shapes, bytes), 16 hex chars."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def transform_description(data) -> dict:
    """What was done to the raw images before the teacher saw them (no random parts)."""
    info = data.info
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
    }
