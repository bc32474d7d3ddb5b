"""Every example of issue #11 gives one line and exit 2 before any work; the schema is
derived from the signatures (one source per concept)."""

import copy
import math

import pytest
import yaml

from crossdistill import config as C
from crossdistill import schema
from crossdistill.cli import main
from crossdistill.errors import ConfigError
from crossdistill.train.schedule import lr_at

BASE = {
    "name": "t",
    "teacher": {"model": "cnn", "channels": [8], "checkpoint": "x.safetensors"},
    "student": {"model": "vit", "patch": 2, "dim": 16, "depth": 1, "heads": 2},
    "data": {"name": "digits", "batch_size": 64},
    "terms": [{"loss": "ce"}, {"loss": "kd", "temperature": 4.0, "weight": 0.9}],
    "train": {"epochs": 1},
}


def _with(path, value):
    raw = copy.deepcopy(BASE)
    node, keys = raw, path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
    if isinstance(node, list):
        node[int(keys[-1])] = value
    else:
        node[keys[-1]] = value
    return raw


CASES = [
    ("terms.1.temperature", "hot", "terms.1.temperature"),
    ("terms.1.temperature", math.nan, "terms.1.temperature"),
    ("terms.1.temperature", [1, 2], "terms.1.temperature"),
    ("terms.1.temperature", 1e-30, "terms.1.temperature"),
    ("terms.1.temperature", 10**40, "terms.1.temperature"),
    ("terms.0.label_smoothing", "x", "terms.0.label_smoothing"),
    ("terms.1.teacher", None, "terms.1.teacher"),
    ("terms.1.warmup", math.inf, "terms.1.warmup"),
    ("train.epochs", 1e30, "train.epochs"),
    ("student.depth", 10**30, "student.depth"),
    ("data.img_size", 100000, "data.img_size"),
    ("train.milestones", [0.5] * 200, "train.milestones"),
    ("train.lr", 1e300, "train.lr"),
    ("train.seed", 2**63, "train.seed"),
    ("train.warmup_epochs", math.inf, "train.warmup_epochs"),
    ("data.split_seed", -1, "data.split_seed"),
    ("name", "../../x", "name"),
    ("name", ".hidden", "name"),
    ("train.min_lr", 1.0, "train.min_lr"),
    ("train.nan", "ignore", "train.nan"),
    ("train.log", ["wandb"], "train.log.0"),
]


@pytest.mark.parametrize("path,value,field", CASES)
def test_bad_values_name_the_field(path, value, field):
    with pytest.raises(ConfigError) as e:
        C.validate(_with(path, value))
    assert e.value.field == field


@pytest.mark.parametrize(
    "term,field",
    [
        ({"loss": "dkd", "alpha": "abc"}, "terms.0.alpha"),
        ({"loss": "dkd", "alpha": -1}, "terms.0.alpha"),
        ({"loss": "kd", "temprature": 2}, "terms.0.temprature"),
        ({"loss": "reviewkd"}, "terms.0.student"),
        (
            {"loss": "mse", "student": "a", "teacher": "b", "projector": "mlp",
             "projector_params": {"hidden": -1}},
            "terms.0.projector_params.hidden",
        ),
    ],
)
def test_loss_and_projector_params(term, field):
    with pytest.raises(ConfigError) as e:
        C.validate({**BASE, "terms": [term]})
    assert e.value.field == field


def test_unknown_loss_param_lists_allowed():
    with pytest.raises(ConfigError) as e:
        C.validate({**BASE, "terms": [{"loss": "kd", "tau": 2}]})
    assert "allowed: temperature" in e.value.allowed


def test_method_model_data_task_prepare_params():
    bad = [
        ({"method": {"name": "dkd", "alpha": -1}}, "method.alpha"),
        ({"student": {"model": "cnn", "channels": [10**30]}}, "student.channels.0"),
        ({"data": {"name": "shakespeare", "params": {"block": -3}}}, "data.params.block"),
        ({"data": {"name": "shakespeare", "params": {"blok": 3}}}, "data.params.blok"),
        ({"data": {"name": "digits", "params": {"x": 1}}}, "data.params.x"),
        ({"prepare": [{"name": "gaussian_noise", "std": "x"}]}, "prepare.0.std"),
        ({"task": {"name": "retrieval", "ks": "x"}}, "task.ks"),
    ]
    for extra, field in bad:
        with pytest.raises(ConfigError) as e:
            C.validate({**BASE, **extra})
        assert e.value.field == field, (extra, e.value)


def test_values_are_coerced_and_valid_configs_pass():
    cfg = C.validate(_with("terms.1.temperature", "2"))
    assert cfg.terms[1].model_extra["temperature"] == 2.0
    cfg = C.validate(_with("train.log", "tensorboard"))
    assert cfg.train.log == ["tensorboard"]


def test_train_spec_is_derived_from_train_config():
    import dataclasses

    from crossdistill.train.config import FROM_DATA, TrainConfig

    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in FROM_DATA]
    assert list(C.TrainSpec.model_fields) == names
    for f in dataclasses.fields(TrainConfig):
        if f.name in names and f.default is not dataclasses.MISSING:
            assert C.TrainSpec.model_fields[f.name].default == f.default


def test_spec_is_cached_and_required_named():
    from crossdistill.registry import PREPARES

    fn = PREPARES.get("modality_dropout")
    assert schema.spec_of(fn) is schema.spec_of(fn)
    with pytest.raises(ConfigError, match="needs keys"):
        schema.check(fn, {}, "prepare.0", "stage")


def test_cli_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    raw = {**_with("train.device", "cuda:7"), "terms": [{"loss": "ce"}]}
    del raw["teacher"]
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("crossdistill: error: train.device")
    assert not (tmp_path / "r").exists()


def test_lr_at_defaults_unchanged_and_epoch_unit():
    old = lambda s, t, w: 0.5 * (1 + math.cos(math.pi * min(1.0, (s - w) / max(1, t - w))))
    for s in range(0, 100, 7):
        assert lr_at(s, 100, base=1.0, warmup=5) == (s + 1) / 5 if s < 5 else old(s, 100, 5)
    per_epoch = [lr_at(s, 40, base=1.0, unit=10) for s in range(40)]
    assert per_epoch[:10] == [1.0] * 10 and len(set(per_epoch)) == 4
    assert lr_at(39, 40, base=1.0, min_lr=0.1) >= 0.1
    assert lr_at(39, 40, base=1.0, schedule="step", min_lr=0.05) == 0.05
