"""Where a run writes: checked before any work, so a bad ``--out`` is one line, not a
traceback after the data and models are built."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError

SYSTEM_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))  # pseudo-filesystems
MAX_NAME = 255  # bytes in one path component on common filesystems


def _under(p: Path, root: Path) -> bool:
    return p == root or root in p.parents


def check_out_dir(path, field: str = "--out") -> Path:
    """``path`` as a directory a run can create and write, else a ConfigError naming why:
    an existing file, a system pseudo-filesystem, a file on the way, no write permission
    or a read-only mount."""
    text = str(path)
    if not text or "\x00" in text:
        raise ConfigError(field, text, "a directory path (non-empty, no NUL byte)")
    p = Path(text)
    absolute, real = Path(os.path.abspath(p)), Path(os.path.realpath(p))
    for root in SYSTEM_ROOTS:
        if _under(absolute, root) or _under(real, root):
            raise ConfigError(
                field, text, f"under {root}, a system pseudo-filesystem; give a directory on disk"
            )
    long = [c for c in absolute.parts if len(os.fsencode(c)) > MAX_NAME]
    if long:
        raise ConfigError(field, text, f"a path component is longer than {MAX_NAME} bytes")
    if p.exists() and not p.is_dir():
        raise ConfigError(field, text, "exists and is a file, not a directory")
    existing = absolute
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(field, text, f"{existing} is a file, so no directory can be made in it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            field, text, f"{existing} is not writable (permissions or a read-only mount)"
        )
    return p


def default_out_dir(cfg) -> Path:
    """``out_dir`` of the config, else ``runs/<name>`` (the config file's stem); a name that
    would leave ``runs/`` (``../x``, ``a/b``) is refused."""
    if getattr(cfg, "out_dir", None):
        return check_out_dir(cfg.out_dir, "out_dir")
    name = str(cfg.name or cfg.digest())
    parts = name.replace("\\", "/").split("/")
    if len(parts) > 1 or name in (".", "..") or "\x00" in name:
        raise ConfigError(
            "name", name, "a plain run name (no '/' or '\\', not '.' or '..'): it names "
            "runs/<name>; to write elsewhere set out_dir or --out"
        )
    return check_out_dir(Path("runs") / name, "name")
