import json

import pytest
import torch
from conftest import Kill, KillAfter

import crossdistill as cd
from crossdistill import Distiller, Term, Trainer
from crossdistill.train.schedule import lr_at


def _make(digits, student_seed=0):
    torch.manual_seed(0)  # the teacher is the same trained model in every process
    t = cd.models.create("cnn", num_classes=10, in_channels=1, img_size=8, channels=(8, 16, 16))
    torch.manual_seed(student_seed)
    s = cd.models.create(
        "vit",
        num_classes=10,
        in_channels=1,
        img_size=8,
        patch=2,
        dim=16,
        depth=2,
        heads=2,
        dropout=0.1,
    )
    return Distiller(
        s,
        t,
        [
            Term("ce"),
            Term("kd"),
            Term("mse", student="blocks.1", teacher="stage3", projector="auto"),
        ],
        num_samples=2000,
    )


SETTINGS = dict(
    epochs=3,
    batch_size=32,
    optimizer="adamw",
    lr=1e-3,
    checkpoint_every=2,
    progress=False,
    augment_shift=1,
    accumulate=2,
    warmup_epochs=1,
)


def test_resume_mid_epoch_is_bit_identical(tmp_path, digits):
    ref = _make(digits)
    Trainer(ref, digits["train"], digits["val"], out_dir=tmp_path / "a", **SETTINGS).fit()
    d = _make(digits)
    with pytest.raises(Kill):  # 200 samples / 32 = 7 batches per epoch: die inside epoch 2
        Trainer(
            d,
            digits["train"],
            digits["val"],
            out_dir=tmp_path / "b",
            callbacks=[KillAfter(11)],
            **SETTINGS,
        ).fit()
    d2 = _make(digits, student_seed=123)  # fresh process, different initial weights
    Trainer(d2, digits["train"], digits["val"], out_dir=tmp_path / "b", **SETTINGS).fit(resume=True)
    for (k, a), b in zip(ref.trainable_state().items(), d2.trainable_state().values()):
        assert torch.equal(a, b), k
    rows_a = [json.loads(x) for x in (tmp_path / "a/metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows_b] == [0, 1, 2]
    assert [r["val_acc"] for r in rows_a] == [r["val_acc"] for r in rows_b]
    assert rows_a[-1]["train_loss"] == pytest.approx(rows_b[-1]["train_loss"], rel=1e-6)


def test_outputs_best_on_val_and_test_once(tmp_path, digits):
    d = _make(digits)
    res = Trainer(
        d,
        digits["train"],
        digits["val"],
        digits["test"],
        out_dir=tmp_path,
        epochs=2,
        batch_size=32,
        progress=False,
    ).fit()
    for f in (
        "metrics.jsonl",
        "metrics.csv",
        "results.json",
        "best.safetensors",
        "student.safetensors",
        "last.ckpt",
    ):
        assert (tmp_path / f).is_file(), f
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert res["best_val_acc"] == max(r["val_acc"] for r in rows)
    assert "test_acc" in res and not any("test_acc" in r for r in rows)
    assert {"loss_ce", "loss_kd", "loss_mse", "lr"} <= set(rows[0])
    assert (tmp_path / "metrics.csv").read_text().startswith("epoch,")


def test_supervised_teacher_training_learns(digits):
    torch.manual_seed(0)
    m = cd.models.create("cnn", num_classes=10, in_channels=1, img_size=8, channels=(8, 16, 16))
    res = Trainer(
        Distiller(m),
        digits["train"],
        digits["val"],
        digits["test"],
        epochs=4,
        batch_size=32,
        lr=0.05,
        progress=False,
    ).fit()
    assert res["test_acc"] > 0.5


def test_same_seed_same_result(digits):
    r = [
        Trainer(
            _make(digits),
            digits["train"],
            digits["val"],
            epochs=1,
            batch_size=32,
            progress=False,
            seed=5,
        ).fit()["best_val_acc"]
        for _ in range(2)
    ]
    assert r[0] == r[1]


def test_lr_schedules():
    assert lr_at(0, 100, base=1.0, warmup=10) == pytest.approx(0.1)
    assert lr_at(10, 100, base=1.0, warmup=10) == pytest.approx(1.0)
    assert lr_at(100, 100, base=1.0) == pytest.approx(0.0)
    assert lr_at(60, 100, base=1.0, schedule="step") == pytest.approx(0.1)
    assert lr_at(80, 100, base=1.0, schedule="step") == pytest.approx(0.01)
    assert lr_at(50, 100, base=0.3, schedule="constant") == 0.3


def test_corrupt_checkpoint_is_config_error(tmp_path, digits):
    (tmp_path / "last.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(cd.ConfigError, match="not a readable"):
        Trainer(_make(digits), digits["train"], out_dir=tmp_path, epochs=1, progress=False).fit(
            resume=True
        )


def test_resume_refuses_changed_settings_unless_allowed(tmp_path, digits, one_thread):
    kw = dict(epochs=2, batch_size=50, progress=False)
    Trainer(_make(digits), digits["train"], out_dir=tmp_path, callbacks=[], **kw).fit()
    changed = Trainer(_make(digits), digits["train"], out_dir=tmp_path, **{**kw, "lr": 0.5})
    with pytest.raises(cd.ConfigError, match=r"changed config: lr: 0.05 -> 0.5'; .*allow_changed"):
        changed.fit(resume=True)
    changed.fit(resume=True, allow_changed=True)  # finished already: nothing left to train


def test_metrics_log_is_atomic_and_tolerates_a_torn_line(tmp_path):
    from crossdistill.train.metrics import MetricsLog

    log = MetricsLog(tmp_path)
    for e in range(3):
        log.append({"epoch": e, "loss": 1.0 / (e + 1)})
    assert not list(tmp_path.glob(".*.tmp"))
    with open(tmp_path / "metrics.jsonl", "a") as f:  # what an old, appending writer left
        f.write('{"epoch": 3, "lo')
    again = MetricsLog(tmp_path)
    again.restore(upto_epoch=2)
    assert [r["epoch"] for r in again.rows] == [0, 1]
    assert (tmp_path / "metrics.csv").read_text().splitlines() == ["epoch,loss", "0,1.0", "1,0.5"]


def test_cli_resume_refuses_a_changed_config_and_cleans_temp_files(tmp_path, capsys):
    from crossdistill.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "student: {model: mlp, hidden: [16]}\nterms: [{loss: ce}]\n"
        "train: {epochs: 1, optimizer: adamw, lr: 0.002, seed: 3, progress: false}\n"
    )
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(run)]) == 0
    before = (run / "config.yaml").read_text()
    (run / ".last.ckpt.x1y2.tmp").write_bytes(b"torn")  # a kill inside a checkpoint write
    capsys.readouterr()
    args = ["train", str(cfg), "--out", str(run), "--resume"]
    assert main([*args, "--set", "train.lr=0.5", "--set", "train.seed=4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.lr: 0.002 -> 0.5, train.seed: 3 -> 4" in err[0], err
    assert "--allow-changed" in err[0]
    assert (run / "config.yaml").read_text() == before  # not rewritten by the refused resume
    assert main(args) == 0
    assert not list(run.glob(".*.tmp"))
    assert main([*args, "--set", "train.lr=0.5", "--allow-changed"]) == 0
    assert "lr: 0.5" in (run / "config.yaml").read_text()
