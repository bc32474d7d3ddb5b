"""The condensation benchmark's --quick mode end to end (slow: about 2-4 minutes)."""

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_condense_quick(tmp_path):
    out, doc = tmp_path / "c.json", tmp_path / "c.md"
    t0 = time.time()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks/condense.py"),
            "--quick",
            "--no-progress",
            "--out",
            str(out),
            "--doc",
            str(doc),
            "--work",
            str(tmp_path / "work"),
        ],
        check=True,
        cwd=ROOT,
        timeout=600,
    )
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    # the budget is 5 minutes of one core; wall time on a shared machine is reported only
    print(f"quick benchmark: {time.time() - t0:.0f}s wall, {cpu:.0f}s CPU")
    assert cpu < 300
    res = json.loads(out.read_text())
    methods = {c["method"] for c in res["cells"]}
    assert {"full", "random", "dm", "dc", "mtt", "ncfm"} <= methods
    assert all("archs" in c for c in res["cells"] if c["method"] in {"dm", "random"})
    assert {r["method"] for r in res["side_by_side"]} == {"dm", "dc"}
    text = doc.read_text()
    assert "## Claims" in text and "ours/plain" in text
