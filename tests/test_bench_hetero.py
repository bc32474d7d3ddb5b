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


def test_trend_cells_and_low_regime_baselines():
    b = _bench()
    cells = b.trend_cells(["kd", "taid", "scalekd"])
    assert ("resnet->mlp-mixer-xs", "rkl") in cells and ("vit-s->resnet", "scalekd") in cells
    assert b.trend_cells(["kd"]) == []  # a trend runs only when its own method is on
    assert b.VARIANTS["fkl"] == ("kd", {"temperature": 1.0, "weight": 1.0})


def _rows(cells):
    rows = []
    for (pair, method), acc in cells.items():
        for seed, jitter in enumerate((0.0, 0.01, -0.01)):
            rows.append(
                dict(
                    dataset="mnist",
                    regime="low",
                    pair=pair,
                    method=method,
                    seed=seed,
                    test_acc=acc + jitter,
                    seconds=1.0,
                )
            )
    return rows


def test_trend_claims_from_numbers():
    b = _bench()
    gap = b.TRENDS["taid_gap"][0]  # largest gap first: TAID's gain shrinks along the list
    cells = {}
    for i, p in enumerate(gap):
        cells.update(
            {
                (p, "taid"): 0.80,
                (p, "fkl"): 0.80 - 0.03 + 0.01 * i,
                (p, "rkl"): 0.80 - 0.02 + 0.01 * i,
            }
        )
    cells.update(
        {
            ("vit-s->resnet", "scalekd"): 0.85,
            ("vit->resnet", "scalekd"): 0.90,
            ("*->resnet", "scratch"): 0.84,
        }
    )
    meta = {"mnist/vit": {"test_acc": 0.95}, "mnist/vit-s": {"test_acc": 0.90}}
    got = {c["method"]: c for c in b.trend_claims(b.cell_stats(_rows(cells)), meta, ["mnist"])}
    assert got["TAID (trend)"]["verdict"] == "held"
    cells[(gap[0], "fkl")] = 0.80  # no gain over fkl at the largest gap: held vs rkl only
    got = {c["method"]: c for c in b.trend_claims(b.cell_stats(_rows(cells)), meta, ["mnist"])}
    assert got["TAID (trend)"]["verdict"] == "held vs rkl only"
    assert got["ScaleKD (trend)"]["verdict"] == "held"
    assert "+6.00" in got["ScaleKD (trend)"]["summary"]  # 0.90 - 0.84
    meta["mnist/vit"]["test_acc"] = 0.85  # the big ViT is the weaker teacher: no test
    got = {c["method"]: c for c in b.trend_claims(b.cell_stats(_rows(cells)), meta, ["mnist"])}
    assert got["ScaleKD (trend)"]["verdict"].startswith("not tested")
