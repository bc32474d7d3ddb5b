"""The cross-modal benchmark (benchmarks/crossmodal.py): its plateau and claim logic on fake
numbers, and (slow) --quick end to end into a temporary directory."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("crossmodal_bench",
                                                  ROOT / "benchmarks/crossmodal.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _rows(acc, flat=True):
    """Three seeds per (block, method) at +-0.001 around ``acc``; a flat or rising curve."""
    rows = []
    for (block, method), a in acc.items():
        for s, d in enumerate((-0.001, 0.0, 0.001)):
            c = [0.5, 0.8, 0.9, a, a] if flat else [0.5, 0.6, 0.7, 0.8, a]
            rows.append(dict(block=block, method=method, seed=s, test_acc=a + d, val_curve=c,
                             seconds=1.0, image_only=a - 0.1, audio_only=a - 0.2,
                             random50=a - 0.15))
    return rows


FAKE = {("image", "ce"): 0.90, ("image", "kd"): 0.91, ("image", "fitnet"): 0.905,
        ("image", "crd"): 0.90, ("image", "mst"): 0.93}


def test_claims_need_a_plateaued_baseline(bench):
    rows = _rows(FAKE)
    st, plat = bench.stats(rows), bench.plateau(rows)
    assert plat == [dict(block="image", method="ce", epochs=5, range_points=0.0, plateaued=True)]
    got = {c["method"]: c for c in bench.claims(st, plat)}
    assert got["MST-Distill"]["verdict"] == "held"
    assert "mst vs kd: +2.00 points" in got["MST-Distill"]["evidence"]
    assert got["BiDA"]["verdict"] == "not run"
    rising = _rows(FAKE, flat=False)
    plat = bench.plateau(rising)
    assert not plat[0]["plateaued"] and plat[0]["range_points"] > 0.5
    got = {c["method"]: c for c in bench.claims(bench.stats(rising), plat)}
    assert got["MST-Distill"]["verdict"].startswith("not judged")


def test_table_lists_methods_in_block_order(bench):
    table = bench.tables(bench.stats(_rows(FAKE)), {"seeds": 3})
    lines = [ln.split("|")[1].strip() for ln in table.splitlines() if ln.startswith("| ")]
    assert lines == ["method", "ce", "kd", "fitnet", "crd", "mst"]


@pytest.mark.slow
def test_quick_end_to_end(tmp_path):
    out = tmp_path / "cm.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/crossmodal.py"), "--quick", "--fresh",
           "--blocks", "image", "missing", "--out", str(out), "--md", str(tmp_path / "cm.md"),
           "--cache", str(tmp_path / "cache")]
    subprocess.run(cmd, check=True, timeout=600, cwd=ROOT)
    res = json.loads(out.read_text())
    assert not res["failed"] and not res["runs_not_run"]
    methods = {(r["block"], r["method"]) for r in res["runs"]}
    assert ("image", "mst") in methods and ("missing", "mmanet") in methods
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in res["runs"])
    assert "## Claims" in (tmp_path / "cm.md").read_text()
