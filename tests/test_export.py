"""`crossdistill export`: the weights plus a JSON spec complete enough to rebuild and run the
student; `load_exported` gives the same logits; raw pixels preprocess to the run's inputs."""

import json
from pathlib import Path

import pytest
import torch
import yaml

import crossdistill as cd
from crossdistill.cli import main
from crossdistill.errors import ConfigError
from crossdistill.export import load_exported, preprocess


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    cfg = {
        "student": {"model": "vit", "patch": 4, "dim": 16, "depth": 1, "heads": 2},
        "data": {"name": "digits", "batch_size": 64, "img_size": 12},
        "terms": [{"loss": "ce"}],
        "train": {"epochs": 1, "progress": False},
    }
    (root / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(root / "c.yaml"), "--out", str(root / "run")]) == 0
    return root / "run"


def test_export_spec_rebuilds_the_model(run, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    assert main(["export", str(run), "--out", str(out)]) == 0
    spec = json.loads((tmp_path / "x.json").read_text())
    assert spec["crossdistill_version"] == cd.__version__
    kw = spec["model"]["kwargs"]
    assert spec["model"]["name"] == "vit"
    assert kw["num_classes"] == 10 and kw["in_channels"] == 1 and kw["img_size"] == 12
    assert spec["io"]["inputs"] == ["x"] and spec["task"]["select"] == "acc"
    assert spec["data"] == {**spec["data"], "name": "digits", "num_classes": 10}
    assert spec["data"]["input_shape"] == [1, 12, 12]
    pre = spec["preprocessing"]
    assert pre["pixel_max"] == 16 and pre["resize"] == [12, 12] and pre["std"] > 0

    model = load_exported(tmp_path / "x.json")
    val = cd.data.load("digits", "val", img_size=12)
    ref = cd.models.create("vit", **kw)
    cd.io.load_into(ref, run / "student.safetensors")
    ref.eval()
    with torch.no_grad():
        assert torch.equal(model(val.x[:32]), ref(val.x[:32]))
    # raw 0..16 pixels through the spec's recipe give exactly the run's inputs
    from crossdistill.data import sources

    x, _ = sources.digits()
    raw = torch.from_numpy(x[val.idx.numpy()[:32]]) * 16
    assert torch.allclose(preprocess(model.export_spec, raw), val.x[:32], atol=1e-6)
    # the .safetensors path or the folder (with student.json) load the same
    assert load_exported(out).export_spec == spec


def test_export_default_target_and_errors(run, tmp_path, capsys):
    assert main(["export", str(run)]) == 0
    assert (run / "export/student.json").is_file()
    assert isinstance(load_exported(run / "export"), torch.nn.Module)
    assert main(["export", str(run), "--out", f"{tmp_path}/folder/"]) == 0  # a folder
    assert (tmp_path / "folder/student.safetensors").is_file()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["export", str(run), "--out", str(blocker / "s.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("crossdistill: error: --out:") and err.count("\n") == 1
    assert main(["export", str(tmp_path)]) == 2
    with pytest.raises(ConfigError):
        load_exported(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "other"}')
    with pytest.raises(ConfigError) as e:
        load_exported(bad)
    assert e.value.field == "format"


SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare"


@pytest.mark.slow
@pytest.mark.skipif(not SHAKESPEARE.is_dir(), reason="no ../shared/data/tinyshakespeare")
def test_export_hf_student_keeps_its_hf_dir(tmp_path, monkeypatch, one_thread):
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    cfg = {
        "student": {
            "hf": "gpt2",
            "inputs": {"input_ids": "input_ids"},
            "config": {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 32},
        },
        "data": {
            "name": "shakespeare",
            "batch_size": 16,
            "params": {"tokenizer": "bpe", "vocab_size": 300, "block": 32, "max_chars": 20000},
        },
        "train": {"epochs": 1, "progress": False, "optimizer": "adamw", "lr": 0.003},
    }
    (tmp_path / "lm.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "lm.yaml", "--out", "run"]) == 0
    assert main(["export", "run", "--out", "exp/lm.safetensors"]) == 0
    spec = json.loads((tmp_path / "exp/lm.json").read_text())
    assert spec["model"]["kind"] == "hf" and (tmp_path / "exp/lm_hf/config.json").is_file()
    assert spec["io"]["inputs"] == {"input_ids": "input_ids"} and spec["task"]["name"] == "lm"
    model = load_exported(tmp_path / "exp/lm.json")
    ids = torch.randint(0, 300, (2, 32))
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run/student_hf")).eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, ref(input_ids=ids).logits)
