"""Dataset distillation: condensers learn a few synthetic samples per class (see base.py)."""

from ..registry import CONDENSERS
from .base import Condenser, RealSampler, SyntheticSet

__all__ = ["CONDENSERS", "Condenser", "RealSampler", "SyntheticSet"]
