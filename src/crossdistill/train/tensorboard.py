"""Optional TensorBoard logging (``train.log: [tensorboard]``): each epoch's metrics row as
scalars, written with ``torch.utils.tensorboard`` to ``<run dir>/tb``.

The ``tensorboard`` package is an extra (``pip install crossdistill[tensorboard]``); asking for
it without the package fails when the Trainer is built, before any training.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError

SKIP = ("epoch", "step")  # the x axis, not scalars


def tag(key: str) -> str:
    """A metrics-row key as a grouped TensorBoard tag: ``loss_kd`` -> ``loss/kd``,
    ``train_loss`` -> ``loss/total``, ``val_acc`` -> ``val/acc``."""
    if key == "train_loss":
        return "loss/total"
    for prefix, group in (("loss_", "loss"), ("train_", "train"), ("val_", "val")):
        if key.startswith(prefix):
            return f"{group}/{key[len(prefix) :]}"
    return f"misc/{key}" if key != "lr" else "lr"


def _writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "train.log",
            "tensorboard",
            "the tensorboard package is not installed; "
            "pip install 'crossdistill[tensorboard]' (or drop tensorboard from train.log)",
        ) from None
    return SummaryWriter


class TensorBoard:
    """A Trainer callback: one scalar per metric per epoch (x axis: epoch, from 1)."""

    def __init__(self, log_dir: str | Path | None = None):
        self.writer_class = _writer_class()  # fails now, not after the first epoch
        self.log_dir = log_dir
        self.writer = None

    def on_epoch_end(self, trainer, row: dict) -> None:
        if not trainer.dist.main:
            return
        step = row["epoch"] + 1
        if self.writer is None:
            log_dir = self.log_dir or (trainer.out_dir / "tb" if trainer.out_dir else None)
            # purge_step drops events a killed run wrote past the epoch it resumes from
            self.writer = self.writer_class(
                log_dir=str(log_dir) if log_dir else None, purge_step=step
            )
        for key, value in row.items():
            if key not in SKIP and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(tag(key), value, step)
        self.writer.flush()
        if step >= trainer.cfg.epochs:
            self.writer.close()
            self.writer = None
