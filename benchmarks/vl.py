"""Vision-language, retrieval and semi-supervised KD benchmark (issue 14).

Blocks ``benchmarks/vl_<block>.py`` run under the shared block driver
(``benchmarks/blocks.py``: interface, scheduling, resume, plateau and claim rules). In every
cell the checkpoint (and any test-time setting) is chosen on the validation split and the
test split is read once.

    nice -n 10 python benchmarks/vl.py            # full (< 60 min here, 2 workers)
    python benchmarks/vl.py --quick               # < 5 min smoke run
    python benchmarks/vl.py --blocks tinyclip dho # some blocks
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import blocks  # noqa: E402
from blocks import claims, expand, markdown, plateau, stats, tables  # noqa: E402,F401

BLOCK_MODULES = ("tinyclip", "retrieval", "zeroshot", "dho", "transfer", "transenc", "llava",
                 "repblend", "peer")
TITLE = "Vision-language, retrieval and semi-supervised KD benchmark"
CACHE_VERSION = 1


def available() -> dict:
    return blocks.available("vl", BLOCK_MODULES)


def main(argv=None) -> int:
    return blocks.main("vl", BLOCK_MODULES, TITLE, argv, CACHE_VERSION)


if __name__ == "__main__":
    raise SystemExit(main())
