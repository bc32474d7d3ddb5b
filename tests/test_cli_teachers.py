"""cache-teacher, training from a store, named teachers with a mixture, and --nproc."""

import json

import pytest
import yaml

from crossdistill.cli import main

BASE = {
    "student": {"model": "mlp", "hidden": [16]},
    "data": {"name": "digits", "batch_size": 64},
    "train": {"epochs": 1, "progress": False},
}


def _cfg(tmp_path, cfg, name):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


@pytest.fixture
def teachers(tmp_path):
    out = {}
    for name, ch in (("a", [8, 16, 16]), ("b", [8, 8, 16])):
        cfg = _cfg(tmp_path, {**BASE, "student": {"model": "cnn", "channels": ch}}, f"{name}.yaml")
        assert main(["train", cfg, "--out", str(tmp_path / name)]) == 0
        out[name] = {
            "model": "cnn",
            "channels": ch,
            "checkpoint": str(tmp_path / name / "student.safetensors"),
        }
    return out


def test_cache_teacher_then_train_from_store(tmp_path, capsys, teachers):
    cfg = _cfg(
        tmp_path,
        {
            **BASE,
            "teacher": teachers["a"],
            "terms": [
                {"loss": "ce"},
                {"loss": "kd"},
                {
                    "loss": "mse",
                    "student": "fc:input",
                    "teacher": "fc:input",
                    "projector": "auto",
                    "weight": 1.0,
                },
            ],
        },
        "s.yaml",
    )
    store = tmp_path / "store"
    assert main(["cache-teacher", cfg, "--out", str(store), "--topk", "4"]) == 0
    assert "bytes/sample" in capsys.readouterr().out
    m = json.loads((store / "manifest.json").read_text())
    assert m["taps"] == ["logits", "fc:input"] and m["topk"] == 4
    assert (
        main(["train", cfg, "--out", str(tmp_path / "r"), "--set", f"teacher.store={store}"]) == 0
    )
    rc = main(["train", cfg, "--set", f"teacher.store={store}", "--set", "data.split_seed=2"])
    assert rc == 2 and "teacher.store" in capsys.readouterr().err
    rc = main(
        [
            "train",
            cfg,
            "--set",
            f"teacher.store={store}",
            "--set",
            "teacher.checkpoint=" + teachers["b"]["checkpoint"],
            "--set",
            "teacher.channels=[8, 8, 16]",
        ]
    )
    assert rc == 2 and "another teacher" in capsys.readouterr().err


def test_named_teachers_with_mixture(tmp_path, capsys, teachers):
    cfg = _cfg(
        tmp_path,
        {
            **BASE,
            "teachers": teachers,
            "mixture": {"mode": "true_class"},
            "terms": [
                {"loss": "ce"},
                {"loss": "kd"},
                {
                    "loss": "mse",
                    "student": "fc:input",
                    "teacher": "fc:input",
                    "teacher_model": "a",
                    "projector": "auto",
                },
            ],
        },
        "m.yaml",
    )
    assert main(["train", cfg, "--out", str(tmp_path / "m")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "m/metrics.jsonl").read_text().splitlines()]
    assert {"loss_kd", "loss_mse"} <= set(rows[0])
    bad = _cfg(tmp_path, {**BASE, "teachers": teachers, "mixture": {"mode": "vote"}}, "bad.yaml")
    assert main(["train", bad]) == 2 and "mixture.mode" in capsys.readouterr().err


@pytest.mark.slow
def test_named_teachers_reach_a_method_that_reads_them(tmp_path, capsys, teachers):
    """distill-weighted from a config: the ``teachers:`` section arrives as named sources."""
    method = {"name": "distill-weighted", "scores": {"a": 0.9, "b": 0.5}}
    cfg = _cfg(tmp_path, {**BASE, "student": {"model": "cnn", "channels": [8, 8, 8]},
                          "teachers": teachers, "method": method}, "w.yaml")
    out = tmp_path / "w"
    assert main(["train", cfg, "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert 0.0 <= res["test_acc"] <= 1.0
    bad = _cfg(tmp_path, {**BASE, "teachers": teachers,
                          "method": {**method, "scores": {"a": 0.9}}}, "wbad.yaml")
    assert main(["train", bad]) == 2
    assert "scores" in capsys.readouterr().err


def test_train_nproc_2(tmp_path, teachers):
    cfg = _cfg(
        tmp_path,
        {**BASE, "teacher": teachers["a"], "terms": [{"loss": "ce"}, {"loss": "kd"}]},
        "d.yaml",
    )
    assert main(["train", cfg, "--out", str(tmp_path / "d"), "--nproc", "2"]) == 0
    res = json.loads((tmp_path / "d/results.json").read_text())
    assert res["world"] == 2
