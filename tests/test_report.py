"""The console's epoch lines, the HTML report (one run, several runs, read-only runs, torn
logs) and the optional TensorBoard logger."""

import importlib.util
import json
import os

import pytest
import torch
import yaml

from crossdistill.cli import main
from crossdistill.errors import ConfigError
from crossdistill.tasks import Classification
from crossdistill.train import console
from crossdistill.train.tensorboard import tag

HAS_TB = importlib.util.find_spec("tensorboard") is not None
BASE = {
    "data": {"name": "digits", "batch_size": 64},
    "train": {"epochs": 2, "progress": False, "optimizer": "adamw", "lr": 0.003},
}


def _cfg(path, cfg):
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny CNN teacher and two MLP students (ce + kd, ce only), trained once."""
    root = tmp_path_factory.mktemp("report")
    t = _cfg(root / "t.yaml", {**BASE, "student": {"model": "cnn", "channels": [8, 16, 16]}})
    assert main(["train", t, "--out", str(root / "teacher")]) == 0
    teacher = {
        "model": "cnn",
        "channels": [8, 16, 16],
        "checkpoint": str(root / "teacher/student.safetensors"),
    }
    student = {"model": "mlp", "hidden": [16]}
    kd = [{"loss": "ce"}, {"loss": "kd", "temperature": 2.0, "weight": 0.5}]
    s1 = _cfg(root / "kd.yaml", {**BASE, "student": student, "teacher": teacher, "terms": kd})
    s2 = _cfg(root / "ce.yaml", {**BASE, "student": student, "terms": [{"loss": "ce"}]})
    assert main(["train", s1, "--out", str(root / "sweep/kd")]) == 0
    assert main(["train", s2, "--out", str(root / "sweep/ce")]) == 0
    return root


def test_epoch_line_format():
    row = {
        "epoch": 2,
        "train_loss": 0.41234,
        "loss_ce": 0.1,
        "loss_kd": 0.31,
        "val_acc": 0.912,
        "epoch_time": 4.08,
    }
    line = console.epoch_line(row, 10, Classification(), best=True)
    assert line == "epoch 3/10  loss 0.4123 (ce 0.1, kd 0.31)  val acc 91.2%  best  4.1 s"
    row["skipped_steps"] = 2
    assert "val acc 91.2%  2 non-finite steps skipped  best" in console.epoch_line(
        row, 10, Classification(), best=True
    )
    no_val = {"epoch": 0, "train_loss": 1.0, "loss_ce": 1.0, "train_acc": 0.5}
    assert console.epoch_line(no_val, 1, Classification(), False) == (
        "epoch 1/1  loss 1  train acc 50.0%"
    )


def test_console_lines_clean_log_and_quiet(digits, capsys, one_thread):
    import crossdistill as cd

    def fit(epochs):
        torch.manual_seed(0)
        model = cd.models.create("mlp", num_classes=10, in_channels=1, img_size=8, hidden=[8])
        # bars asked for, but stderr is no terminal here: no bar, no carriage returns
        trainer = cd.Trainer(cd.Distiller(model), digits["train"], digits["val"], epochs=epochs)
        trainer.fit()

    fit(2)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("epoch ")]
    assert [ln.split()[1] for ln in lines] == ["1/2", "2/2"], err
    assert "val acc" in lines[0] and "\r" not in err
    with console.quiet():
        fit(1)
    assert "epoch 1/1" not in capsys.readouterr().err


def test_quiet_context():
    assert not console.is_quiet() or os.environ.get("CROSSDISTILL_QUIET")
    with console.quiet():
        assert console.is_quiet()


def test_single_run_report(runs, capsys):
    run = runs / "sweep/kd"
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert page.count("data:image/png;base64") == 1
    assert "teacher val acc" in page and "recorded by the run" in page  # loop records it
    assert "kd (unweighted)" in page and "ce (unweighted)" in page  # per-term log
    assert "test accuracy" in page and 'class="best"' in page  # task column, best row
    assert "best epoch" in page and "config.yaml" in page


def test_recorded_teacher_metric_wins(runs, tmp_path):
    import shutil

    run = tmp_path / "kd"
    shutil.copytree(runs / "sweep/kd", run)
    res = json.loads((run / "results.json").read_text())
    (run / "results.json").write_text(json.dumps({**res, "teacher_val_acc": 0.5}))
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert "recorded by the run" in page and "50.0%" in page


def test_compare_runs_one_table_one_plot(runs, tmp_path, capsys):
    out = tmp_path / "cmp.html"
    assert main(["report", str(runs / "sweep/kd"), str(runs / "sweep/ce"), "--out", str(out)]) == 0
    page = out.read_text()
    assert "<h2>Comparison</h2>" in page and ">kd<" in page and ">ce<" in page
    assert 'class="top"' in page  # the best run per column is marked
    # a folder of runs stands for its runs; default page: <folder>/report.html
    assert main(["report", str(runs / "sweep")]) == 0
    assert "<h2>Comparison</h2>" in (runs / "sweep/report.html").read_text()


def test_torn_metrics_line_is_skipped(runs, tmp_path):
    import shutil

    run = tmp_path / "torn"
    shutil.copytree(runs / "sweep/ce", run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "train_lo')
    assert main(["report", str(run)]) == 0
    assert "1 unreadable metrics line(s) skipped" in (run / "report.html").read_text()


def test_unwritable_target_is_one_line(runs, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["report", str(runs / "sweep/ce"), "--out", str(blocker / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("crossdistill: error: --out:") and err.count("\n") == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only directories")
def test_read_only_run_reports_elsewhere(runs, tmp_path, capsys):
    import shutil

    run = tmp_path / "ro"
    shutil.copytree(runs / "sweep/ce", run)
    run.chmod(0o555)
    try:
        assert main(["report", str(run)]) == 2
        assert "give --out PATH elsewhere" in capsys.readouterr().err
        assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 0
    finally:
        run.chmod(0o755)


def test_report_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert main(["report", str(tmp_path)]) == 2
    (tmp_path / "results.json").write_bytes(b"\xff\xfe not json")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "results.json" in err


def test_tensorboard_tags():
    assert tag("train_loss") == "loss/total"
    assert tag("loss_kd") == "loss/kd"
    assert tag("val_acc") == "val/acc" and tag("train_acc") == "train/acc"
    assert tag("lr") == "lr" and tag("epoch_time") == "misc/epoch_time"


@pytest.mark.skipif(HAS_TB, reason="tensorboard is installed: the missing-package error is moot")
def test_tensorboard_missing_is_one_line_before_training(tmp_path, capsys):
    from types import SimpleNamespace

    with pytest.raises(ConfigError) as e:
        console.default_callbacks(SimpleNamespace(log=["tensorboard"]))
    assert e.value.field == "train.log" and "crossdistill[tensorboard]" in str(e.value)
    cfg = {**BASE, "student": {"model": "mlp", "hidden": [8]}, "terms": [{"loss": "ce"}]}
    cfg["train"] = {**BASE["train"], "log": ["tensorboard"]}
    argv = ["train", _cfg(tmp_path / "c.yaml", cfg), "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("crossdistill: error: train.log:") and "epoch 1" not in err
    assert not (tmp_path / "r/metrics.jsonl").exists()


def test_tensorboard_scalars_with_a_fake_writer(monkeypatch):
    """The callback's scalars, through a stand-in writer (tensorboard is an optional extra)."""
    from types import SimpleNamespace

    from crossdistill.train import tensorboard as tb

    seen = []

    class Writer:
        def __init__(self, log_dir=None, purge_step=None):
            seen.append(("open", log_dir, purge_step))

        def add_scalar(self, key, value, step):
            seen.append((key, value, step))

        def flush(self):
            pass

        def close(self):
            seen.append(("close",))

    monkeypatch.setattr(tb, "_writer_class", lambda: Writer)
    cb = tb.TensorBoard()
    trainer = SimpleNamespace(
        dist=SimpleNamespace(main=True), out_dir=None, cfg=SimpleNamespace(epochs=1)
    )
    cb.on_epoch_end(trainer, {"epoch": 0, "step": 3, "train_loss": 1.5, "val_acc": 0.25})
    assert seen == [
        ("open", None, 1),
        ("loss/total", 1.5, 1),
        ("val/acc", 0.25, 1),
        ("close",),
    ]


@pytest.mark.skipif(not HAS_TB, reason="tensorboard not installed (the tensorboard extra)")
def test_tensorboard_writes_events(tmp_path, capsys):
    cfg = {**BASE, "student": {"model": "mlp", "hidden": [8]}, "terms": [{"loss": "ce"}]}
    cfg["train"] = {**BASE["train"], "epochs": 1, "log": ["tensorboard"]}
    assert main(["train", _cfg(tmp_path / "c.yaml", cfg), "--out", str(tmp_path / "r")]) == 0
    assert list((tmp_path / "r/tb").glob("events.out.tfevents.*"))
