"""Block ``repblend`` (benchmarks/vl_repblend.py): its interface, and the quick profile of two
arms end to end into a temporary cache (teachers trained, then loaded from the cache)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def block():
    spec = importlib.util.spec_from_file_location("vl_repblend", ROOT / "benchmarks/vl_repblend.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_interface(block):
    assert block.BLOCK == "repblend" and block.BASELINE in block.METHODS
    assert set(block.ARMS) | {"random-real"} == set(block.METHODS)
    assert block.METRIC[0] == "test_r10" and set(block.PROFILES) == {"full", "quick"}
    for c in block.CLAIMS:
        assert all(a in block.METHODS and b in block.METHODS for a, b in c["pairs"])
    full = block.PROFILES["full"]
    assert full["n_pairs"] == 100 and full["seeds"] == 3
    assert (full["syn_steps"], full["expert_epochs"], full["max_start_epoch"]) == (8, 1, 2)
    assert (full["sim_rank"], full["sim_alpha"]) == (10, 3.0)
    with pytest.raises(KeyError):
        block.run("lors", 0, block.PROFILES["quick"], Path("unused"))


def test_quick_profile_two_arms(block, tmp_path):
    P = block.PROFILES["quick"]
    meta = block.teachers(P, tmp_path)
    assert 0.0 <= meta["top"]["val_acc"] <= 1.0 and meta["experts"]["epochs"] == 3
    files = sorted(p.name for p in tmp_path.iterdir())
    assert any(f.startswith("vl_repblend_experts_") for f in files)
    import hetero

    hetero._MEMO.clear()  # the second call loads everything from the cache
    assert block.teachers(P, tmp_path)["experts"] == meta["experts"]
    for arm in ("random-real", "repblend"):
        r = block.run(arm, 0, P, tmp_path)
        for k in ["test_r10", *(k for k, _ in block.EXTRA), "val_r_mean"]:
            assert 0.0 <= r[k] <= 1.0, (arm, k)
        assert r["val_curve"] and r["epochs"] == len(r["val_curve"])
        json.dumps(r, default=str)
    assert r["chosen_iteration"] in (3, 6) and r["skipped_steps"] == 0
