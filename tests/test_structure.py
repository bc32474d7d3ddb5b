"""Structure events: a method prunes the student mid-run; the trainer rebuilds the optimiser
and projectors, export is clean, and kill-and-resume after the event is bit-identical."""

import pytest
import torch
from conftest import Kill, KillAfter

import crossdistill as cd
from crossdistill import Distiller, Term, Trainer
from crossdistill.errors import ConfigError


class PruneAt:
    """A step hook: at optimiser step ``at``, keep the stage-2 channels with the largest
    BN |gamma| (a network-slimming-style rule) and the matching stage-3 inputs."""

    def __init__(self, at: int):
        self.at = at

    def __call__(self, d):
        if d.step + 1 != self.at or d.structure_log:  # set_progress ran before this step
            return
        gamma = d.student.stage2[1].weight.abs()
        keep = gamma.topk(10).indices.sort().values.tolist()
        d.apply_structure(
            "prune_channels", path="stage2.0", bn="stage2.1", keep=keep, next=["stage3.0"]
        )


def _make(seed=0):
    torch.manual_seed(0)
    t = cd.models.create("cnn", num_classes=10, in_channels=1, img_size=8, channels=(8, 16, 16))
    torch.manual_seed(seed)
    s = cd.models.create("cnn", num_classes=10, in_channels=1, img_size=8, channels=(8, 16, 16))
    terms = [
        Term("ce"),
        Term("kd"),
        Term("mse", student="stage2", teacher="stage2", projector="auto"),
    ]
    return Distiller(s, t, terms, num_samples=2000, hooks=[PruneAt(4)])


SETTINGS = dict(
    epochs=2, batch_size=32, optimizer="sgd", lr=0.05, checkpoint_every=2, progress=False
)


def test_prune_event_rebuilds_and_exports_clean(digits):
    d = _make()
    Trainer(d, digits["train"], digits["val"], **SETTINGS).fit()
    assert d.student.stage2[0].out_channels == 10 and d.student.stage3[0].in_channels == 10
    assert d.projectors["mse"].__class__  # rebuilt for the 10-channel tap
    assert d.structure_log[0]["op"] == "prune_channels"
    exported = d.export()
    assert set(exported.state_dict()) == set(d.student.state_dict())
    x = digits["val"].x[:4]
    assert exported(x).shape == (4, 10)


def test_kill_after_structure_event_resumes_bit_identical(tmp_path, digits):
    ref = _make()
    Trainer(ref, digits["train"], digits["val"], out_dir=tmp_path / "a", **SETTINGS).fit()
    d = _make()
    with pytest.raises(Kill):  # 200 / 32 = 7 batches per epoch: die in epoch 2, after step 4
        Trainer(
            d,
            digits["train"],
            digits["val"],
            out_dir=tmp_path / "b",
            callbacks=[KillAfter(10)],
            **SETTINGS,
        ).fit()
    d2 = _make(seed=99)  # a fresh, unpruned student
    Trainer(d2, digits["train"], digits["val"], out_dir=tmp_path / "b", **SETTINGS).fit(resume=True)
    assert d2.student.stage2[0].out_channels == 10
    for (k, a), b in zip(ref.trainable_state().items(), d2.trainable_state().values()):
        assert torch.equal(a, b), k


def test_drop_layers_and_errors():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    model = torch.nn.Module()
    model.blocks = m
    from crossdistill.structure import apply

    apply(model, "drop_layers", {"path": "blocks", "keep": [0, 1]})
    assert len(model.blocks) == 2
    with pytest.raises(ConfigError, match="structure.keep"):
        apply(model, "drop_layers", {"path": "blocks", "keep": [5]})
    with pytest.raises(ConfigError, match="structure.op"):
        apply(model, "grow", {})
