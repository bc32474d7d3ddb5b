"""CLI misuse is one line and exit 2 before any work: --set, --nproc, --out, argparse errors;
``train --check``; the last-resort handler; ``list``; config-relative paths."""

import os

import pytest
import yaml
from cli_helpers import one_line_error

import crossdistill
from crossdistill import cli
from crossdistill import config as C
from crossdistill.cli import main
from crossdistill.io import save_weights

BASE = {
    "student": {"model": "mlp", "hidden": [16]},
    "data": {"name": "digits", "batch_size": 64},
    "terms": [{"loss": "ce"}],
    "train": {"epochs": 1, "progress": False},
}


def _cfg(tmp_path, cfg=None, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(BASE if cfg is None else cfg))
    return str(p)


_err = one_line_error


# -- --set ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "item,expect",
    [
        ("train.epochs.x=1", "train.epochs is an int (1), not a mapping or list"),
        ("terms.5.weight=1", "terms is a list of 1 items; index: 0..0"),
        ("terms.x.weight=1", "terms is a list of 1 items"),
        ("terms.-1=1", "terms is a list"),
        ("train.lr=[1,", "not valid YAML"),
        ("train.lr=&a [*a]", "recursive"),
        ("train.lr=!!python/name:os.system", "tags are not allowed"),
        ("=1", "the key is empty"),
        ("train..lr=1", "empty part"),
        ("train.lr", "use key.path=value"),
    ],
)
def test_bad_set_items(tmp_path, capsys, item, expect):
    err = _err(capsys, ["train", _cfg(tmp_path), "--set", item])
    assert err.startswith("crossdistill: error: --set: got ") and repr(item) in err
    assert expect in err, err


def test_set_on_a_scalar_document_and_null_sections(tmp_path, capsys):
    scalar = tmp_path / "s.yaml"
    scalar.write_text("42\n")
    assert "holds an int, not a mapping" in _err(capsys, ["train", str(scalar), "--set", "a=1"])
    cfg = C.load(_cfg(tmp_path, {**BASE, "train": None}), ["train.epochs=3", "name=x"])
    assert cfg.train.epochs == 3 and cfg.name == "x"
    empty = tmp_path / "e.yaml"
    empty.write_text("")
    cfg = C.load(empty, ["student.model=mlp"])
    assert cfg.student.model == "mlp"


def test_a_huge_value_is_not_echoed(tmp_path, capsys):
    err = _err(capsys, ["train", _cfg(tmp_path), "--set", "train.lr=" + "x" * 1_000_000])
    assert "train.lr" in err and len(err) < 1000


# -- --nproc, --out, argparse --------------------------------------------------------------


@pytest.mark.parametrize("n", ["0", "-3", "100000"])
def test_nproc_out_of_range(tmp_path, capsys, n):
    assert "--nproc" in _err(capsys, ["train", _cfg(tmp_path), "--nproc", n])


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "c.yaml", "--nproc", "abc"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("crossdistill: error: argument --nproc")


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"crossdistill {crossdistill.__version__}"


def test_bad_out_dirs(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert "exists and is a file" in _err(capsys, ["train", cfg, "--out", str(a_file)])
    assert "is a file, so no directory" in _err(
        capsys, ["train", cfg, "--out", str(a_file / "sub")]
    )
    assert "pseudo-filesystem" in _err(capsys, ["train", cfg, "--out", "/proc/crossdistill"])
    assert "longer than 255" in _err(capsys, ["train", cfg, "--out", str(tmp_path / ("x" * 300))])
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_out_dir(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    assert "not writable" in _err(capsys, ["train", _cfg(tmp_path), "--out", str(ro / "run")])


def test_run_name_may_not_leave_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = _err(capsys, ["train", _cfg(tmp_path, {**BASE, "name": "../../x"})])
    assert err.startswith("crossdistill: error: name: got '../../x'")


# -- train --check -------------------------------------------------------------------------


def test_train_check_runs_one_step_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["train", cfg, "--check"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("check ok: student ") and "params" in out[0]
    assert "ce " in out[0] and "no files written" in out[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert "terms.0.loss" in _err(
        capsys, ["train", cfg, "--check", "--set", "terms.0.loss=kdd"]
    )


# -- last-resort handler -------------------------------------------------------------------


def test_internal_error_is_one_line_exit_1(capsys, monkeypatch):
    def boom(args):
        raise KeyError("multi\nline")

    monkeypatch.setitem(cli.COMMANDS, "list", boom)
    assert main(["list", "losses"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "crossdistill: internal error: KeyError: 'multi\\nline' "
        "(rerun with --debug for the traceback)"
    ]
    with pytest.raises(KeyError):
        main(["--debug", "list", "losses"])


def test_memory_error_is_exit_2(capsys, monkeypatch):
    def oom(args):
        raise MemoryError

    monkeypatch.setitem(cli.COMMANDS, "list", oom)
    err = _err(capsys, ["list", "losses"])
    assert "ran out of memory" in err


# -- list ----------------------------------------------------------------------------------


def test_list_shows_build_arguments_and_no_none(capsys):
    assert main(["list", "models"]) == 0
    out = capsys.readouterr().out
    vit = out[out.index("\nvit "):]
    assert "built with: num_classes=10" in vit and "depth=" in vit.splitlines()[2]
    for kind in ("losses", "methods", "projectors", "datasets"):
        assert main(["list", kind]) == 0
        out = capsys.readouterr().out
        assert "None" not in out, kind
    assert main(["list", "losses"]) == 0
    kd = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("kd "))
    assert "(2015)" in kd and "temperature=4.0" in kd


# -- paths relative to the config file -----------------------------------------------------


def test_paths_resolve_against_the_config_file(tmp_path, capsys, monkeypatch):
    import torch

    (tmp_path / "proj" / "weights").mkdir(parents=True)
    save_weights({"w": torch.zeros(2)}, tmp_path / "proj" / "weights" / "t.safetensors")
    teacher = {"model": "cnn", "checkpoint": "weights/t.safetensors"}
    cfg_path = _cfg(tmp_path / "proj", {**BASE, "teacher": teacher})
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = C.load(cfg_path)
    assert cfg.teacher.checkpoint == str(tmp_path / "proj" / "weights" / "t.safetensors")
    monkeypatch.chdir(tmp_path)  # a path that exists only in the working directory
    (tmp_path / "cwd.safetensors").write_bytes(b"")
    cfg = C.load(cfg_path, ["teacher.checkpoint=cwd.safetensors"])
    assert cfg.teacher.checkpoint == "cwd.safetensors"
    err = _err(capsys, ["train", cfg_path, "--set", "teacher.checkpoint=nope.safetensors"])
    assert "teacher.checkpoint" in err and "tried" in err
    assert str(tmp_path / "proj" / "nope.safetensors") in err
    assert str(tmp_path / "nope.safetensors") in err
    err = _err(capsys, ["train", cfg_path, "--set", "data.root=missing_dir"])
    assert "data.root" in err and "tried" in err
