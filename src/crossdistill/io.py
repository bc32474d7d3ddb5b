"""Safe weight files: safetensors only, written atomically; never unpickle user files."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import ConfigError


def _umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """0666 less the umask: the mode ``open()`` gives a new file."""
    return 0o666 & ~_umask()


def atomic_path(path: str | os.PathLike):
    """A temp file beside ``path``; ``os.replace`` it into place once fully written.

    ``mkstemp`` creates it 0600; it gets the mode a plain ``open`` would give (0666 less
    the umask), so weights and checkpoints are readable like any other file the user writes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
    finally:
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
        os.chmod(tmp, file_mode())  # safetensors re-creates the file 0600
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return Path(path)


def load_weights(path: str | os.PathLike, field: str = "checkpoint") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "file not found"
        raise ConfigError(field, str(path), f"{what}; give a .safetensors file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        why = str(err).removeprefix("Error while deserializing header: ")
        raise ConfigError(field, str(path), f"not a readable safetensors file ({why})") from None


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
