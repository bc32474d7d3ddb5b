"""Metric logs: one JSON object per line (JSONL) and the same rows as CSV."""

from __future__ import annotations

import csv
import json
from pathlib import Path


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
            rows = [json.loads(line) for line in self.jsonl.read_text().splitlines() if line]
            self.rows = [r for r in rows if r.get("epoch", 0) < upto_epoch]
            self._rewrite()

    def append(self, row: dict) -> None:
        self.rows.append(row)
        if self.dir:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
            self._write_csv()

    def _rewrite(self) -> None:
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        self._write_csv()

    def _write_csv(self) -> None:
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        with open(self.dir / "metrics.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)
