"""benchmarks/dense.py: every present block module follows the driver's interface, and
(slow) ``--quick`` runs end to end into a temporary dir."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_every_block_has_the_driver_interface():
    dense = importlib.import_module("dense")
    blocks = dense.available()
    assert {"seg", "clock", "ezad"} <= set(blocks)
    for name, mod in blocks.items():
        assert mod.BLOCK == name
        assert mod.BASELINE is None or mod.BASELINE in mod.METHODS
        assert set(mod.PROFILES) == {"full", "quick"}
        for claim in mod.CLAIMS:
            for a, b in claim["pairs"]:
                assert {a, b} <= set(getattr(mod, "ROWS", mod.METHODS)), (name, a, b)
        assert callable(mod.run) and callable(mod.teachers)


@pytest.mark.slow
def test_quick_end_to_end(tmp_path):
    out, md = tmp_path / "dense.json", tmp_path / "dense.md"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/dense.py"), "--quick",
                        "--workers", "2", "--cache", str(tmp_path / "cache"), "--out", str(out),
                        "--md", str(md)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert not res["failed"] and res["runs"]
    assert "quick" in md.read_text()
