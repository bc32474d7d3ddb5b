"""Missing-modality evaluation (task views: zeroed keys, a seeded random per-sample mask, the
``missing`` shorthand, key replacement) and bad paired input caught before training."""

from __future__ import annotations

import pytest
import torch
from test_av import make_fake_data
from torch import nn

import crossdistill as cd
from crossdistill import Distiller, Trainer, evaluate
from crossdistill import tasks as T
from crossdistill.build import make_trainer
from crossdistill.config import validate
from crossdistill.data import Dataset, load_split
from crossdistill.errors import ConfigError
from crossdistill.tasks.classification import RandomMaskView, ReplaceView, ZeroView

FAST = dict(epochs=1, batch_size=20, optimizer="adamw", lr=3e-3, progress=False)


class Votes(nn.Module):
    """Logits = a's one-hot vote + b's one-hot vote: the sum of what each present key says."""

    def forward(self, a, b):
        return a + b


def _votes_data(n=40):
    y = torch.arange(n) % 4
    onehot = nn.functional.one_hot(y, 4).float()
    wrong = nn.functional.one_hot((y + 1) % 4, 4).float() * 0.5  # b is wrong, but quieter
    return Dataset({"a": onehot, "b": wrong, "y": y}, {"a": "value", "b": "value", "y": "label"})


# -- the random mask ------------------------------------------------------------------------


