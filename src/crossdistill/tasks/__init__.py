"""Tasks: what "good" means for a kind of problem, in one registry (``TASKS``).

A task owns the batch key of its targets, the default inputs and class axis of its models,
the label-side default terms, its metric sums (``update`` adds device tensors, no host sync;
``compute`` turns all-reduced sums into metrics), the selection metric and its direction,
and the report's columns. The trainer and the report call these and hold no task maths.
"""

from ..registry import TASKS
from .base import Task, build
from .classification import Classification
from .lm import LanguageModeling
from .retrieval import Retrieval
from .segmentation import Segmentation

__all__ = [
    "TASKS",
    "Classification",
    "LanguageModeling",
    "Retrieval",
    "Segmentation",
    "Task",
    "build",
]
from . import cer as _cer  # noqa: E402,F401  (registers cer)
from . import detection as _detection  # noqa: E402,F401  (registers detection)
from . import domain as _domain  # noqa: E402,F401  (registers domain_adaptation)
from . import pair_auc as _pair_auc  # noqa: E402,F401  (registers)
from . import rerank as _rerank  # noqa: E402,F401  (registers)
from . import vqa as _vqa  # noqa: E402,F401  (registers)
