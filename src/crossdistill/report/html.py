"""``write_report(run_dirs)``: one self-contained HTML page (plots embedded as PNG).

* one run directory (``metrics.jsonl`` + ``results.json``): its headline numbers, the task's
  val metric per epoch with the teacher's as a line and the best epoch marked, every loss
  term per epoch, the task's own test metrics, the per-epoch log and the config;
* several run directories (or one folder holding several runs): one comparison table and one
  comparison figure, then each run's details;
* a directory with a ``summary.json`` (the demo, benchmarks): the aggregated mean +- std
  table, a test accuracy bar chart and the seed-averaged curves.

Run directories are only read; the page goes to ``out`` (default ``RUN_DIR/report.html``,
or ``compare.html`` in the runs' common parent), with a clear error if that is not writable.
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path

from ..errors import ConfigError
from ..train.console import format_metric
from . import plots
from .runs import Run, finite, has_run, labels, read_json, read_run, sub_runs
from .teacher import evaluate_teachers

CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222;
padding:0 1em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;
padding:4px 10px;text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{
text-align:left}tr.best td{background:#eef5ff;font-weight:600}td.top{font-weight:700}
pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:12px}img{max-width:100%}
.note{color:#555;font-size:13px}table.kv td,td.txt{text-align:left}
table.kv td:first-child{color:#555}details{margin:.6em 0}summary{cursor:pointer;font-weight:600}"""


ROLE = "selects the epoch (on val)"


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _cell(c) -> str:
    if isinstance(c, tuple):  # (text, css class)
        return f'<td class="{c[1]}">{html.escape(str(c[0]))}</td>'
    return f"<td>{html.escape(str(c))}</td>"


def _table(headers, rows, row_class=None, klass: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers or ())
    body = "".join(
        f'<tr class="{(row_class or (lambda i: ""))(i)}">' + "".join(_cell(c) for c in r) + "</tr>"
        for i, r in enumerate(rows)
    )
    head = f"<tr>{head}</tr>" if head else ""
    return f'<table class="{klass}">{head}{body}</table>'


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _metric(name: str, v) -> str:
    return format_metric(name, v) if finite(v) else ("n/a" if v is None else str(v))


def _note(text: str) -> str:
    return f"<p class=note>{html.escape(text)}</p>"


def _config_summary(run: Run) -> tuple[str, str, str]:
    """(student, teacher, terms) in a few words, from config.yaml."""
    import yaml

    try:
        cfg = yaml.safe_load(run.config or "") or {}
    except yaml.YAMLError:
        cfg = {}
    if not isinstance(cfg, dict):
        cfg = {}

    def model(spec) -> str:
        if not isinstance(spec, dict):
            return ""
        if spec.get("from_config"):
            return f"from_config {Path(str(spec['from_config'])).name}"
        return str(spec.get("model") or spec.get("hf") or spec.get("hf_path") or "store")

    teachers = cfg.get("teachers") if isinstance(cfg.get("teachers"), dict) else {}
    teacher = model(cfg.get("teacher")) or ", ".join(f"{n}={model(s)}" for n, s in teachers.items())
    terms = cfg.get("terms") if isinstance(cfg.get("terms"), list) else []
    words = [str(t.get("loss")) for t in terms if isinstance(t, dict)]
    method = cfg.get("method", {}).get("name") if isinstance(cfg.get("method"), dict) else None
    recipe = " + ".join(([method] if method else []) + words)
    return model(cfg.get("student")), teacher or "none", recipe


def _headline(run: Run) -> list[tuple[str, str]]:
    m = run.metric
    student, teacher, terms = _config_summary(run)
    best = run.best_epoch
    res = run.results
    rows = [
        (
            "task",
            f"{run.task.get('name', '?')}: the best epoch on val {m} "
            f"({'higher' if run.mode == 'max' else 'lower'} is better) is kept and tested",
        ),
        ("student / teacher", f"{student} / {teacher}"),
        ("terms", terms or "?"),
        ("best epoch", f"{best + 1} of {len(run.rows)}" if best is not None else "n/a"),
        (f"best val {m}", _metric(m, res.get(f"best_val_{m}"))),
    ]
    for name, v in sorted(run.teacher.items()):
        rows.append((f"{name} val {m}", _metric(m, v)))
    for key, label in run.columns:
        rows.append((f"test {label}", _metric(key, res.get(f"test_{key}"))))
    if finite(res.get("student_params")):
        rows.append(("student parameters", f"{int(res['student_params']):,}"))
    if finite(res.get("train_seconds")):
        rows.append(("training time", f"{res['train_seconds']:.1f} s"))
    return rows


