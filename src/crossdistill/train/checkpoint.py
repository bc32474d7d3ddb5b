"""Atomic training checkpoints and resume.

A checkpoint is one file written to a temp name and renamed into place, so a run killed at
any instant leaves either the previous checkpoint or the new one, never a torn file. It holds
tensors and plain Python values only and is read with ``torch.load(weights_only=True)``,
which refuses pickled code; model weights for users are exported separately as safetensors.

``CROSSDISTILL_CKPT_PAUSE=<seconds>`` (a testing hook) sleeps between writing the temp file
and renaming it, so a kill test can land SIGKILLs inside checkpoint writes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from ..errors import ConfigError
from ..io import atomic_path


def save(state: dict, path: str | os.PathLike) -> None:
    tmp = atomic_path(path)
    try:
        torch.save(state, tmp)
        pause = os.environ.get("CROSSDISTILL_CKPT_PAUSE")
        if pause:
            time.sleep(float(pause))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: str | os.PathLike, field: str = "resume") -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(field, str(path), "no checkpoint there; run without --resume first")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated or pickled-code files all end here
        raise ConfigError(
            field, str(path), f"not a readable crossdistill checkpoint ({err})"
        ) from None
