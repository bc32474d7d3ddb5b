"""The LLaVA-KD block of the vision-language benchmark (benchmarks/vl_llava.py): its interface
and the quick profile of two arms end to end into a temporary cache."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def block():
    spec = importlib.util.spec_from_file_location("vl_llava", ROOT / "benchmarks/vl_llava.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_interface(block):
    assert block.BLOCK == "llava" and block.BASELINE in block.METHODS
    assert set(block.ARMS) | {"teacher"} == set(block.METHODS)
    assert block.METRIC[0] == "test_acc" and set(block.PROFILES) == {"full", "quick"}
    for claim in block.CLAIMS:
        assert all(a in block.METHODS and b in block.METHODS for a, b in claim["pairs"])
    assert block.cache_key(block.PROFILES["full"]) != block.cache_key(block.PROFILES["quick"])
    with pytest.raises(ValueError, match="unknown method"):
        block.run("nope", 0, block.PROFILES["quick"], Path("/nonexistent"))


@pytest.mark.slow
def test_quick_end_to_end(block, tmp_path, one_thread):
    P = block.PROFILES["quick"]
    meta = block.teachers(P, tmp_path)
    assert {"teacher", "student-lm"} <= set(meta)
    t = block.run("teacher", 0, P, tmp_path)
    r = block.run("llava-kd", 0, P, tmp_path)
    for res in (t, r):
        assert 0.0 <= res["test_acc"] <= 1.0 and res["val_curve"] and res["epochs"] >= 1
        assert all(math.isfinite(v) for v in res["val_curve"])
    assert list(r["stages"]) == ["dpt", "sft", "dft"]
    assert len(r["val_curve"]) == P["epochs"]["dft"]
    again = block.run("teacher", 1, P, tmp_path)  # cached: the same teacher for every seed
    assert again["test_acc"] == t["test_acc"]
