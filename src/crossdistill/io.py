"""Safe weight files: safetensors only, written atomically; never unpickle user files."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import ConfigError


def atomic_path(path: str | os.PathLike):
    """A temp file beside ``path``; ``os.replace`` it into place once fully written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def save_weights(
    state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Write tensors as safetensors, atomically (temp file + rename)."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    tmp = atomic_path(path)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return Path(path)


def load_weights(path: str | os.PathLike, field: str = "checkpoint") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(field, str(path), "file not found; give a .safetensors file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ConfigError(field, str(path), f"not a readable safetensors file ({err})") from None


def load_into(model: torch.nn.Module, path: str | os.PathLike, field: str = "checkpoint") -> None:
    state = load_weights(path, field)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or bad:
        raise ConfigError(
            field,
            str(path),
            "weights do not fit this model: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}, shape mismatch {bad[:3]}",
        )
    model.load_state_dict(state)
