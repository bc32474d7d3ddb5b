"""Matplotlib figures for reports, returned as PNG bytes (Agg backend, no display needed)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


PERCENT = {"acc", "miou", "pixel_acc", "mean_recall"}  # metrics shown as percentages


def learning_curves(runs: dict[str, list[dict]], metric: str = "acc") -> bytes:
    """Train loss and the task's validation metric per epoch, one line per run (label)."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    key = f"val_{metric}"
    scale = 100 if metric in PERCENT else 1
    for label, rows in runs.items():
        ep = [r["epoch"] + 1 for r in rows]
        a.plot(ep, [r["train_loss"] for r in rows], label=label, lw=1.2)
        if rows and key in rows[0]:
            b.plot(ep, [scale * r[key] for r in rows], label=label, lw=1.2)
    a.set(
        xlabel="epoch", ylabel="train loss (total, log scale)", title="training loss", yscale="log"
    )
    unit = " (%)" if scale == 100 else ""
    b.set(xlabel="epoch", ylabel=f"val {metric}{unit}", title=f"validation {metric}")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    if len(runs) <= 16:
        b.legend(fontsize=7, loc="lower right", ncol=2)
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
    )
    if reference is not None:
        ax.axhline(100 * reference, color="#C44E52", ls="--", lw=1, label=ref_label)
        ax.legend(fontsize=8)
    lo = min(100 * (m - s) for m, s in zip(means, stds)) if means else 0
    ax.set_ylim(max(0, lo - 5), 100)
    ax.set_xticks(list(xs), labels, rotation=40, ha="right", fontsize=8)
    ax.set(ylabel="test accuracy (%)", title="test accuracy, mean +- std over seeds")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)
