"""Issue #11, item 2: generated configs over every CLI surface (train, the lm/seg/av tasks,
condense, cache-teacher) end in exit 0 or one clean ``crossdistill: error:`` line with exit
2; never a traceback, an OOM kill or a hang. The outcome counts are printed (``pytest -s``)
and written to benchmarks/results/fuzz.json. See tests/fuzz/ for the generator and runner.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fuzz import FAILURES, generate, run_cases, summarize
from fuzz.bases import BASES
from fuzz.generate import FAMILIES
from fuzz.runner import Result, classify, table

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "fuzz.json"


def _record(profile: str, summary: dict) -> None:
    """Keep the latest summary of each profile in benchmarks/results/fuzz.json."""
    try:
        old = json.loads(RESULTS.read_text())
    except (OSError, ValueError):
        old = {}
    keep = {k: v for k, v in summary.items() if k != "failures"}
    keep["failures"] = {
        area: {out: rows[:5] for out, rows in outs.items()}
        for area, outs in summary["failures"].items()
    }
    old[profile] = keep
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(old, indent=1) + "\n")


def _fuzz(n: int, seed: int, profile: str, workdir: Path, timeout: float) -> None:
    results, runner = run_cases(generate(n, seed, profile), workdir, timeout=timeout)
    summary = summarize(results, runner)
    summary.update(seed=seed, profile=profile)
    print(f"\nfuzz ({profile}, seed {seed}):\n{table(summary)}")
    if profile == "full":  # the slow 1000-case run is the recorded figure; the sample prints
        _record(profile, summary)
    failed = [r for r in results if r.outcome in FAILURES]
    lines = [
        f"{r.case.id} {r.outcome} [{r.case.surface}] {r.case.mutation[:90]} -> {r.detail[:160]}"
        for r in failed
    ]
    assert not failed, f"{len(failed)} of {len(results)} cases failed:\n" + "\n".join(lines[:60])


def test_fuzz_sample_150(tmp_path, one_thread):
    """The fast sample: mostly quick refusals plus a handful of valid --check runs."""
    _fuzz(150, 11, "fast", tmp_path, timeout=15)


@pytest.mark.slow
def test_fuzz_1000(tmp_path, one_thread):
    _fuzz(1000, 0, "full", tmp_path, timeout=30)


def test_generator_is_seeded_and_covers_every_surface():
    a, b = generate(400, 0), generate(400, 0)
    assert [(c.surface, c.mutation, c.argv, c.files, c.ops) for c in a] == [
        (c.surface, c.mutation, c.argv, c.files, c.ops) for c in b
    ]
    assert {c.surface for c in a} == set(BASES)
    assert {c.family for c in a} == set(FAMILIES)
    assert all(c.mutation and c.area for c in a)
    assert [c.mutation for c in generate(20, 1)] != [c.mutation for c in generate(20, 2)]


@pytest.mark.parametrize(
    "rc, err, expect, outcome",
    [
        (0, "", "any", "ok"),
        (0, "", "error", "accepted"),
        (2, "crossdistill: error: train.lr: got 'hot'; a float\n", "any", "clean-error"),
        (2, "crossdistill: error: train.lr: got 'hot'; a float\n", "ok", "refused-valid"),
        (2, "usage: crossdistill ...\ncrossdistill: error: bad\n", "any", "multi-line error"),
        (2, "crossdistill: error: x: got '" + "a" * 5000 + "'\n", "any", "long error"),
        (1, 'Traceback (most recent call last):\n  File "x.py", line 1\nKeyError: 3\n', "any",
         "traceback"),
        (2, "Traceback (most recent call last):\nValueError: v\ncrossdistill: error: v\n", "any",
         "traceback+exit2"),
        (1, "crossdistill: internal error: boom\n", "any", "internal error"),
        ("hang", "", "any", "hang"),
        ("signal SIGKILL", "", "any", "killed"),
    ],
)
def test_classify(rc, err, expect, outcome):
    case = generate(1, 0)[0]
    case.expect = expect
    r = classify(case, rc, err, len(err), 0.1)
    assert isinstance(r, Result) and r.outcome == outcome
    assert (outcome in FAILURES) == (outcome not in ("ok", "clean-error"))
