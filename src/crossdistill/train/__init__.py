"""Training: the loop, its settings, schedules, checkpoints and metric logs."""

from .config import TrainConfig
from .loop import Trainer, evaluate

__all__ = ["TrainConfig", "Trainer", "evaluate"]
