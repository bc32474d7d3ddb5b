"""Harness (synthesise / judge / save), CLI plug-in and configs."""

from pathlib import Path

import pytest
import torch

from crossdistill.cli import main
from crossdistill.condense import SyntheticSet
from crossdistill.condense import cli as C
from crossdistill.condense import harness as H
from crossdistill.condense.base import MemoryMeter
from crossdistill.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _splits(digits):
    return digits["train"], digits["val"], digits["test"]


def test_random_subset_and_full(digits):
    s = H.random_subset(digits["train"], 3, seed=1)
    assert len(s) == 30 and torch.equal(s.y.bincount(), torch.full((10,), 3))
    assert torch.equal(H.random_subset(digits["train"], 3, seed=1).x, s.x)
    assert len(H.full_train_set(digits["train"])) == len(digits["train"])
    with pytest.raises(ConfigError, match="ipc"):
        H.random_subset(digits["train"], 1000)


def test_evaluate_synthetic_structure(digits):
    s = H.random_subset(digits["train"], 2)
    cfg = H.EvalConfig(steps=5)
    r = H.evaluate_synthetic(
        s,
        "digits",
        ("convnet", "mlp"),
        2,
        cfg=cfg,
        progress=False,
        net_kw={"width": 8, "depth": 2},
        splits=_splits(digits),
    )
    for a in ("convnet", "mlp"):
        assert len(r["archs"][a]["test"]) == 2 and 0 <= r["archs"][a]["test_mean"] <= 1
        assert "val_mean" in r["archs"][a]
    assert r["eval"]["steps"] == 5


def test_soft_and_relabel_paths(digits):
    s = H.random_subset(digits["train"], 1)
    soft = SyntheticSet(s.x, s.y, soft=torch.randn(10, 10), temperature=3.0, meta={"ipc": 1})
    calls = []

    def relabel(x):
        calls.append(len(x))
        return torch.zeros(len(x), 10)

    rel = SyntheticSet(s.x, s.y, relabel=relabel, meta={"ipc": 1})
    cfg = H.EvalConfig(steps=3)
    for syn in (soft, rel):
        H.evaluate_synthetic(
            syn, "digits", ("mlp",), 1, cfg=cfg, progress=False, splits=_splits(digits)
        )
    assert calls == [10, 10, 10]


def test_eval_presets_fixed():
    assert H.eval_config("digits", 10).steps == H.EVAL_PRESETS[("digits", 10)].steps
    assert H.eval_config("mnist", 20).steps in {c.steps for c in H.EVAL_PRESETS.values()}
    assert H.eval_config("digits", 10, steps=7).steps == 7


def test_save_load_grid(tmp_path, digits):
    syn = H.synthesize(
        "dm",
        digits["train"],
        ipc=2,
        iterations=1,
        progress=False,
        net_kw={"width": 8, "depth": 2},
        batch_real=8,
    )
    p = syn.save(tmp_path / "s.safetensors")
    back = SyntheticSet.load(p)
    assert torch.equal(back.x, syn.x) and back.meta["method"] == "dm"
    png = H.save_grid(syn, tmp_path / "grid.png")
    from PIL import Image

    im = Image.open(png)
    assert im.size[1] > im.size[0] / 2 > 0  # 10 rows of 2 images


def test_memory_meter():
    with MemoryMeter("cpu") as m:
        x = torch.ones(2_000_000)
        del x
    assert m.peak_mib > 0 and m.how


def test_cli_condense_and_eval(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "method: {name: dm, batch_real: 8}\nipc: 1\ndata: {name: digits}\niterations: 2\n"
        f"out_dir: {tmp_path / 'run'}\nnet_kw: {{width: 8, depth: 2}}\n"
        "eval: {archs: [convnet, mlp], n_models: 1, steps: 3}\n"
    )
    assert main(["condense", str(cfg), "--no-progress"]) == 0
    run = tmp_path / "run"
    assert (run / "synthetic.safetensors").is_file() and (run / "grid.png").is_file()
    assert (run / "synthetic.json").is_file()
    assert main(["condense-eval", str(run), "--no-progress", "--archs", "mlp"]) == 0
    assert (run / "eval.json").is_file()
    assert "dm" in capsys.readouterr().out


@pytest.mark.parametrize(
    "yaml_text,field",
    [
        ("method: dmm\n", "method"),
        ("method: dm\nipc: 0\n", "ipc"),
        ("method: dm\ndata: {name: cifar}\n", "data.name"),
        ("method: dm\nlr_imgg: 1\n", "lr_imgg"),
        ("method: dm\neval: {archs: [nonet]}\n", "eval.archs"),
        ("- a list\n", "config"),
    ],
)
def test_cli_bad_config(tmp_path, capsys, yaml_text, field):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    assert main(["condense", str(cfg), "--no-progress"]) == 2
    assert field in capsys.readouterr().err


def test_cli_eval_missing_run(tmp_path, capsys):
    assert main(["condense-eval", str(tmp_path)]) == 2
    assert "synthetic.safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("condense_*.yaml")))
def test_shipped_configs_validate(path):
    cfg = C.load_config(path)
    C.check_hyper(cfg.method, cfg.method_hyper())


def test_cli_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["condense", "--help"])
    assert "YAML" in capsys.readouterr().out
