"""Dataset distillation: condensers learn a few synthetic samples per class (see base.py)."""

from ..registry import CONDENSERS
from .base import Condenser, RealSampler, SyntheticSet

__all__ = ["CONDENSERS", "Condenser", "RealSampler", "SyntheticSet"]

# ruff: noqa: I001  (one `from . import x` line per condenser module, appended by each part)
from . import augment  # noqa: E402,F401
from . import dc  # noqa: E402,F401
from . import dm  # noqa: E402,F401
from . import mtt  # noqa: E402,F401
from . import ncfm  # noqa: E402,F401
from . import fyi  # noqa: E402,F401
from . import harness  # noqa: E402,F401

from . import cvdd, infer, nrr, sre2l  # noqa: E402,F401  (SRe2L family: registers sre2l, cvdd, infer, nrr)
from . import pairs as _pairs  # noqa: E402,F401  (registers)
from . import repblend as _repblend  # noqa: E402,F401  (registers)
