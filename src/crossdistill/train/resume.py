"""Resuming a run: refuse a config that differs from the one the run started with, and
clear the temp files a kill left behind.

A resumed run is only the uninterrupted run continued when every setting is the same, so a
changed seed, lr, epoch count or student is refused (with the list of changes) unless the
user says so explicitly (``--allow-changed`` / ``fit(resume=True, allow_changed=True)``).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ..errors import ConfigError

# settings that change neither the weights nor the metrics
IGNORED = frozenset({"progress", "num_workers", "log"})
MAX_LISTED = 8


def flatten(value, prefix: str = "") -> dict:
    """``{"a": {"b": [1, 2]}}`` -> ``{"a.b.0": 1, "a.b.1": 2}`` (YAML field paths)."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return {prefix: value}
    out = {}
    for k, v in items:
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out if out or not prefix else {prefix: value}


def changes(old: dict, new: dict) -> list[str]:
    """``field: old -> new`` for every setting that differs (ignoring :data:`IGNORED`)."""
    a, b = flatten(old), flatten(new)
    out = []
    for key in list(a) + [k for k in b if k not in a]:
        if key.split(".")[-1] in IGNORED or a.get(key, "(unset)") == b.get(key, "(unset)"):
            continue
        out.append(f"{key}: {a.get(key, '(unset)')} -> {b.get(key, '(unset)')}")
    return out


def refuse_changes(found: list[str], override: str) -> None:
    if not found:
        return
    shown = ", ".join(found[:MAX_LISTED])
    more = f" (+{len(found) - MAX_LISTED} more)" if len(found) > MAX_LISTED else ""
    raise ConfigError(
        "--resume",
        f"changed config: {shown}{more}",
        "resuming continues the same run only with the config it started with; resume "
        f"with the original config and --set values, pass {override} to resume with these "
        "changes anyway, or train into a new --out",
    )


def stored_config(run_dir: str | Path) -> dict | None:
    """The run's config.yaml, validated and dumped like a new config (defaults filled in);
    None when there is none or it does not parse (then the checkpoint's settings decide)."""
    from .. import config as C

    path = Path(run_dir) / "config.yaml"
    try:
        raw = yaml.safe_load(path.read_text())
        return C.validate(raw).model_dump(mode="json")
    except (OSError, yaml.YAMLError, ConfigError, TypeError, ValueError, AttributeError):
        return None


def check_run_config(run_dir: str | Path, cfg, allow_changed: bool = False) -> None:
    """CLI: the new :class:`RunConfig` against the run directory's config.yaml."""
    old = stored_config(run_dir)
    if old is not None and not allow_changed:
        refuse_changes(changes(old, cfg.model_dump(mode="json")), "--allow-changed")


def check_train_config(stored: dict, current: dict, allow_changed: bool = False) -> None:
    """Trainer: the checkpoint's training settings against this run's (Python API)."""
    if allow_changed:
        return
    common = {k: stored[k] for k in stored if k in current}
    now = {k: current[k] for k in common}
    refuse_changes(changes(common, now), "allow_changed=True (CLI: --allow-changed)")


def clean_temp(run_dir: str | Path) -> list[Path]:
    """Remove ``.*.tmp`` files (atomic writes a kill interrupted); returns what went."""
    run_dir = Path(run_dir)
    gone = [p for p in run_dir.glob(".*.tmp") if p.is_file()]
    for p in gone:
        p.unlink(missing_ok=True)
    return gone
