"""Shared judging rules of the benchmark drivers (cross-modal, vision-language): a cell's
mean and spread, the plateau check a claim's baseline must pass, and the verdict words.

A claim compares pairs ``(a, b)``: ``a`` is claimed better than ``b``. It is judged only
where every ``b`` that trains (has a val curve) plateaued: its val metric's range over the
last ceil(20 %) of epochs and the epoch before is within ``PLATEAU_POINTS`` (worst seed).
"""

from __future__ import annotations

import math

PLATEAU_POINTS = 0.5


def lookup(st, block, method, metric):
    """``(mean, std, n)`` of ``metric`` in one cell of the aggregated ``st``, or None."""
    for r in st:
        if (r["block"], r["method"]) == (block, method) and r.get(metric) is not None:
            return r[metric], r.get(f"{metric}_std", 0.0), r["n"]
    return None


def tail_range(c: list[float]) -> float:
    """max - min of a curve over its last ceil(20 %) of epochs and the epoch before."""
    k = max(1, math.ceil(0.2 * len(c)))
    return max(c[-k - 1:]) - min(c[-k - 1:])


def plateau_of(rows: list[dict], block: str, method: str) -> dict | None:
    """The plateau check of one cell (worst seed), or None where it has no val curve."""
    curves = [r["val_curve"] for r in rows
              if (r["block"], r["method"]) == (block, method) and r.get("val_curve")]
    curves = [c for c in curves if len(c) > 1]
    if not curves:
        return None
    worst = max(100 * tail_range(c) for c in curves)
    return dict(block=block, method=method, epochs=len(curves[0]), range_points=worst,
                plateaued=worst <= PLATEAU_POINTS + 1e-9)


def compare(st, block, a, b, metric, higher=True, scale=100.0):
    """(gain of ``a`` over ``b`` in display units, whether it clears the seeds' spread)."""
    x, y = lookup(st, block, a, metric), lookup(st, block, b, metric)
    if x is None or y is None:
        return None
    gain = scale * ((x[0] - y[0]) if higher else (y[0] - x[0]))
    spread = scale * math.hypot(x[1], y[1])
    return gain, (None if min(x[2], y[2]) < 2 else abs(gain) > spread)


def verdict(results) -> str:
    results = [r for r in results if r is not None]
    if not results:
        return "not run"
    wins = sum(g > 0 for g, _ in results)
    if wins == len(results):
        return "held" if all(c for _, c in results) else "held (within seed spread)"
    if wins == 0:
        return "did not hold"
    return f"held in {wins} of {len(results)} comparisons"


def parity(results) -> str:
    """For "within noise of" claims: held where no gap clears the seeds' spread."""
    results = [r for r in results if r is not None]
    if not results:
        return "not run"
    if any(c is None for _, c in results):
        return "not judged (one seed: no spread)"
    return "held (within noise)" if not any(c for _, c in results) else "did not hold"


def unjudged(measured: str, baselines: list[dict]) -> str:
    """``measured`` as is, or marked not judged where a baseline did not plateau."""
    bad = list(dict.fromkeys(p["method"] for p in baselines if p and not p["plateaued"]))
    if not bad or measured == "not run":
        return measured
    return f"not judged ({', '.join(bad)} not plateaued; measured: {measured})"
