"""Config fuzzing for every CLI surface (issue #11, item 2).

* :mod:`.bases`: tiny valid configs per surface and the files they need (built once).
* :mod:`.generate`: a seeded generator of mutated cases (``random.Random(seed)`` only).
* :mod:`.runner`: runs each case in a forked child under memory/file/time limits and
  classifies the outcome (``ok``, ``clean-error`` or a failure class).

Run it by hand: ``.venv/bin/python -m tests.fuzz --n 1000 --seed 0``.
"""

from .generate import Case, generate
from .runner import FAILURES, run_cases, summarize

__all__ = ["Case", "generate", "run_cases", "summarize", "FAILURES"]
