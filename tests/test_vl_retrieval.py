"""Block ``retrieval`` of benchmarks/vl.py (benchmarks/vl_retrieval.py): its interface, and
its quick profile end to end for a dual-encoder arm and a cross-encoder arm."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import vl_retrieval as B  # noqa: E402


def test_interface():
    assert B.BLOCK == "retrieval" and B.BASELINE in B.METHODS
    assert set(B.PROFILES) == {"full", "quick"}
    for claim in B.CLAIMS:
        assert all(a in B.METHODS and b in B.METHODS for a, b in claim["pairs"])
    assert B.METRIC[0] == "test_r@1"
    with pytest.raises(ValueError, match="unknown arm"):
        B.run("nope", 0, B.PROFILES["quick"], Path("/nonexistent"))


@pytest.mark.slow  # ~8 s alone, ~25 s on the shared CPU
def test_quick_arms_end_to_end(tmp_path):
    P = B.PROFILES["quick"]
    meta = B.teachers(P, tmp_path)
    assert set(meta) == {"dual", "cross (re-ranking the dual top-k)"}
    assert len(list(tmp_path.glob("*.safetensors"))) == 2  # cached
    for arm in ("cprd", "dcd"):
        row = B.run(arm, 0, P, tmp_path)
        assert 0.0 <= row["test_r@1"] <= row["test_r@5"] <= row["test_r@10"] <= 1.0
        assert len(row["val_curve"]) == row["epochs"] >= 1
    assert "first_stage_test_recall" in row  # the cross-encoder arm re-ranks lists
