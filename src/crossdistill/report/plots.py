"""Matplotlib figures for reports, returned as PNG bytes (Agg backend, no display needed).
Epochs are drawn from 1, as the console counts them."""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ..train.console import PERCENT, format_metric  # noqa: E402
from .runs import Run, finite  # noqa: E402

TEACHER = "#C44E52"


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _scale(metric: str) -> tuple[float, str]:
    return (100.0, " (%)") if metric in PERCENT else (1.0, "")


def _series(rows: list[dict], key: str, scale: float = 1.0) -> tuple[list[int], list[float]]:
    pts = [(r["epoch"] + 1, scale * r[key]) for r in rows if finite(r.get(key))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _dots(epochs: list[int]) -> dict:
    """Point markers on short curves (a one-epoch run is a single point)."""
    return {"marker": "o", "ms": 3} if len(epochs) <= 30 else {}


def _log_if_positive(ax, values: list[float]) -> str:
    """Log scale when every value is > 0 (losses can be negative, e.g. contrastive ones)."""
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
        return ", log scale"
    return ""


def _legend_below(ax, ncol: int = 2) -> None:
    """Legends under the axes, so they never hide a curve."""
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=ncol, frameon=False)


def _teacher_lines(ax, teachers: dict[str, float], metric: str, scale: float) -> None:
    styles = ["--", "-.", ":"]
    for i, (name, v) in enumerate(sorted(teachers.items())):
        label = f"{name} (val) {format_metric(metric, v)}"
        ax.axhline(scale * v, color=TEACHER, ls=styles[i % 3], lw=1.2, label=label)


def _mark_best(ax, run: Run, scale: float, color: str, label: bool = True) -> None:
    best = run.best_epoch
    row = next((r for r in run.rows if r["epoch"] == best), None)
    key = f"val_{run.metric}"
    if row is None or not finite(row.get(key)):
        return
    y = scale * row[key]
    text = f"best epoch {best + 1}: {format_metric(run.metric, row[key])}" if label else None
    ax.plot(
        [best + 1],
        [y],
        marker="*",
        ms=13,
        color=color,
        mec="black",
        mew=0.6,
        ls="",
        label=text,
        zorder=5,
    )
    if label:
        ax.axvline(best + 1, color="0.5", ls=":", lw=1)


