"""The vision-language benchmark driver (benchmarks/vl.py): plateau and claim logic on fake
rows, every block module's interface, and (slow) --quick end to end into a temporary dir."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.fixture(scope="module")
def vl():
    return importlib.import_module("vl")


class FakeBlock:
    METHODS = ["base", "new"]
    BASELINE = "base"
    METRIC = ("test_acc", "acc", 100.0)
    EXTRA = [("epochs_x", "epochs")]
    SCALES = {"epochs_x": 1.0}
    CLAIMS = [dict(name="new", pairs=[("new", "base")], text="new > base"),
              dict(name="fast", pairs=[("new", "base")], metric="epochs_x", higher=False,
                   text="fewer epochs")]


def _rows(flat=True):
    rows = []
    for m, a in (("base", 0.80), ("new", 0.85)):
        for s, d in enumerate((-0.002, 0.0, 0.002)):
            c = [0.5, 0.7, 0.79, 0.8, 0.8] if flat else [0.5, 0.6, 0.7, 0.75, 0.8]
            rows.append(dict(block="fake", method=m, seed=s, test_acc=a + d, val_curve=c,
                             epochs_x=10.0 if m == "base" else 6.0, seconds=1.0))
    return rows


def test_claims_need_a_plateaued_baseline(vl):
    mods = {"fake": FakeBlock}
    rows = _rows()
    st = vl.stats(rows, mods)
    plat = vl.plateau(rows, mods)
    assert plat[0]["plateaued"] and plat[0]["range_points"] == pytest.approx(0.0)
    cl = {c["method"]: c for c in vl.claims(st, plat, mods)}
    assert cl["new"]["verdict"] == "held" and "+5.00 points" in cl["new"]["evidence"][0]
    assert cl["fast"]["verdict"] == "held" and "+4.00" in cl["fast"]["evidence"][0]
    rising = _rows(flat=False)
    plat = vl.plateau(rising, mods)
    assert not plat[0]["plateaued"]
    cl = vl.claims(vl.stats(rising, mods), plat, mods)
    assert cl[0]["verdict"].startswith("not judged")
    assert "acc" in vl.tables(st, mods, 3)


class ChainBlock(FakeBlock):
    METHODS = ["base", "mid", "new"]
    CLAIMS = [dict(name="chain", pairs=[("new", "mid")], text="new > mid")]


def test_each_claim_is_judged_against_its_own_baseline(vl):
    rows = _rows()  # base plateaus; "mid" (the claim's baseline) is still rising
    rows += [dict(r, method="mid", val_curve=[0.5, 0.6, 0.7, 0.75, 0.8]) for r in _rows()
             if r["method"] == "base"]
    mods = {"fake": ChainBlock}
    plat = vl.plateau(rows, mods)
    assert {(p["method"], p["plateaued"]) for p in plat} == {("base", True), ("mid", False)}
    (c,) = vl.claims(vl.stats(rows, mods), plat, mods)
    assert c["verdict"].startswith("not judged (mid not plateaued")
    FakeBlock.BASELINE, saved = None, FakeBlock.BASELINE  # no BASELINE: fixed schedules
    try:
        assert vl.plateau(rows, mods) == []
        (c,) = vl.claims(vl.stats(rows, mods), [], mods)
        assert c["verdict"] == "held"
    finally:
        FakeBlock.BASELINE = saved


def test_every_block_module_has_the_interface(vl):
    mods = vl.available()
    assert {"tinyclip", "dho", "peer"} <= set(mods)
    for name, mod in mods.items():
        assert mod.BLOCK == name
        assert set(mod.PROFILES) >= {"full", "quick"}
        assert callable(mod.run) and callable(mod.teachers)
        assert mod.METRIC[0].startswith("test_") or mod.METRIC[0]
        base = getattr(mod, "BASELINE", None)
        assert base is None or base in mod.METHODS
        for c in mod.CLAIMS:
            rows = getattr(mod, "ROWS", mod.METHODS)
            assert all(a in rows and b in rows for a, b in c["pairs"]), (name, c)


@pytest.mark.slow
def test_quick_end_to_end(tmp_path):
    out, md = tmp_path / "vl.json", tmp_path / "vl.md"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/vl.py"), "--quick",
                        "--workers", "2", "--cache", str(tmp_path / "cache"), "--out", str(out),
                        "--md", str(md)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert not res["failed"] and res["runs"]
    assert "quick" in md.read_text()


def test_a_cell_may_return_the_rows_of_a_side_by_side_peer(vl):
    class PeerBlock(FakeBlock):
        METHODS = ["new"]
        ROWS = ["new", "peer"]
        CLAIMS = [dict(name="peer", pairs=[("new", "peer")], text="new > peer")]
        BASELINE = None

    rows = []
    for s in range(3):
        cell = dict(block="fake", method="new", seed=s, test_acc=0.9, seconds=2.0,
                    also=[dict(block="fake", method="peer", seed=s, test_acc=0.8)])
        rows += vl.expand(cell)
    assert [r["method"] for r in rows[:2]] == ["new", "peer"] and "also" not in rows[0]
    mods = {"fake": PeerBlock}
    st = vl.stats(rows, mods)
    assert "peer" in vl.tables(st, mods, 3)
    (c,) = vl.claims(st, vl.plateau(rows, mods), mods)
    assert c["verdict"] == "held" and "+10.00" in c["evidence"][0]
