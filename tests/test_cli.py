"""Every bad input gives one clear line naming the field, exit code 2, no traceback."""

import json

import pytest
import yaml

from crossdistill.cli import main
from crossdistill.io import save_weights

BASE = {
    "student": {"model": "mlp", "hidden": [16]},
    "data": {"name": "digits", "batch_size": 64},
    "terms": [{"loss": "ce"}],
    "train": {"epochs": 1, "progress": False},
}


def _cfg(tmp_path, cfg, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def _err(capsys, argv):
    capsys.readouterr()  # drop what fixtures printed (epoch lines of a teacher's training)
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and err.startswith("crossdistill: error:")
    return err


@pytest.fixture
def teacher_ckpt(tmp_path):
    out = tmp_path / "teacher"
    cfg = _cfg(tmp_path, {**BASE, "student": {"model": "cnn", "channels": [8, 16, 16]}}, "t.yaml")
    assert main(["train", cfg, "--out", str(out)]) == 0
    return str(out / "student.safetensors")


def test_train_eval_export_report(tmp_path, capsys, teacher_ckpt):
    cfg = _cfg(
        tmp_path,
        {
            **BASE,
            "teacher": {"model": "cnn", "channels": [8, 16, 16], "checkpoint": teacher_ckpt},
            "terms": [
                {"loss": "ce"},
                {"loss": "kd", "temperature": 2.0},
                {"loss": "mse", "student": "fc:input", "teacher": "fc:input", "projector": "auto"},
            ],
        },
    )
    run = tmp_path / "run"
    assert main(["train", cfg, "--out", str(run), "--set", "train.epochs=2"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--split", "val"]) == 0
    assert json.loads(capsys.readouterr().out)["split"] == "val"
    assert main(["export", str(run), "--out", str(tmp_path / "x.safetensors")]) == 0
    assert (tmp_path / "x.json").is_file()
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert "data:image/png;base64" in page and "Config" in page
    assert main(["train", cfg, "--out", str(run), "--set", "train.epochs=2", "--resume"]) == 0


@pytest.mark.parametrize(
    "patch,field",
    [
        ({"terms": [{"loss": "kdd"}]}, "terms.0.loss"),
        ({"student": {"model": "resnett"}}, "student.model"),
        ({"data": {"name": "cifar"}}, "data.name"),
        ({"train": {"epochs": 1, "lr": -1}}, "train.lr"),
        ({"train": {"epochs": "many"}}, "train.epochs"),
        ({"train": {"optimizer": "adam"}}, "train.optimizer"),
        ({"train": {"lr_typo": 1}}, "train.lr_typo"),
        ({"data": {"name": "mnist", "root": "/nonexistent"}}, "data.root"),
        ({"student": {"model": "resnet", "depth": 7}}, "student.depth"),
        ({"student": {"model": "mlp", "bogus": 1}}, "student.bogus"),
        ({"terms": [{"loss": "kd", "temprature": 3}]}, "temprature"),
        (
            {
                "teacher": {"model": "cnn", "checkpoint": "/nonexistent.safetensors"},
                "terms": [{"loss": "kd"}],
            },
            "teacher.checkpoint",
        ),
        ({"terms": [{"loss": "kd"}]}, "teacher"),
    ],
)
def test_bad_inputs_exit_2(tmp_path, capsys, patch, field):
    err = _err(capsys, ["train", _cfg(tmp_path, {**BASE, **patch})])
    assert field in err


def test_bad_tap_path_lists_nearest(tmp_path, capsys, teacher_ckpt):
    cfg = {
        **BASE,
        "teacher": {"model": "cnn", "channels": [8, 16, 16], "checkpoint": teacher_ckpt},
        "terms": [
            {"loss": "mse", "student": "layers.7", "teacher": "fc:input", "projector": "auto"}
        ],
    }
    err = _err(capsys, ["train", _cfg(tmp_path, cfg)])
    assert "layers.7" in err and "nearest valid paths" in err and "layers.0" in err


def test_unbridgeable_shapes(tmp_path, capsys, teacher_ckpt):
    cfg = {
        **BASE,
        "teacher": {"model": "cnn", "channels": [8, 16, 16], "checkpoint": teacher_ckpt},
        "terms": [{"loss": "mse", "student": "fc:input", "teacher": "stage3", "projector": "auto"}],
    }
    assert "no projector can bridge" in _err(capsys, ["train", _cfg(tmp_path, cfg)])


def test_corrupt_and_mismatched_checkpoints(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage")
    cfg = {**BASE, "teacher": {"model": "cnn", "checkpoint": str(bad)}, "terms": [{"loss": "kd"}]}
    assert "teacher.checkpoint" in _err(capsys, ["train", _cfg(tmp_path, cfg)])
    import torch

    save_weights({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    cfg["teacher"]["checkpoint"] = str(tmp_path / "other.safetensors")
    assert "do not fit" in _err(capsys, ["train", _cfg(tmp_path, cfg)])
    run = tmp_path / "r"
    run.mkdir()
    (run / "last.ckpt").write_bytes(b"junk")
    assert "resume" in _err(capsys, ["train", _cfg(tmp_path, BASE), "--out", str(run), "--resume"])


def test_missing_config_and_bad_set(tmp_path, capsys):
    assert "config" in _err(capsys, ["train", str(tmp_path / "none.yaml")])
    assert "--set" in _err(capsys, ["train", _cfg(tmp_path, BASE), "--set", "novalue"])
    (tmp_path / "bad.yaml").write_text("a: [1, 2")
    assert "not valid YAML" in _err(capsys, ["train", str(tmp_path / "bad.yaml")])


def test_unsafe_yaml_tags_are_refused(tmp_path, capsys):
    (tmp_path / "evil.yaml").write_text("student: !!python/object/apply:os.system ['true']\n")
    assert "not valid YAML" in _err(capsys, ["train", str(tmp_path / "evil.yaml")])


def test_debug_shows_traceback(tmp_path):
    with pytest.raises(Exception):
        main(["--debug", "train", str(tmp_path / "none.yaml")])


def test_list_and_help(capsys):
    assert main(["list", "losses"]) == 0
    out = capsys.readouterr().out
    assert "kd" in out and "dkd" in out
    assert main(["list", "models"]) == 0
    out = capsys.readouterr().out
    assert "layer3.1.conv2" in out and "blocks.0" in out
    for cmd in ("train", "eval", "export", "list", "report", "demo"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0


def test_demo_pipeline_toy(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--quick", "--seeds", "2", "--out", "demo"]) == 0
    out = capsys.readouterr().out
    assert "vit" in out and "fitnet" in out and "+-" in out
    summary = json.loads((tmp_path / "demo/summary.json").read_text())
    assert len(summary["rows"]) == 2 * 4 * 2
    assert (tmp_path / "demo/report.html").is_file()
