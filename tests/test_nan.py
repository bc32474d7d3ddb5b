"""NaN/inf in a term's value or the gradients stops training with one line naming the term and
the step; ``nan: skip`` skips such steps and counts them; no non-finite weights are written
and a non-finite epoch is never the best one."""

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

import crossdistill as cd
import crossdistill.cli
from crossdistill import Distiller, Term, Trainer
from crossdistill.train.finite import NonFiniteError, StepGuard

FAST = dict(epochs=2, batch_size=50, progress=False)


def _student(seed=0):
    torch.manual_seed(seed)
    return cd.models.create("cnn", num_classes=10, in_channels=1, img_size=8, channels=(4, 8, 8))


def _teacher():
    torch.manual_seed(9)
    return cd.models.create("mlp", num_classes=10, in_channels=1, img_size=8, hidden=[16])


def _finite_files(out):
    for name in ("best.safetensors", "student.safetensors"):
        if (out / name).is_file():
            for k, v in load_file(str(out / name)).items():
                assert not v.is_floating_point() or torch.isfinite(v).all(), (name, k)


def _nan_input(data, i=5):
    data.tensors["x"] = data.tensors["x"].clone()
    data.tensors["x"][i] = float("nan")
    return data


@pytest.mark.parametrize(
    "settings",
    [
        dict(optimizer="adamw", lr=1e6),
        dict(optimizer="sgd", lr=1e6),
        dict(optimizer="adamw", lr=1e6, grad_clip=1.0),
        dict(optimizer="sgd", lr=1e6, grad_clip=1.0),
    ],
    ids=["adamw", "sgd", "adamw-clip", "sgd-clip"],
)
def test_huge_lr_stops_naming_the_term_and_step(tmp_path, digits, one_thread, settings):
    tr = Trainer(
        Distiller(_student()), digits["train"], digits["val"], out_dir=tmp_path, **FAST, **settings
    )
    with pytest.raises(NonFiniteError) as err:
        tr.fit()
    msg = str(err.value)  # the loss diverges, or BatchNorm's running_var overflows first
    assert re.match(
        r"train: (term 'ce' is (nan|inf) at step \d+ of 8 \(epoch 1 of 2\)"
        r"|student weight '.+' is non-finite at the end of epoch 1 of 2 \(step 4\)); ",
        msg,
    ), msg
    assert msg.endswith("or set train.nan: skip to skip such steps") and "\n" not in msg
    _finite_files(tmp_path)


def test_huge_term_weight_is_named(digits, one_thread):
    d = Distiller(_student(), _teacher(), [Term("ce"), Term("kd", weight=1e300)])
    match = r"term 'kd' times its weight 1e\+300 is inf at step 1"
    with pytest.raises(NonFiniteError, match=match):
        Trainer(d, digits["train"], **FAST).fit()


def test_teacher_with_nan_weights(digits, one_thread):
    t = _teacher()
    with torch.no_grad():
        next(t.parameters()).fill_(float("nan"))
    d = Distiller(_student(), t, [Term("ce"), Term("kd")])
    with pytest.raises(NonFiniteError, match=r"term 'kd' is nan at step 1 of 8 \(epoch 1 of 2\)"):
        Trainer(d, digits["train"], **FAST).fit()


def test_one_nan_input_stops_even_mid_accumulation(digits, one_thread):
    train = _nan_input(digits["train"])
    with pytest.raises(NonFiniteError, match="loss of an earlier micro-batch of this step is nan"):
        Trainer(Distiller(_student()), train, accumulate=2, **{**FAST, "batch_size": 20}).fit()


def test_skip_counts_steps_and_keeps_weights_and_buffers_finite(tmp_path, digits, one_thread):
    train = _nan_input(digits["train"])
    res = Trainer(
        Distiller(_student()), train, digits["val"], out_dir=tmp_path, nan="skip", **FAST
    ).fit()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows] == [1, 1]  # the NaN sample's batch, each epoch
    assert res["skipped_steps"] == 2
    assert all(math.isfinite(r["train_loss"]) for r in rows)
    _finite_files(tmp_path)  # BatchNorm statistics from the NaN batch were put back too


def test_nonfinite_weights_are_never_written(tmp_path, digits, one_thread):
    # one step of lr=inf: the gradients are finite, the weights after the step are not
    tr = Trainer(
        Distiller(_student()),
        digits["train"],
        digits["val"],
        out_dir=tmp_path,
        optimizer="sgd",
        lr=math.inf,
        momentum=0.0,
        epochs=1,
        batch_size=200,
        progress=False,
        nan="skip",
    )
    with pytest.raises(NonFiniteError, match="student weight .* non-finite at the end of epoch 1"):
        tr.fit()
    assert not (tmp_path / "best.safetensors").exists()
    assert not (tmp_path / "student.safetensors").exists()


def test_nonfinite_val_epoch_is_never_best(tmp_path, digits, one_thread):
    tr = Trainer(Distiller(_student()), digits["train"], digits["val"], out_dir=tmp_path, **FAST)
    scores = iter([{"acc": 0.5, "loss": 1.0}, {"acc": 0.9, "loss": float("nan")}])
    tr.evaluate = lambda data: next(scores)
    res = tr.fit()
    assert res["best_epoch"] == 0 and res["best_val_acc"] == 0.5


def test_cli_prints_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "student: {model: mlp, hidden: [16]}\nterms: [{loss: ce}]\n"
        "train: {epochs: 1, optimizer: sgd, lr: 1.0e+6, progress: false}\n"
    )
    assert crossdistill.cli.main(["train", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("crossdistill: error: train: term 'ce' is ")


def test_guard_one_flag():
    p = torch.nn.Parameter(torch.ones(3))
    g = StepGuard([p])
    p.grad = torch.ones(3)
    assert g.ok(torch.tensor(1.0))
    assert not g.ok(torch.tensor(float("inf")))
    p.grad[1] = float("nan")
    assert not g.ok(torch.tensor(1.0)) and g.ok(torch.tensor(1.0), grads=False)
    assert torch.isnan(p.grad[1]) and p.grad[0] == 1  # values left as they are