def _epoch_table(run: Run) -> str:
    m = run.metric
    extra = [f"train_{m}", f"val_{m}", "val_loss", "lr", "epoch_time"]
    keys = ["train_loss"] + [f"loss_{t}" for t in run.terms]
    keys += [k for k in extra if any(k in r for r in run.rows)]
    heads = ["epoch", "train loss"] + [f"{t} (unweighted)" for t in run.terms]
    heads += [k.replace("_", " ").replace("time", "time (s)") for k in keys[1 + len(run.terms) :]]
    show = lambda k, v: _metric(m, v) if k in (f"train_{m}", f"val_{m}") else _fmt(v)
    rows = [[r["epoch"] + 1] + [show(k, r.get(k)) for k in keys] for r in run.rows]
    best = run.best_epoch
    return _table(heads, rows, lambda i: "best" if run.rows[i]["epoch"] == best else "")


def _run_body(run: Run, level: int = 2) -> str:
    h = f"h{level}"
    parts = [f"<{h}>Summary</{h}>", _table(None, _headline(run), klass="kv")]
    if run.teacher_note:
        parts.append(_note(f"teacher: {run.teacher_note}"))
    if run.rows:
        parts.append(f"<{h}>Learning curves</{h}>" + _img(plots.run_curves(run), "curves"))
        parts.append(
            _note(
                "left: the task's selection metric per epoch (dotted: on the training batches); "
                "star: the best epoch on val, whose weights are exported and tested. right: the "
                "weighted total the optimiser minimised and each term's value before its weight."
            )
        )
        if run.skipped:
            parts.append(_note(f"{run.skipped} unreadable metrics line(s) skipped (torn write)"))
        parts.append(
            f"<details><summary>per-epoch log ({len(run.rows)} epochs; best row "
            f"highlighted)</summary>{_epoch_table(run)}</details>"
        )
    res = run.results
    if res:
        cols = [(k, lab) for k, lab in run.columns if f"test_{k}" in res]
        if cols:
            parts.append(
                f"<{h}>Test metrics ({html.escape(str(run.task.get('name', '')))} task)</{h}>"
                + _table(
                    ["metric", "test", "role"],
                    [
                        (lab, _metric(k, res[f"test_{k}"]), ROLE if k == run.metric else "")
                        for k, lab in cols
                    ],
                )
            )
        flat = [(k, _fmt(v)) for k, v in res.items() if not isinstance(v, (list, dict))]
        parts.append(
            "<details><summary>results.json (raw; epochs count from 0)</summary>"
            + _table(["key", "value"], flat)
            + "</details>"
        )
    if run.config:
        parts.append(
            "<details><summary>Config (config.yaml)</summary><pre>"
            + html.escape(run.config)
            + "</pre></details>"
        )
    return "".join(parts)


def _best_marks(values: list, mode: str) -> list:
    ok = [v for v in values if finite(v)]
    if len(ok) < 2:
        return [None] * len(values)
    top = max(ok) if mode == "max" else min(ok)
    return ["top" if finite(v) and v == top else None for v in values]


