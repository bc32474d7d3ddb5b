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
