"""``write_report(run_dir)``: one self-contained HTML page (plots embedded as PNG).

A single run directory (``metrics.jsonl`` + ``results.json``) gets its learning curves,
results and config. A directory of runs with a ``summary.json`` (the demo, benchmarks) gets
the aggregated mean +- std table, an accuracy bar chart and every run's curves.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from ..errors import ConfigError
from . import plots

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:12px}img{max-width:100%}
.note{color:#555;font-size:13px}"""


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(headers, rows) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _runs_under(root: Path) -> dict[str, list[dict]]:
    return {
        str(p.parent.relative_to(root)) or ".": _read_jsonl(p)
        for p in sorted(root.rglob("metrics.jsonl"))
    }


def _mean_curves(runs: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Average runs that differ only in their trailing ``seedN`` folder, epoch by epoch."""
    groups: dict[str, list[list[dict]]] = {}
    for name, rows in runs.items():
        head, _, tail = name.rpartition("/")
        key = head if tail.startswith("seed") and head else name
        groups.setdefault(key, []).append(rows)
    out = {}
    for key, members in groups.items():
        n = min(len(m) for m in members)
        out[key] = [
            {
                k: sum(m[e][k] for m in members) / len(members)
                for k in ("epoch", "train_loss", "val_acc")
                if k in members[0][e]
            }
            for e in range(n)
        ]
    return out


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))


def _metric(res: dict) -> str:
    """The task's selection metric, from the ``best_val_<metric>`` result."""
    return next((k[len("best_val_") :] for k in res if k.startswith("best_val_")), "acc")


def _single(run: Path) -> str:
    parts = []
    curves = _runs_under(run)
    res = {}
    if (run / "results.json").is_file():
        res = json.loads((run / "results.json").read_text())
    if curves:
        png = plots.learning_curves(curves, _metric(res))
        parts.append("<h2>Learning curves</h2>" + _img(png, "curves"))
    task = res.get("task") if isinstance(res.get("task"), dict) else None
    if task and task.get("columns"):  # the task's own headline metrics, labelled by the task
        rows = [
            (label, _fmt(res.get(f"test_{m}")), "selects" if m == task["select"] else "")
            for m, label in task["columns"]
        ]
        parts.append(
            f"<h2>Test metrics ({html.escape(task['name'])} task)</h2>"
            + _table(["metric", "test", "best epoch chosen on val by"], rows)
        )
    if res:
        parts.append(
            "<h2>Results</h2>"
            + _table(
                ["metric", "value"],
                [
                    (k, f"{v:.4f}" if isinstance(v, float) else v)
                    for k, v in res.items()
                    if not isinstance(v, (list, dict))
                ],
            )
        )
    return "".join(parts)


def _summary(run: Path, summary: dict) -> str:
    groups = summary["groups"]
    headers = summary.get("headers") or list(groups[0])
    rows = [[g.get(h, "") for h in headers] for g in groups]
    parts = [
        f"<h2>Results</h2><p class=note>{html.escape(summary.get('note', ''))}</p>",
        _table(headers, rows),
    ]
    bars = [g for g in groups if g.get("test_acc") is not None]
    if bars:
        png = plots.accuracy_bars(
            [g["label"] for g in bars],
            [g["test_acc"] for g in bars],
            [g.get("test_acc_std", 0.0) for g in bars],
            summary.get("reference_acc"),
            summary.get("reference_label", "teacher"),
        )
        parts.append("<h2>Test accuracy</h2>" + _img(png, "accuracy"))
    curves = _runs_under(run)
    if curves:
        parts.append(
            "<h2>Learning curves (mean over seeds)</h2>"
            + _img(plots.learning_curves(_mean_curves(curves)), "curves")
        )
    return "".join(parts)


def write_report(run_dir: str | Path, title: str | None = None) -> Path:
    run = Path(run_dir)
    if not run.is_dir():
        raise ConfigError("run_dir", str(run), "not a directory")
    has_summary = (run / "summary.json").is_file()
    if not has_summary and not any(run.rglob("metrics.jsonl")):
        raise ConfigError(
            "run_dir",
            str(run),
            "no metrics.jsonl or summary.json inside; "
            "point at a directory written by `crossdistill train` or `demo`",
        )
    body = (
        _summary(run, json.loads((run / "summary.json").read_text()))
        if has_summary
        else _single(run)
    )
    cfg = run / "config.yaml"
    if cfg.is_file():
        body += "<h2>Config</h2><pre>" + html.escape(cfg.read_text()) + "</pre>"
    title = title or f"crossdistill report: {run.name}"
    page = (
        f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )
    out = run / "report.html"
    out.write_text(page)
    return out
