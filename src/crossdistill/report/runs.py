"""Reading finished run directories for reports: read-only, tolerant of a torn last log line,
and every unreadable file one :class:`ConfigError` naming it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError("run_dir", str(path), f"not a readable JSON file ({err})") from None
    if not isinstance(value, dict):
        raise ConfigError("run_dir", str(path), "not a JSON object")
    return value


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """The rows of a metrics log and how many lines were unreadable (a kill can tear one)."""
    from ..train.metrics import read_rows

    try:
        rows, bad = read_rows(path)
    except OSError as err:
        raise ConfigError("run_dir", str(path), f"cannot read ({err.strerror})") from None
    kept = [r for r in rows if isinstance(r.get("epoch"), int)]
    return kept, bad + len(rows) - len(kept)


def finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class Run:
    """One run directory as a report sees it."""

    path: Path
    label: str
    rows: list[dict] = field(default_factory=list)
    results: dict = field(default_factory=dict)
    config: str | None = None  # config.yaml's text
    skipped: int = 0  # unreadable metrics lines
    teacher: dict[str, float] = field(default_factory=dict)  # teacher name -> val metric
    teacher_note: str = ""  # where the teacher's value came from, or why there is none

    @property
    def task(self) -> dict:
        t = self.results.get("task")
        return t if isinstance(t, dict) else {}

    @property
    def metric(self) -> str:
        """The task's selection metric (from results.json, else from the logged columns)."""
        if self.task.get("select"):
            return self.task["select"]
        found = next((k[9:] for k in self.results if k.startswith("best_val_")), None)
        if found:
            return found
        keys = self.rows[0] if self.rows else {}
        return "acc" if "val_acc" in keys else "loss"

    @property
    def mode(self) -> str:
        return self.task.get("mode") or ("min" if self.metric in ("loss", "bpb", "ppl") else "max")

    @property
    def columns(self) -> list[tuple[str, str]]:
        """The task's own (metric, label) columns; the selection metric at least."""
        cols = [tuple(c) for c in self.task.get("columns") or [] if len(c) == 2]
        return cols or [(self.metric, self.metric)]

    @property
    def terms(self) -> list[str]:
        """The loss terms logged per epoch (``loss_<name>``), in log order."""
        names: list[str] = []
        for r in self.rows:
            names += [k[5:] for k in r if k.startswith("loss_") and k[5:] not in names]
        return names

    @property
    def best_epoch(self) -> int | None:
        b = self.results.get("best_epoch")
        if isinstance(b, int) and b >= 0:
            return b
        key = f"val_{self.metric}"
        vals = [(r[key], r["epoch"]) for r in self.rows if finite(r.get(key))]
        if not vals:
            return None
        return (max(vals) if self.mode == "max" else min(vals))[1]

    def recorded_teacher(self) -> dict[str, float]:
        """``teacher_val_<metric>`` (one teacher) or ``teacher_<name>_val_<metric>``."""
        suffix = f"val_{self.metric}"
        out = {}
        for k, v in self.results.items():
            if k.startswith("teacher_") and k.endswith(suffix) and finite(v):
                name = k[len("teacher_") : -len(suffix)].rstrip("_") or "teacher"
                out[name] = float(v)
        return out


def has_run(path: Path) -> bool:
    return (path / "metrics.jsonl").is_file() or (path / "results.json").is_file()


def read_run(path: Path, label: str | None = None) -> Run:
    run = Run(path=path, label=label or path.name)
    if (path / "metrics.jsonl").is_file():
        run.rows, run.skipped = read_jsonl(path / "metrics.jsonl")
    if (path / "results.json").is_file():
        run.results = read_json(path / "results.json")
    if (path / "config.yaml").is_file():
        try:
            run.config = (path / "config.yaml").read_text(encoding="utf-8", errors="replace")
        except OSError:
            run.config = None
    return run


def labels(paths: list[Path]) -> list[str]:
    """Short distinct labels: each path minus the parts all paths share."""
    parts = [p.resolve().parts for p in paths]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    out = ["/".join(p[common:]) for p in parts]
    return out if len(set(out)) == len(out) else [str(p) for p in paths]


def sub_runs(root: Path) -> list[Path]:
    """Run directories under ``root`` (a sweep or seeds folder), sorted."""
    return sorted({p.parent for p in root.rglob("metrics.jsonl")})
