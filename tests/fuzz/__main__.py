"""``python -m tests.fuzz [--n N] [--seed S] [--profile full|fast]``: run the fuzz suite,
print the outcome table and every failure, and write the summary as JSON."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

from . import generate, run_cases, summarize
from .runner import table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", choices=("full", "fast"), default="full")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--workdir", help="default: a new temporary directory")
    p.add_argument("--json", help="write the summary here")
    p.add_argument("--findings", help="write the failures as markdown here")
    p.add_argument("--surface", action="append", help="only cases of these surfaces")
    p.add_argument("--family", action="append", help="only cases of these families")
    a = p.parse_args(argv)
    cases = generate(a.n, a.seed, a.profile)
    if a.surface:
        cases = [c for c in cases if c.surface in a.surface]
    if a.family:
        cases = [c for c in cases if c.family in a.family]
    work = a.workdir or tempfile.mkdtemp(prefix="crossdistill-fuzz-")
    t0 = time.time()

    def tick(i, r):
        if r.outcome not in ("ok", "clean-error"):
            print(f"  [{i}] {r.outcome:16s} {r.case.surface:16s} {r.case.mutation[:70]} "
                  f"-> {r.detail[:120]}", file=sys.stderr, flush=True)

    results, runner = run_cases(cases, work, timeout=a.timeout, progress=tick)
    s = summarize(results, runner)
    s.update(seed=a.seed, profile=a.profile, wall_seconds=round(time.time() - t0, 1),
             workdir=work)
    print(table(s))
    if a.findings:
        from .report import findings_md

        with open(a.findings, "w") as f:
            f.write(findings_md(s))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(s, f, indent=1)
    return 0 if s["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
