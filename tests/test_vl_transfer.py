"""Block ``transfer`` of benchmarks/vl.py (DistillNearest / DistillWeighted, ProC-KD) end to
end at its quick profile."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_block_interface():
    import vl_transfer as B

    assert B.BLOCK == "transfer" and B.BASELINE in B.METHODS
    assert set(B.PROFILES) == {"full", "quick"} and B.METRIC[0] == "test_acc"
    assert set(B.PLATEAU_ARMS) <= set(B.METHODS)
    for claim in B.CLAIMS:
        assert all(a in B.METHODS and b in B.METHODS for a, b in claim["pairs"])
    with pytest.raises(KeyError, match="not an arm"):
        B.run("fixmatch", 0, B.PROFILES["quick"], Path("."))


@pytest.mark.slow
def test_quick_profile_runs(tmp_path, one_thread):
    import vl_transfer as B

    P = B.PROFILES["quick"]
    meta = B.teachers(P, tmp_path)
    assert {"source-inverted", "source-rotated", "source-digits", "xt-teacher"} <= set(meta)
    assert all(0.0 <= meta[f"source-{n}"]["score"] <= 1.0 for n in B.SOURCES)
    again = B.teachers(P, tmp_path)  # cached: loaded, not trained again
    assert again["source-rotated"] == meta["source-rotated"]
    for method in ("finetune", "distill-weighted", "xt-proc-kd"):
        row = B.run(method, 0, P, tmp_path)
        assert 0.0 <= row["test_acc"] <= 1.0 and len(row["val_curve"]) == row["epochs"]
    assert row["teacher_val_acc_own_classes"] > 0
