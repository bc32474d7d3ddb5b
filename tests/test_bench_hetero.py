"""The heterogeneous-KD benchmark's --quick mode end to end (slow: about 2-5 min on 1 thread).

Writes into a temporary directory, so the committed results are never overwritten."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_hetero_quick(tmp_path):
    out, md = tmp_path / "hetero.json", tmp_path / "hetero.md"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks/hetero.py"),
        "--quick",
        "--threads",
        "1",
        "--out",
        str(out),
        "--md",
        str(md),
        "--cache",
        str(tmp_path / "cache"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["config"]["quick"] and res["wall_seconds"] < 300
    methods = {r["method"] for r in res["runs"]}
    assert {"scratch", "kd", "ofa", "pld", "taid", "scalekd", "collaborative", "dml"} <= methods
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in res["runs"])
    verdicts = {c["method"]: c["verdict"] for c in res["claims"]}
    assert set(verdicts) == {"OFA", "PLD", "TAID", "ScaleKD", "Collaborative (HFD+BSD)"}
    assert "not measured" not in verdicts.values()
    text = md.read_text()
    assert "## Claims" in text and "resnet->vit" in text


def _bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("hetero_bench", ROOT / "benchmarks/hetero.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_plan_dedupes_scratch_and_collaborative_runs():
    plan = _bench().plan(["resnet->vit", "vit->resnet"], ["scratch", "kd", "collaborative"])
    assert plan.count(("*->vit", "scratch")) == 1 and plan.count(("*->resnet", "scratch")) == 1
    assert plan.count(("resnet+vit", "collaborative")) == 1  # one run fills both rows
    assert ("resnet+vit", "dml") in plan
    assert {("resnet->vit", "kd"), ("vit->resnet", "kd")} <= set(plan)
    assert len(plan) == 6


def test_claims_verdicts_from_numbers():
    b = _bench()
    rows = []
    for method, acc in {"kd": 0.80, "fitnet": 0.70, "ofa": 0.85, "dkd": 0.9, "pld": 0.82}.items():
        for seed, jitter in enumerate((0.0, 0.01, -0.01)):
            rows.append(
                dict(
                    dataset="mnist",
                    regime="low",
                    pair="resnet->vit",
                    method=method,
                    seed=seed,
                    test_acc=acc + jitter,
                    seconds=1.0,
                )
            )
    claims = {
        c["method"]: c
        for c in b.claims(b.cell_stats(rows), ["mnist"], ["low"], {"low": ["resnet->vit"]})
    }
    assert claims["OFA"]["verdict"] == "held"
    assert "+5.00 vs kd" in claims["OFA"]["evidence"][0]
    assert claims["PLD"]["verdict"] == "did not hold"  # beats KD, loses to DKD
    assert claims["TAID"]["verdict"] == "not measured"
