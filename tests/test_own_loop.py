"""Bring your own loop: the distiller inside a hand-written loop, and the Trainer's public
steps (setup / train_epoch / train_step / evaluate) with callbacks."""

import warnings

import pytest
import torch

import crossdistill as cd
from crossdistill import Distiller, Term, Trainer


def _pair():
    torch.manual_seed(0)
    t = cd.models.create("cnn", num_classes=10, in_channels=1, img_size=8, channels=(8, 16, 16))
    s = cd.models.create("mlp", num_classes=10, in_channels=1, img_size=8, hidden=(32,))
    return s, t.eval()


def test_own_loop_with_progress(digits):
    s, t = _pair()
    d = Distiller(s, t, [Term("ce"), Term("dkd", warmup=1.0)])
    opt = torch.optim.SGD(d.parameters(), lr=0.05)
    data = digits["train"]
    batches = cd.data.Batches(data, 50, seed=0)
    total = len(batches) * 2
    step = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # progress is given: no warning
        for epoch in range(2):
            for batch in batches.epoch(epoch):
                d.set_progress(step, total, steps_per_epoch=len(batches))
                out = d(batch)
                out.total.backward()
                opt.step()
                opt.zero_grad()
                step += 1
    assert d.epoch == pytest.approx((total - 1) / len(batches))
    assert set(out.losses) == {"ce", "dkd"} and torch.isfinite(out.total)


def test_warmup_without_progress_warns_once(digits):
    s, t = _pair()
    d = Distiller(s, t, [Term("ce"), Term("dkd", warmup=5.0)])
    batch = digits["train"].batch(torch.arange(8))
    with pytest.warns(UserWarning, match="set_progress"):
        d(batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d(batch)  # once only


def test_trainer_public_steps_and_callbacks(digits):
    s, t = _pair()
    seen = []

    class Steps:
        def on_step_end(self, trainer, out):
            seen.append(trainer.state["step"])

    tr = Trainer(
        Distiller(s, t, [Term("ce"), Term("kd")]),
        digits["train"],
        epochs=1,
        batch_size=50,
        progress=False,
        callbacks=[Steps()],
    )
    tr.setup()
    row = tr.train_epoch(0)
    assert seen == [1, 2, 3, 4] and row["train_loss"] > 0
    assert 0.0 <= tr.evaluate(digits["val"])["acc"] <= 1.0
