"""Metric logs: one JSON object per line (JSONL) and the same rows as CSV.

Each file is rewritten whole to a temp name and renamed into place (one row per epoch, so
this is cheap), so a kill leaves the previous log or the new one, never a torn line. A torn
last line from an older writer is dropped on restore.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from ..io import atomic_path


def write_atomic(path: Path, text: str) -> None:
    """``path`` holds ``text`` or its previous content, whenever the process dies."""
    tmp = atomic_path(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_rows(path: Path) -> tuple[list[dict], int]:
    """The rows of a JSONL log and how many lines were dropped as unreadable (a torn write,
    a damaged file): the checkpoint, not this log, is what a resume continues from."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows, skipped = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            skipped += 1
    return rows, skipped


class MetricsLog:
    def __init__(self, out_dir: str | Path | None):
        self.dir = Path(out_dir) if out_dir else None
        self.rows: list[dict] = []

    @property
    def jsonl(self) -> Path | None:
        return self.dir / "metrics.jsonl" if self.dir else None

    def restore(self, upto_epoch: int) -> None:
        """Keep only rows of epochs < ``upto_epoch`` (resume after a kill mid-epoch)."""
        if self.jsonl and self.jsonl.is_file():
            rows, _ = read_rows(self.jsonl)
            self.rows = [r for r in rows if r.get("epoch", 0) < upto_epoch]
            self._write()

    def append(self, row: dict) -> None:
        self.rows.append(row)
        if self.dir:
            self._write()

    def _write(self) -> None:
        write_atomic(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.rows))
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\r\n")
        w.writeheader()
        w.writerows(self.rows)
        write_atomic(self.dir / "metrics.csv", buf.getvalue())