def run_curves(run: Run) -> bytes:
    """One run: the task's val metric (train metric dotted, teacher as a line, best epoch
    starred) and every loss term per epoch beside the weighted total."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    m = run.metric
    scale, unit = _scale(m)
    ep, ys = _series(run.rows, f"val_{m}", scale)
    if ys:
        a.plot(ep, ys, color="#4C72B0", lw=1.6, marker="o", ms=3, label=f"student val {m}")
    ep, ys = _series(run.rows, f"train_{m}", scale)
    if ys:
        a.plot(ep, ys, color="#4C72B0", lw=1.2, ls=":", label=f"student train {m}")
    _teacher_lines(a, run.teacher, m, scale)
    _mark_best(a, run, scale, "#4C72B0")
    better = "higher" if run.mode == "max" else "lower"
    a.set(xlabel="epoch", ylabel=f"{m}{unit}", title=f"{m} per epoch ({better} is better)")
    _legend_below(a)

    every: list[float] = []
    ep, ys = _series(run.rows, "train_loss")
    b.plot(ep, ys, color="black", lw=2, label="total (weighted sum)", **_dots(ep))
    every += ys
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(run.terms):
        ep, ys = _series(run.rows, f"loss_{name}")
        c = colors[i % len(colors)]
        b.plot(ep, ys, color=c, lw=1.3, label=f"{name} (unweighted)", **_dots(ep))
        every += ys
    ep, ys = _series(run.rows, "val_loss")
    if ys:
        b.plot(ep, ys, color="0.45", lw=1.2, ls="--", label="val loss (task)")
        every += ys
    log = _log_if_positive(b, every)
    b.set(xlabel="epoch", ylabel="loss", title=f"train loss per term{log}")
    _legend_below(b)
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    return _png(fig)


def compare_curves(runs: Sequence[Run]) -> bytes:
    """Several runs in one figure: val metric per run (best epochs starred, teachers as
    lines) and the weighted train loss per run."""
    metrics = list(dict.fromkeys(r.metric for r in runs))
    fig, axes = plt.subplots(1, len(metrics) + 1, figsize=(6 * (len(metrics) + 1), 4.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {r.label: colors[i % len(colors)] for i, r in enumerate(runs)}
    for ax, m in zip(axes, metrics):
        scale, unit = _scale(m)
        teachers: dict[str, float] = {}
        for r in (r for r in runs if r.metric == m):
            ep, ys = _series(r.rows, f"val_{m}", scale)
            ax.plot(ep, ys, color=color[r.label], lw=1.5, label=r.label, **_dots(ep))
            _mark_best(ax, r, scale, color[r.label], label=False)
            for name, v in r.teacher.items():  # one line per distinct teacher value
                if all(abs(v - w) > 1e-9 for w in teachers.values()):
                    teachers[name if name not in teachers else f"{name} ({r.label})"] = v
        _teacher_lines(ax, teachers, m, scale)
        ax.plot([], [], marker="*", ms=11, color="white", mec="black", ls="", label="best epoch")
        ax.set(xlabel="epoch", ylabel=f"val {m}{unit}", title=f"validation {m}")
    loss = axes[-1]
    every: list[float] = []
    for r in runs:
        ep, ys = _series(r.rows, "train_loss")
        loss.plot(ep, ys, color=color[r.label], lw=1.5, label=r.label, **_dots(ep))
        every += ys
    log = _log_if_positive(loss, every)
    loss.set(xlabel="epoch", ylabel="train loss (weighted total)", title=f"train loss{log}")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if len(runs) <= 20:
        for ax in axes:
            _legend_below(ax)
    return _png(fig)


def learning_curves(
    runs: dict[str, list[dict]], metric: str = "acc", teacher: float | None = None
) -> bytes:
    """Train loss and the task's validation metric per epoch, one line per run (label):
    the seed-averaged curves of a summary report (``teacher``: its val metric, as a line)."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    key = f"val_{metric}"
    scale, unit = _scale(metric)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, rows) in enumerate(runs.items()):
        c = colors[i % len(colors)]
        ep, ys = _series(rows, "train_loss")
        a.plot(ep, ys, label=label, lw=1.3, color=c, **_dots(ep))
        ep, ys = _series(rows, key, scale)
        if ys:
            b.plot(ep, ys, label=label, lw=1.3, color=c, **_dots(ep))
    if teacher is not None:
        _teacher_lines(b, {"teacher": teacher}, metric, scale)
    a.set(
        xlabel="epoch",
        ylabel="train loss (weighted total, log scale)",
        title="training loss",
        yscale="log",
    )
    b.set(xlabel="epoch", ylabel=f"val {metric}{unit}", title=f"validation {metric}")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if len(runs) <= 20:
        _legend_below(b, ncol=3)
    return _png(fig)


def accuracy_bars(
    labels: Sequence[str],
    means: Sequence[float],
    stds: Sequence[float],
    reference: float | None = None,
    ref_label: str = "teacher",
) -> bytes:
    """Mean test accuracy with std error bars, one bar per group."""
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(labels) + 2), 4))
    xs = range(len(labels))
    ax.bar(
        xs,
        [100 * m for m in means],
        yerr=[100 * s for s in stds],
        capsize=3,
        color="#4C72B0",
        alpha=0.85,
        label="student (mean +- std)",
    )
    if reference is not None:
        label = f"{ref_label} (test) {100 * reference:.1f}%"
        ax.axhline(100 * reference, color=TEACHER, ls="--", lw=1, label=label)
    ax.legend(fontsize=8)
    lo = min(100 * (m - s) for m, s in zip(means, stds)) if means else 0
    ax.set_ylim(max(0, lo - 5), 100)
    ax.set_xticks(list(xs), labels, rotation=40, ha="right", fontsize=8)
    ax.set(ylabel="test accuracy (%)", title="test accuracy, mean +- std over seeds")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)
