"""Aggregate per-seed results into mean +- std rows and print them as a text table."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def aggregate(rows: Sequence[dict], by: Sequence[str], metrics: Sequence[str]) -> list[dict]:
    """Group ``rows`` by the ``by`` keys; for each metric give mean, std (sample, n-1) and n."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in by), []).append(r)
    out = []
    for key, rs in groups.items():
        row = dict(zip(by, key))
        for m in metrics:
            vals = [r[m] for r in rs if r.get(m) is not None]
            row[m] = statistics.fmean(vals) if vals else None
            row[f"{m}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        row["n"] = len(rs)
        out.append(row)
    return out


def pm(mean: float | None, std: float | None, scale: float = 100.0, digits: int = 2) -> str:
    if mean is None:
        return "n/a"
    return f"{mean * scale:.{digits}f} +- {(std or 0.0) * scale:.{digits}f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A plain monospace table (also valid Markdown)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])
