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


def test_error_rate_claims_and_probe_metrics(bench):
    rows = []
    for method, cer in (("ce", 0.30), ("frame+seq", 0.25), ("all", 0.20), ("all-nolcs", 0.22)):
        for s, d in enumerate((-0.001, 0.0, 0.001)):
            rows.append(dict(block="libs", method=method, seed=s, test_cer=cer + d,
                             val_curve=[0.9, 0.5, cer, cer, cer], seconds=1.0))
    for method, (c, cv) in (("c20-v10-m0.3", (0.80, 0.90)), ("c20-v10-m0.7", (0.85, 0.88)),
                            ("c5-v10-m0.7", (0.70, 0.91))):
        for s in range(3):
            rows.append(dict(block="mrdd", method=method, seed=s, test_acc=cv, c_test_acc=c,
                             seconds=1.0, loss_curves={"stage1": [3.0, 2.0, 1.0, 1.0, 1.01]}))
    st, plat = bench.stats(rows), bench.plateau(rows)
    assert plat == [dict(block="libs", method="ce", epochs=5, range_points=0.0,
                         plateaued=True)]
    got = {c["method"]: c for c in bench.claims(st, plat)}
    assert got["LIBS"]["verdict"] == "held"  # lower error rate = a gain
    assert "frame+seq vs ce (test_cer): +5.00 points" in got["LIBS"]["evidence"]
    assert got["MRDD (mask)"]["verdict"] == "held"  # read on c, not on [c, v]
    assert got["MRDD (dims)"]["verdict"] == "held"
    lp = bench.loss_plateau(rows)
    assert {r["stage"] for r in lp} == {"stage1"}
    assert lp[0]["range_percent"] == pytest.approx(100 * 0.01 / 1.01)
    table = bench.tables(st, {"seeds": 3})
    assert "probe on c" in table and "test cer" in table


def test_saved_runs_are_keyed_per_block(bench):
    P = bench.copy.deepcopy(bench.FULL)
    keys = {b: bench.block_key(b, P) for b in bench.BLOCKS}
    P["bida"]["epochs"] += 1
    new = {b: bench.block_key(b, P) for b in bench.BLOCKS}
    assert new == {**keys, "bida": new["bida"]}
    assert bench.block_key("bida", P) != keys["bida"]
    P["epochs"] += 1  # the shared profile: image and missing rerun, the others do not
    changed = {b for b in bench.BLOCKS if bench.block_key(b, P) != keys[b]}
    assert changed == {"image", "missing", "bida"}


@pytest.mark.slow
def test_quick_end_to_end(tmp_path):
    out = tmp_path / "cm.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/crossmodal.py"), "--quick", "--fresh",
           "--out", str(out), "--md", str(tmp_path / "cm.md"),
           "--cache", str(tmp_path / "cache")]
    subprocess.run(cmd, check=True, timeout=600, cwd=ROOT)
    res = json.loads(out.read_text())
    assert not res["failed"] and not res["runs_not_run"]
    methods = {(r["block"], r["method"]) for r in res["runs"]}
    assert ("image", "mst") in methods and ("missing", "mmanet") in methods
    assert {b for b, _ in methods} == {"image", "missing", "mrdd", "bida", "libs"}
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in res["runs"] if r["block"] != "libs")
    assert all(r["test_cer"] >= 0.0 for r in res["runs"] if r["block"] == "libs")
    assert "## Claims" in (tmp_path / "cm.md").read_text()