def _compare_body(runs: list[Run]) -> str:
    first = runs[0]
    metrics = list(dict.fromkeys(r.metric for r in runs))
    cols = list(dict.fromkeys(c for r in runs for c in r.columns))
    heads = ["run", "student", "teacher", "terms", "best epoch"]
    heads += [f"best val {m}" for m in metrics] + [f"teacher val {m}" for m in metrics]
    heads += [f"test {lab}" for _, lab in cols] + ["params", "time (s)"]
    table = []
    for r in runs:
        student, teacher, terms = _config_summary(r)
        best = r.best_epoch
        row = [r.label, (student, "txt"), (teacher, "txt"), (terms, "txt")]
        row.append("" if best is None else best + 1)
        row += [_metric(m, r.results.get(f"best_val_{m}")) for m in metrics]
        row += [
            ", ".join(_metric(m, v) for v in r.teacher.values()) if r.metric == m else ""
            for m in metrics
        ]
        row += [  # a run fills only its own task's columns
            _metric(k, r.results.get(f"test_{k}")) if (k, lab) in r.columns else ""
            for k, lab in cols
        ]
        params, secs = r.results.get("student_params"), r.results.get("train_seconds")
        row += [f"{params:,}" if isinstance(params, int) else "", _fmt(secs)]
        table.append(row)
    # bold the best value of each metric column (by the task's direction)
    mode = {m: next(r.mode for r in runs if r.metric == m) for m in metrics}
    spots = [(5 + i, f"best_val_{m}", m, None) for i, m in enumerate(metrics)]
    base = 5 + 2 * len(metrics)
    spots += [(base + i, f"test_{k}", k, (k, lab)) for i, (k, lab) in enumerate(cols)]
    for col, key, m, own in spots:
        direction = mode.get(m) or ("min" if m in ("loss", "bpb", "ppl") else "max")
        values = [r.results.get(key) if own is None or own in r.columns else None for r in runs]
        marks = _best_marks(values, direction)
        for row, mark in zip(table, marks):
            if mark:
                row[col] = (row[col], mark)
    parts = [
        "<h2>Comparison</h2>",
        f'<div style="overflow-x:auto">{_table(heads, table)}</div>',
        _note(f"best epoch counts from 1; bold: the best run per column. {len(runs)} runs."),
        "<h2>Learning curves</h2>",
        _img(plots.compare_curves(runs), "comparison"),
    ]
    notes = sorted({f"{r.label}: {r.teacher_note}" for r in runs if r.teacher_note})
    if notes and not all(r.teacher_note == first.teacher_note for r in runs):
        parts.append(_note("teacher: " + "; ".join(notes)))
    elif first.teacher_note:
        parts.append(_note(f"teacher: {first.teacher_note}"))
    parts.append("<h2>Runs</h2>")
    for r in runs:
        parts.append(
            f"<details><summary>{html.escape(r.label)}</summary>{_run_body(r, 3)}</details>"
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
    curves = {str(p.relative_to(run)) or ".": read_run(p).rows for p in sub_runs(run)}
    teacher = (summary.get("teacher") or {}).get("best_val_acc")  # the teacher's results
    if curves:
        parts.append(
            "<h2>Learning curves (mean over seeds)</h2>"
            + _img(plots.learning_curves(_mean_curves(curves), teacher=teacher), "curves")
        )
    return "".join(parts)


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
                if all(finite(m[e].get(k)) for m in members)
            }
            for e in range(n)
        ]
    return out


def _collect(paths: list[Path]) -> list[Path]:
    """The run directories named (a folder of runs stands for the runs inside it)."""
    out: list[Path] = []
    for p in paths:
        if not p.is_dir():
            raise ConfigError("run_dir", str(p), "not a directory")
        found = [p] if has_run(p) else sub_runs(p)
        if not found:
            raise ConfigError(
                "run_dir",
                str(p),
                "no metrics.jsonl, results.json or summary.json inside; "
                "point at a directory written by `crossdistill train` or `demo`",
            )
        out += [f for f in found if f not in out]
    return out


def _default_out(paths: list[Path]) -> Path:
    if len(paths) == 1:
        return paths[0] / "report.html"
    return Path(os.path.commonpath([str(p.resolve()) for p in paths])) / "compare.html"


def _write(out: Path, page: str, default: bool) -> Path:
    from ..train.metrics import write_atomic

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, page.encode("ascii", "xmlcharrefreplace").decode())  # any locale
    except OSError as err:
        why = err.strerror or str(err)
        hint = "; the run may be read-only: give --out PATH elsewhere" if default else ""
        msg = f"cannot write the report there ({why}){hint}"
        raise ConfigError("--out", str(out), msg) from None
    return out


def write_report(
    run_dir: str | Path | list, title: str | None = None, *, out: str | Path | None = None
) -> Path:
    """Write the HTML report of one run, several runs (a list, or a folder of runs) or a
    summary directory; returns the page's path (see the module docstring)."""
    given = [Path(p) for p in (run_dir if isinstance(run_dir, (list, tuple)) else [run_dir])]
    if not given:
        raise ConfigError("run_dir", None, "give at least one run directory")
    target = Path(out) if out else _default_out(given)
    if len(given) == 1 and (given[0] / "summary.json").is_file():
        body = _summary(given[0], read_json(given[0] / "summary.json"))
        cfg = given[0] / "config.yaml"
        if cfg.is_file():
            body += "<h2>Config</h2><pre>" + html.escape(cfg.read_text()) + "</pre>"
        name = given[0].name
    else:
        paths = _collect(given)
        runs = [read_run(p, lab) for p, lab in zip(paths, labels(paths))]
        for r in runs:
            r.teacher, r.teacher_note = evaluate_teachers(r)
        if len(runs) == 1:
            body, name = _run_body(runs[0]), runs[0].path.name
        else:
            body, name = _compare_body(runs), f"{len(runs)} runs"
    title = title or f"crossdistill report: {name}"
    page = (
        f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )
    return _write(target, page, default=out is None)
