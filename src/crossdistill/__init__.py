"""crossdistill: knowledge distillation across architectures, modalities and tasks.

A distillation is data: a student, frozen teachers and a list of :class:`Term` s; see
``DESIGN`` in the README.
"""

from . import data, lm, losses, models, projectors  # (lm registers LM stages, methods)
from .distiller import Distiller, Output, Term
from .errors import ConfigError
from .registry import CONDENSERS, DATASETS, LOSSES, METHODS, MODELS, PROJECTORS, Registry
from .taps import Tap
from .train import TrainConfig, Trainer, evaluate

__version__ = "0.1.0"

__all__ = [
    "CONDENSERS",
    "DATASETS",
    "LOSSES",
    "METHODS",
    "MODELS",
    "PROJECTORS",
    "ConfigError",
    "Distiller",
    "Output",
    "Registry",
    "Tap",
    "Term",
    "TrainConfig",
    "Trainer",
    "data",
    "evaluate",
    "lm",
    "losses",
    "models",
    "projectors",
]
from . import prune as _prune  # noqa: E402,F401  (registers the slice_inputs structure op for replays)
