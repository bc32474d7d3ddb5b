"""Bad engine input from YAML: one clear line and exit code 2, before any training."""

import pytest
import yaml

from crossdistill.cli import main


def _run(tmp_path, cfg, capsys):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    code = main(["train", str(p), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # HF may log above it
    assert code == 2 and err.startswith("crossdistill: error: "), err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    return err


DIGITS = {"name": "digits", "batch_size": 32}
TRAIN = {"epochs": 1, "progress": False}


def test_adapter_key_not_in_batch(tmp_path, capsys):
    err = _run(
        tmp_path,
        {"student": {"model": "mlp", "inputs": ["image"]}, "data": DIGITS, "train": TRAIN},
        capsys,
    )
    assert "student.inputs" in err and "idx, x, y" in err


def test_logits_selector_not_in_output(tmp_path, capsys):
    err = _run(
        tmp_path,
        {"student": {"model": "mlp", "logits": "scores"}, "data": DIGITS, "train": TRAIN},
        capsys,
    )
    assert "student.logits" in err and "tensor" in err


def test_model_kind_must_be_one(tmp_path, capsys):
    err = _run(
        tmp_path,
        {"student": {"model": "mlp", "hf": "gpt2"}, "data": DIGITS, "train": TRAIN},
        capsys,
    )
    assert "exactly one of model" in err


def test_hf_path_missing(tmp_path, capsys):
    pytest.importorskip("transformers")
    err = _run(
        tmp_path,
        {"student": {"hf_path": str(tmp_path / "nope")}, "data": DIGITS, "train": TRAIN},
        capsys,
    )
    assert "student.hf_path" in err


def test_vocabularies_differ_for_a_same_tokenizer_loss(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    from crossdistill.models.hf import create_hf, export_hf

    teacher_dir = tmp_path / "teacher"
    cfg = {
        "n_layer": 1,
        "n_embd": 16,
        "n_head": 2,
        "vocab_size": 400,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }
    export_hf(create_hf("gpt2", config=cfg), teacher_dir)
    monkeypatch.chdir(tmp_path)
    data = {
        "name": "shakespeare",
        "batch_size": 8,
        "params": {"vocab_size": 300, "block": 16, "max_chars": 5000},
    }
    err = _run(
        tmp_path,
        {
            "teacher": {"hf_path": str(teacher_dir), "inputs": {"input_ids": "input_ids"}},
            "student": {
                "hf": "gpt2",
                "config": {"n_layer": 1, "n_embd": 16, "n_head": 2},
                "inputs": {"input_ids": "input_ids"},
            },
            "data": data,
            "terms": [{"loss": "ce"}, {"loss": "kd"}],
            "train": TRAIN,
        },
        capsys,
    )
    assert "300" in err and "400" in err and "cross-tokenizer" in err
