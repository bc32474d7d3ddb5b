"""The engine's three proofs at toy size, each from YAML through the CLI with a report:
language modelling with HF GPT-2 models (tiny Shakespeare, BPE trained here), paired
image+audio (an audio teacher into an image student; a fusion student evaluated with each
modality missing), and segmentation on digit canvases (pixel-wise KD, mIoU)."""

import json
from pathlib import Path

import pytest
import yaml

from crossdistill.cli import main

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_mnist = pytest.mark.skipif(
    not (SHARED / "mnist-t10k").is_dir(), reason="MNIST not at ../shared/data/mnist-t10k"
)
needs_fsdd = pytest.mark.skipif(
    not (SHARED / "fsdd").is_dir(), reason="FSDD not at ../shared/data/fsdd"
)
FAST = {"epochs": 1, "optimizer": "adamw", "lr": 0.003, "weight_decay": 0.0, "progress": False}


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(tmp_path, name, cfg):
    cfg_path = _write(tmp_path / f"{name}.yaml", cfg)
    out = tmp_path / "runs" / name
    assert main(["train", str(cfg_path), "--out", str(out)]) == 0
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").is_file()
    return json.loads((out / "results.json").read_text()), out


@needs_mnist
def test_segmentation_proof(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    data = {
        "name": "canvas",
        "root": str(SHARED / "mnist-t10k"),
        "batch_size": 16,
        "params": {"n": {"train": 48, "val": 16, "test": 16}, "size": 32, "max_digits": 2},
        "augment": {"shift": 2},
    }
    _write(
        tmp_path / "teacher.yaml",
        {"student": {"model": "seg-cnn", "width": 8}, "data": data, "train": FAST},
    )
    res, out = _train(
        tmp_path,
        "seg_kd",
        {
            "teacher": {"from_config": "teacher.yaml"},
            "student": {"model": "seg-cnn", "width": 4},
            "data": data,
            "terms": [
                {"loss": "ce"},
                {"loss": "kd", "temperature": 2.0, "weight": 1.0},
                {"loss": "mse", "student": "dec2", "teacher": "dec2", "projector": "auto"},
            ],
            "train": FAST,
        },
    )
    assert 0.0 <= res["test_miou"] <= 1.0 and "test_pixel_acc" in res
    assert "best_val_miou" in res and list(Path("runs/cache").iterdir())  # teacher cached


@needs_mnist
@needs_fsdd
def test_audio_visual_proof(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    data = {
        "name": "av",
        "root": str(SHARED / "mnist-t10k"),
        "batch_size": 32,
        "params": {
            "fsdd_root": str(SHARED / "fsdd"),
            "limit": {"train": 200, "val": 60, "test": 60},
        },
    }
    _write(
        tmp_path / "audio.yaml",
        {
            "student": {
                "model": "audio-cnn",
                "img_size": [40, 48],
                "channels": [8, 16, 16],
                "inputs": ["audio"],
            },
            "data": data,
            "train": FAST,
        },
    )
    res, _ = _train(
        tmp_path,
        "av_kd",
        {
            "teacher": {"from_config": "audio.yaml"},
            "student": {"model": "cnn", "channels": [8, 16, 16], "inputs": ["image"]},
            "data": data,
            "terms": [{"loss": "ce"}, {"loss": "kd"}],
            "train": FAST,
        },
    )
    assert 0.0 <= res["test_acc"] <= 1.0
    res, _ = _train(
        tmp_path,
        "av_fusion",
        {
            "teacher": {"from_config": "audio.yaml"},
            "student": {"model": "fusion", "width": 4, "dim": 16, "inputs": ["image", "audio"]},
            "data": data,
            "task": {
                "name": "classification",
                "views": {"image_only": ["audio"], "audio_only": ["image"]},
            },
            "prepare": [{"name": "modality_dropout", "keys": ["image", "audio"], "rate": 0.3}],
            "terms": [{"loss": "ce"}, {"loss": "kd", "weight": 0.5}],
            "train": FAST,
        },
    )
    assert {"test_acc", "test_image_only_acc", "test_audio_only_acc"} <= set(res)


def test_lm_proof(tmp_path, monkeypatch, one_thread):
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    data = {
        "name": "shakespeare",
        "batch_size": 16,
        "params": {"tokenizer": "bpe", "vocab_size": 300, "block": 32, "max_chars": 20000},
    }
    model = {"hf": "gpt2", "inputs": {"input_ids": "input_ids"}}
    _write(
        tmp_path / "teacher.yaml",
        {
            "student": {
                **model,
                "config": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 32},
            },
            "data": data,
            "train": FAST,
        },
    )
    res, out = _train(
        tmp_path,
        "lm_kd",
        {
            "teacher": {"from_config": "teacher.yaml"},
            "student": {
                **model,
                "config": {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 32},
            },
            "data": data,
            "terms": [
                {"loss": "ce"},
                {"loss": "kd", "temperature": 1.0, "weight": 1.0},
                {
                    "loss": "mse",
                    "student": "output.hidden_states[-1]",
                    "teacher": "output.hidden_states[-1]",
                    "projector": "auto",
                },
            ],
            "train": FAST,
        },
    )
    assert res["test_bpb"] > 0 and res["test_ppl"] > 1 and "best_val_bpb" in res
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(str(out / "student_hf"))
    assert back.config.n_layer == 1
