"""The LM benchmark (benchmarks/lm.py): its claim, plateau and table logic on fake numbers,
its method table as configs the library accepts, and (slow) --quick end to end.

The end-to-end test writes into a temporary directory, so the committed results are never
overwritten."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("lm_bench", ROOT / "benchmarks/lm.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


# test bits per byte by (cell, method): three seeds at +-0.001 around these means
FAKE = {
    ("s", "ce"): 2.50,
    ("s", "fkl"): 2.40,
    ("s", "rkl"): 2.45,
    ("s", "taid"): 2.38,
    ("xs", "ce"): 2.80,
    ("xs", "fkl"): 2.70,
    ("xs", "rkl"): 2.75,
    ("xs", "taid"): 2.60,
    ("s", "gkd"): 2.41,
    ("s", "gkd-off"): 2.39,
    ("s", "bistil"): 2.42,
    ("s", "bistil-rand"): 2.42,
    ("char", "x-ce"): 2.90,
    ("char", "x-uld"): 2.85,
    ("char", "x-alm"): 2.80,
    ("bpe512", "x-ce"): 2.70,
    ("bpe512", "x-uld"): 2.75,
    ("bpe512", "x-alm"): 2.60,
}


def fake_rows(values=FAKE, curve=None):
    rows = []
    for (cell, method), v in values.items():
        for seed, d in enumerate((-0.001, 0.0, 0.001)):
            rows.append(
                dict(
                    cell=cell,
                    method=method,
                    seed=seed,
                    test_bpb=v + d,
                    test_ppl=None if cell in ("char", "bpe512") else 2 ** (3 * (v + d)),
                    best_val_bpb=v + d + 0.01,
                    seconds=1.0,
                    val_curve=curve or [v + 0.3, v + 0.1, v + 0.003, v],
                )
            )
    return rows


def verdicts(bench, rows, avail=None):
    stats = bench.cell_stats(rows)
    return {c["method"]: c for c in bench.claims(stats, _p4(bench), avail or {})}


def test_claims_on_fake_numbers(bench):
    got = verdicts(bench, fake_rows())
    assert got["TAID"]["verdict"] == "held"  # 2.38 < 2.40, 2.45 and 2.60 < 2.70, 2.75
    assert got["TAID (gap)"]["verdict"] == "held"  # gains 0.02/0.07 at s, 0.10/0.15 at xs
    assert "growth +0.080 bits" in got["TAID (gap)"]["evidence"][0]
    assert got["GKD"]["verdict"] == "did not hold"  # on-policy 2.41 vs off-policy 2.39
    assert got["BiStil"]["verdict"] == "did not hold"  # a tie is not a win (> claim)
    # ALM > ULD holds in both cells, ULD > CE only for the char student
    assert got["ALM / ULD"]["verdict"] == "held in 3 of 4 comparisons"
    assert got["CoMD"]["verdict"] == "not measured (not run)"


def test_claims_within_spread_missing_and_ties(bench):
    close = dict(FAKE)
    close[("s", "taid")] = 2.3995  # better than fkl by less than the seeds' spread
    close[("xs", "taid")] = 2.6995
    got = verdicts(bench, fake_rows(close))
    assert got["TAID"]["verdict"] == "held (within seed spread)"
    tie = dict(FAKE)
    tie[("s", "taid")], tie[("xs", "taid")] = 2.40, 2.70  # TAID >= fkl: a tie holds
    assert verdicts(bench, fake_rows(tie))["TAID"]["verdict"].startswith("held")
    one_seed = [r for r in fake_rows() if r["seed"] == 0]
    assert verdicts(bench, one_seed)["TAID"]["verdict"] == "held (one seed: no spread)"
    no_alm = {k: v for k, v in FAKE.items() if k[1] != "x-alm"}
    avail = {"x-alm": ["losses alm"]}
    got = verdicts(bench, fake_rows(no_alm), avail)
    assert got["ALM / ULD"]["verdict"] == "not measured (losses alm not available)"


def _p4(bench):
    """A fixed profile for the table logic (the real one's sizes may change)."""
    cross = {"char": {"tokenizer": "char"}, "bpe512": {"tokenizer": "bpe", "vocab_size": 512}}
    return {**bench.FULL, "epochs": 4, "cross_epochs": 4, "cross": cross}


def test_plateau_check(bench):
    P = _p4(bench)  # 4 epochs: the last 20 % is 1 epoch, compared with the one before
    got = {p["cell"]: p for p in bench.plateau(fake_rows(), P)}
    assert set(got) == {"s", "xs", "char", "bpe512"}
    assert got["s"]["plateaued"] and got["s"]["range_bits"] == pytest.approx(0.003)
    moving = bench.plateau(fake_rows(curve=[3.0, 2.8, 2.7, 2.6]), P)
    assert not any(p["plateaued"] for p in moving)  # 0.1 bits > 0.5 % of 2.6
    assert moving[0]["range_bits"] == pytest.approx(0.1)
    assert bench.plateau(fake_rows(curve=[3.0, 2.8, 2.7, 2.69]), P)[0]["plateaued"]  # 0.37 %
    assert moving[0]["epochs"] == "3..4"


def test_tables_and_report(bench):
    rows = fake_rows()
    stats = bench.cell_stats(rows)
    avail = {"comd": ["module crossdistill.lm.comd:comd"]}
    res = {
        "profile": _p4(bench),
        "cells": stats,
        "config": {
            "seeds": 3,
            "methods": list(bench.METHODS),
            "quick": False,
            "workers": 2,
            "threads": 1,
        },
        "available": avail,
        "sizes": {"teacher": 1_000_000, "s": 200_000, "xs": 80_000},
        "teacher": {"test_bpb": 2.1, "test_ppl": 90.0, "best_epoch": 7, "epochs": 8},
        "plateau": bench.plateau(rows, _p4(bench)),
        "claims": bench.claims(stats, _p4(bench), avail),
        "wall_seconds": 60.0,
    }
    text = bench.report(res)
    assert "| taid " in text and "2.380 +- 0.001" in text
    assert "not available: comd (module crossdistill.lm.comd:comd)" in text
    assert "s: range 0.0030 bits (limit" in text and "over epochs 3..4 -> plateaued" in text
    assert "[held] TAID:" in text and "5.0x smaller" in text
    ppl = text.split("test perplexity")[1].split("CE plateau")[0]
    assert "x-ce" not in ppl  # perplexity only where the tokenizer is the teacher's


def test_method_table_gives_valid_configs(bench, tmp_path):
    """Every row of the table, on every cell it runs on, is a config the library accepts;
    students are >= 4x smaller than the teacher; cross cells feed the teacher its own ids."""
    from crossdistill.config import validate

    P = bench.FULL
    ids = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    pairs = bench.plan(P, list(bench.METHODS), {})
    assert ("taid", "xs") in pairs and ("jsd", "xs") not in pairs and ("x-alm", "char") in pairs
    for method, cell in pairs:
        cfg = bench.run_config(P, method, cell, 0, tmp_path, ids)
        validate(cfg)
        assert ("teacher" in cfg) == bench.METHODS[method].teacher
        if "teacher" in cfg and bench.is_cross(P, cell):
            assert cfg["teacher"]["inputs"]["input_ids"] == "teacher_input_ids"
            assert cfg["data"]["name"] == "shakespeare_pair"


def test_size_check_refuses_students_under_4x(bench, monkeypatch):
    sizes = {64: 300_000, 128: 1_000_000}  # by width (the real counts: the slow test)
    monkeypatch.setattr(bench, "param_count", lambda arch, P, v: sizes.get(arch["n_embd"], 1))
    P = {**bench.FULL, "students": {"s": {"n_embd": 64}}}
    with pytest.raises(SystemExit, match="not 4.0x smaller"):
        bench.check_sizes(P)
    sizes[64] = 250_000
    assert bench.check_sizes(P) == {"teacher": 1_000_000, "s": 250_000}


def test_missing_names_are_skipped(bench, monkeypatch):
    real = bench.registered
    monkeypatch.setattr(bench, "registered", lambda k, n: n != "uld" and real(k, n))
    avail = bench.availability()
    assert avail["x-uld"] == ["losses uld"] and avail["fkl"] == []
    pairs = bench.plan(bench.FULL, list(bench.METHODS), avail)
    assert not any(m == "x-uld" for m, _ in pairs) and ("x-alm", "char") in pairs
    assert bench.registered("module", "crossdistill.lm.nonexistent:x") is False


@pytest.mark.slow
def test_bench_lm_quick(tmp_path):
    out = tmp_path / "lm_quick.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/lm.py"), "--quick", "--out", str(out)]
    cmd += ["--cache", str(tmp_path / "cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["config"]["quick"] and res["wall_seconds"] < 300
    assert res["runs_failed"] == [], res["runs_failed"]
    sizes = res["sizes"]
    assert all(sizes["teacher"] >= 4 * sizes[c] for c in res["profile"]["students"])
    ran = {r["method"] for r in res["runs"]}
    assert {"ce", "fkl", "rkl", "jsd", "tvd", "skl", "taid"} <= ran
    assert {m for m, missing in res["available"].items() if not missing} <= ran
    assert all(0.0 < r["test_bpb"] < 10.0 for r in res["runs"])
    claims = {c["method"]: c["verdict"] for c in res["claims"]}
    assert not claims["TAID"].startswith("not measured")
    assert "CE plateau check" in proc.stdout and "claims:" in proc.stdout
