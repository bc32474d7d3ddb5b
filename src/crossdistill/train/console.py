"""One line per epoch on the console, so a log shows how training went without progress bars:

    epoch 3/10  loss 0.412 (ce 0.10, kd 0.31)  val acc 91.2%  best  4.1 s

The loss is the epoch's mean weighted total, then each term's value before its weight; the
val metric is the task's selection metric (``Task.select``); ``best`` marks a new best epoch
on val; the time is the epoch's training time. Lines go to stderr (stdout stays for results) through
``tqdm.write``, so they sit cleanly above any outer progress bar, and only rank 0 prints.

``train.progress: false`` hides the progress bars and keeps these lines. To hide the lines too
(scripts that print their own summary, sweeps), set ``CROSSDISTILL_QUIET=1`` in the
environment or wrap the run in ``with console.quiet():`` -- neither is part of the run's
config, so silencing a run never changes its digest or blocks a ``--resume``.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys

from tqdm.auto import tqdm

from ..errors import ConfigError

PERCENT = {"acc", "miou", "pixel_acc", "mean_recall"}  # metrics shown as percentages
LOGGERS = ("tensorboard",)  # what ``train.log`` may name

_QUIET = contextvars.ContextVar("crossdistill_quiet", default=False)


@contextlib.contextmanager
def quiet():
    """No epoch lines inside this block (this thread / task only)."""
    token = _QUIET.set(True)
    try:
        yield
    finally:
        _QUIET.reset(token)


def is_quiet() -> bool:
    env = os.environ.get("CROSSDISTILL_QUIET", "").strip().lower()
    return _QUIET.get() or env not in ("", "0", "false", "no")


def format_metric(name: str, value) -> str:
    """``acc 0.912`` -> ``91.2%``; other metrics with 4 significant digits."""
    if not isinstance(value, (int, float)):
        return str(value)
    if name not in PERCENT:
        return f"{value:.4g}"
    pct = 100 * value
    return f"{pct:.1f}%" if abs(pct) >= 1 or pct == 0 else f"{pct:.2g}%"  # 0.069%, not 0.1%


def epoch_line(row: dict, epochs: int, task, best: bool) -> str:
    """The console line of one metrics row (see the module docstring)."""
    parts = [f"epoch {row['epoch'] + 1}/{epochs}", f"loss {row['train_loss']:.4g}"]
    terms = [(k[5:], v) for k, v in row.items() if k.startswith("loss_")]
    if len(terms) > 1:
        parts[-1] += " (" + ", ".join(f"{n} {v:.3g}" for n, v in terms) + ")"
    key = f"val_{task.select}"
    if key in row:
        parts.append(f"val {task.select} {format_metric(task.select, row[key])}")
    else:  # no val split: the training metrics the task reports, if any
        parts += [
            f"train {m} {format_metric(m, row[f'train_{m}'])}"
            for m in task.train_metrics
            if f"train_{m}" in row
        ]
    if row.get("skipped_steps"):  # train.nan: skip
        parts.append(f"{row['skipped_steps']} non-finite steps skipped")
    if best:
        parts.append("best")
    if "epoch_time" in row:
        parts.append(f"{row['epoch_time']:.1f} s")
    return "  ".join(parts)


class Console:
    """The epoch-line callback every :class:`Trainer` gets (see the module docstring)."""

    def on_epoch_end(self, trainer, row: dict) -> None:
        if not trainer.dist.main or is_quiet():
            return
        best = trainer.val is not None and trainer.state.get("best_epoch") == row["epoch"]
        line = epoch_line(row, trainer.cfg.epochs, trainer.distiller.task, best)
        tqdm.write(line, file=sys.stderr)


def default_callbacks(cfg, given=()) -> list:
    """The callbacks a Trainer adds to the user's: the console line (unless one was given)
    and each logger named in ``train.log``. Unknown or unavailable loggers fail here, when the
    Trainer is built, before any training."""
    out = [] if any(isinstance(c, Console) for c in given) else [Console()]
    names = getattr(cfg, "log", None) or []
    if isinstance(names, str):
        names = [names]
    for name in names:
        if name not in LOGGERS:
            raise ConfigError("train.log", name, f"allowed: {', '.join(LOGGERS)}")
    if "tensorboard" in names:
        from .tensorboard import TensorBoard

        if not any(isinstance(c, TensorBoard) for c in given):
            out.append(TensorBoard())
    return out