def test_random_mask_is_per_sample_seeded_and_keeps_one():
    v = RandomMaskView("r", 0.5, ["image", "audio", "text"], seed=0)
    ids = torch.arange(4000)
    m = v.mask(ids)
    assert m.shape == (4000, 3) and not m.all(1).any()  # never every key
    # rate 0.5 per key, less the rescued all-dropped rows (1/8 of them give one key back)
    assert abs(m.float().mean().item() - (0.5 - 1 / 24)) < 0.02
    perm = torch.randperm(4000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(v.mask(ids[perm]), m[perm])  # a function of the id, not the position
    assert torch.equal(v.mask(ids[:7]), m[:7])  # nor of the batch size
    keys = ["image", "audio", "text"]
    assert torch.equal(RandomMaskView("r", 0.5, keys, seed=0).mask(ids), m)
    assert not torch.equal(RandomMaskView("r", 0.5, keys, seed=1).mask(ids), m)
    assert not RandomMaskView("r", 0.0, ["a", "b"]).mask(ids).any()
    ones = RandomMaskView("r", 1.0, ["a", "b"]).mask(ids)
    assert (ones.sum(1) == 1).all() and 0.45 < ones[:, 0].float().mean() < 0.55
    # applied: dropped keys are zero for that sample, others untouched, the batch unchanged
    batch = {"a": torch.randn(50, 3), "b": torch.randn(50, 2, 2), "idx": torch.arange(50) + 9}
    out = RandomMaskView("r", 0.5, ["a", "b"], seed=3)(batch)
    drop = RandomMaskView("r", 0.5, ["a", "b"], seed=3).mask(batch["idx"])
    assert torch.equal(out["a"][drop[:, 0]], torch.zeros(int(drop[:, 0].sum()), 3))
    assert torch.equal(out["b"][~drop[:, 1]], batch["b"][~drop[:, 1]])
    assert (batch["a"] != 0).all()


def test_view_specs_and_errors():
    task = T.build(
        {
            "name": "classification",
            "views": {
                "image_only": ["audio"],
                "z": {"zero": "image"},
                "random50": {"random": 0.5, "keys": ["image", "audio"], "seed": 2},
                "swap": {"replace": {"image": "other"}},
            },
        }
    )
    v = task.views
    assert isinstance(v["image_only"], ZeroView) and v["z"].keys == ["image"]
    assert isinstance(v["random50"], RandomMaskView) and v["random50"].seed == 2
    assert isinstance(v["swap"], ReplaceView)
    with pytest.raises(ConfigError, match=r"task\.views\.r\.random: got 1\.5.*\[0, 1\]"):
        T.build({"name": "classification", "views": {"r": {"random": 1.5, "keys": ["a", "b"]}}})
    with pytest.raises(ConfigError, match=r"task\.views\.r\.random: got -0\.1"):
        T.build({"name": "classification", "views": {"r": {"random": -0.1, "keys": ["a", "b"]}}})
    with pytest.raises(ConfigError, match=r"task\.views\.r\.keys"):
        T.build({"name": "classification", "views": {"r": {"random": 0.5, "keys": ["a"]}}})
    with pytest.raises(ConfigError, match=r"task\.views\.r\.rate"):
        T.build({"name": "classification", "views": {"r": {"random": 0.5, "rate": 1}}})
    with pytest.raises(ConfigError, match=r"task\.views\.r"):
        T.build({"name": "classification", "views": {"r": {"zero": ["a"], "random": 0.5}}})
    with pytest.raises(ConfigError, match=r"task\.views\.r"):
        T.build({"name": "classification", "views": {"r": 3}})
    # a view key the batch lacks: named, with the batch's keys
    with pytest.raises(ConfigError, match=r"task\.views\.z.*'image'.*batch has: audio, idx, y"):
        task.check_batch({"audio": 0, "y": 0, "idx": 0})


def test_missing_shorthand():
    task = T.build(
        {
            "name": "classification",
            "inputs": ["image", "audio"],
            "missing": ["image_only", "audio_only", "no_audio", "random@0.5", "random@0.125"],
        }
    )
    v = task.views
    assert list(v) == ["image_only", "audio_only", "no_audio", "random50", "random12p5"]
    assert v["image_only"].keys == ["audio"] and v["audio_only"].keys == ["image"]
    assert v["no_audio"].keys == ["audio"]
    assert v["random50"].keys == ["image", "audio"] and v["random50"].rate == 0.5
    # modality keys from the _only entries, or given
    assert T.build({"missing": ["image_only", "audio_only"]}).views["image_only"].keys == ["audio"]
    three = T.build({"missing": ["random@0.3"], "modalities": ["a", "b", "c"]})
    assert three.views["random30"].keys == ["a", "b", "c"]
    for bad, match in [
        ({"missing": ["random@1.5"]}, r"task\.missing: got 1\.5.*\[0, 1\]"),
        ({"missing": ["image_only"]}, "task.modalities"),
        ({"missing": ["sideways"], "modalities": ["a", "b"]}, r"task\.missing.*_only"),
        ({"missing": ["c_only"], "modalities": ["a", "b"]}, "not a modality"),
        ({"missing": ["a_only"], "modalities": ["a", "b"], "views": {"a_only": ["b"]}}, "a_only"),
        ({"modalities": ["a", "b"]}, "only used with task.missing"),
    ]:
        with pytest.raises(ConfigError, match=match):
            T.build({"name": "classification", **bad})


def test_evaluate_views_match_hand_values():
    data = _votes_data()
    task = {
        "name": "classification",
        "inputs": ["a", "b"],
        "views": {
            "no_a": ["a"],
            "r": {"random": 0.5, "keys": ["a", "b"], "seed": 0},
            "b_is_a": {"replace": {"b": "a"}},
        },
    }
    m = evaluate(Votes(), data, batch_size=7, task=task)
    assert m["acc"] == 1.0  # a's vote (1) beats b's (0.5)
    assert m["no_a_acc"] == 0.0  # b alone is always wrong
    assert m["b_is_a_acc"] == 1.0
    # random view: right exactly where a was kept
    drop = RandomMaskView("r", 0.5, ["a", "b"]).mask(data.idx)
    assert m["r_acc"] == pytest.approx(float((~drop[:, 0]).float().mean()))
    assert 0 < m["r_acc"] < 1
    # identical across batch sizes (the mask follows the sample id)
    assert evaluate(Votes(), data, batch_size=40, task=task)["r_acc"] == m["r_acc"]
    # a view key the data lacks: a ConfigError before any forward
    with pytest.raises(ConfigError, match=r"task\.views\.c.*batch has: a, b, idx, y"):
        evaluate(Votes(), data, task={"inputs": ["a", "b"], "views": {"c": ["c"]}})


# -- end to end on fake audio-visual digits ----------------------------------------------------


@pytest.fixture
def av(tmp_path):
    mn, fsdd = make_fake_data(tmp_path)
    kw = dict(root=mn, fsdd_root=fsdd, n_mels=32, frames=16)
    return {s: load_split("av", s, **kw) for s in ("train", "val", "test")}, (mn, fsdd)


def test_fusion_trained_and_scored_with_missing_views(av, one_thread):
    splits, _ = av
    torch.manual_seed(0)
    student = cd.models.create("fusion-early", width=4)
    task = {
        "name": "classification",
        "inputs": ["image", "audio"],
        "missing": ["image_only", "audio_only", "random@0.5"],
    }
    d = Distiller(student, task=task)
    res = Trainer(d, splits["train"], splits["val"], splits["test"], **FAST).fit()
    for k in ("test_acc", "test_image_only_acc", "test_audio_only_acc", "test_random50_acc"):
        assert 0.0 <= res[k] <= 1.0, k
    # a view reading a key the data lacks fails in setup, before the first step
    bad = Distiller(
        cd.models.create("fusion-early", width=4),
        task={"inputs": ["image", "audio"], "views": {"v": ["depth"]}},
    )
    t = Trainer(bad, splits["train"], splits["val"], **FAST)
    with pytest.raises(ConfigError, match=r"task\.views\.v.*'depth'.*batch has: audio, idx"):
        t.setup()


def test_model_input_the_data_lacks(av):
    splits, _ = av
    d = Distiller(cd.models.create("audio-cnn2d", img_size=(32, 16)), io={"inputs": ["speech"]})
    with pytest.raises(ConfigError, match=r"student\.inputs.*'speech'.*batch has: audio, idx"):
        Trainer(d, splits["train"], **FAST).setup()


def _cfg(mn, fsdd, **task):
    return validate(
        {
            "student": {"model": "fusion", "width": 4, "dim": 8, "inputs": ["image", "audio"]},
            "data": {
                "name": "av",
                "root": mn,
                "batch_size": 20,
                "params": {"fsdd_root": fsdd, "n_mels": 32, "frames": 16},
            },
            **({"task": {"name": "classification", **task}} if task else {}),
            "train": {"epochs": 1, "progress": False},
        }
    )


def test_a_class_without_recordings_for_train_speakers_is_caught_before_training(tmp_path):
    mn, fsdd = make_fake_data(tmp_path, skip={("ann", 3)})  # ann is the only train speaker
    with pytest.raises(ConfigError, match=r"data\.train.*class 3 has images but no recordings"):
        make_trainer(_cfg(mn, fsdd))
    # val and test (bob, cat) have every digit
    assert len(load_split("av", "val", root=mn, fsdd_root=fsdd, frames=8)) == 20


def test_config_task_errors_before_training(av):
    _, (mn, fsdd) = av
    with pytest.raises(ConfigError, match=r"task\.views\.r\.random.*\[0, 1\]"):
        make_trainer(_cfg(mn, fsdd, views={"r": {"random": 2, "keys": ["image", "audio"]}}))
    trainer = make_trainer(_cfg(mn, fsdd, missing=["random@0.25"], modalities=["image", "audio"]))
    assert list(trainer.distiller.task.views) == ["random25"]
