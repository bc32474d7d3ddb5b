"""Dense-prediction KD benchmark (issue 15): segmentation and detection distillation on
MNIST digit canvases.

Blocks ``benchmarks/dense_<block>.py`` run under the shared block driver
(``benchmarks/blocks.py``: interface, scheduling, resume, plateau and claim rules). In every
cell the checkpoint is chosen on the validation split and the test split is read once;
mean +- std over 3 seeds.

    nice -n 10 python benchmarks/dense.py          # full (< 60 min here, 2 workers)
    python benchmarks/dense.py --quick             # < 5 min smoke run
    python benchmarks/dense.py --blocks clock      # some blocks
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import blocks  # noqa: E402
from blocks import claims, expand, markdown, plateau, stats, tables  # noqa: E402,F401

BLOCK_MODULES = ("seg", "transkd", "collab", "fss", "prune", "clock", "unidistill", "ezad")
TITLE = "Dense-prediction KD benchmark (segmentation and detection on digit canvases)"
CACHE_VERSION = 1


def available() -> dict:
    return blocks.available("dense", BLOCK_MODULES)


def main(argv=None) -> int:
    return blocks.main("dense", BLOCK_MODULES, TITLE, argv, CACHE_VERSION)


if __name__ == "__main__":
    raise SystemExit(main())
