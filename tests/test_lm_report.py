"""An lm run's report: bits-per-byte curves (val, and the teacher's line) and the test table."""

import pytest
import yaml

from crossdistill.cli import main

pytest.importorskip("transformers")

GPT = {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 16}
DATA = {"name": "shakespeare", "batch_size": 16,
        "params": {"vocab_size": 300, "block": 16, "max_chars": 5000}}


def test_lm_run_report_has_bits_per_byte_curves(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    hf = {"hf": "gpt2", "config": GPT, "inputs": {"input_ids": "input_ids"}}
    teacher = tmp_path / "teacher.yaml"
    teacher.write_text(yaml.safe_dump({"student": hf, "data": DATA,
                                       "train": {"epochs": 1, "progress": False}}))
    cfg = tmp_path / "kd.yaml"
    cfg.write_text(yaml.safe_dump({
        "teacher": {"from_config": "teacher.yaml"}, "student": hf, "data": DATA,
        "terms": [{"loss": "ce"}, {"loss": "jsd", "beta": 0.5}],
        "train": {"epochs": 2, "progress": False},
    }))
    assert main(["train", str(cfg), "--out", str(tmp_path / "run")]) == 0
    assert main(["report", str(tmp_path / "run")]) == 0
    html = (tmp_path / "run" / "report.html").read_text()
    assert "bits/byte" in html and "<img" in html and "jsd" in html
    assert "teacher" in html  # the teacher's val line on the curve
