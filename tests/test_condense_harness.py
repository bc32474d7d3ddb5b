"""Harness (synthesise / judge / save), CLI plug-in and configs."""

from dataclasses import asdict
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


pytestmark = pytest.mark.usefixtures("one_thread")


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


# -- evaluation config chosen on val ----------------------------------------------------------
def test_candidate_configs_grid():
    base = H.EvalConfig(steps=10, batch_size=32)
    grid = H.candidate_configs(base, **H.DEFAULT_GRID)
    assert [(c.lr, c.steps) for c in grid] == [(0.01, 10), (0.01, 30), (0.05, 10), (0.05, 30)]
    assert (grid[0].lr, grid[0].steps) == (0.01, base.steps)  # the fixed recipe, first
    assert all(c.batch_size == 32 for c in grid)
    assert H.candidate_configs(base) == grid  # DEFAULT_GRID is the default
    for bad in ({"lrs": ()}, {"lrs": (0.0,)}, {"step_factors": (-1,)}, {"step_factors": ()}):
        with pytest.raises(ConfigError):
            H.candidate_configs(base, **bad)


def test_select_on_val_picks_best_and_reuses_model(digits, monkeypatch):
    _, val, test = splits = _splits(digits)
    cands = [H.EvalConfig(steps=2), H.EvalConfig(steps=3), H.EvalConfig(steps=2, lr=0.05)]
    # val accuracy per (arch, lr, steps): convnet ties 1 and 2 -> the earlier (1); mlp -> 2
    score = {
        ("convnet", 0.01, 2): 0.2,
        ("convnet", 0.01, 3): 0.6,
        ("convnet", 0.05, 2): 0.6,
        ("mlp", 0.01, 2): 0.5,
        ("mlp", 0.01, 3): 0.1,
        ("mlp", 0.05, 2): 0.9,
    }
    trained, tested = [], []
    real_train = H.train_model

    def train(arch, syn, k, cfg, *, seed, **kw):
        model = real_train(arch, syn, k, cfg, seed=seed, **kw)
        model.tag = (arch, cfg.lr, cfg.steps)
        trained.append((*model.tag, seed))
        return model

    def evaluate(model, data, device="cpu"):
        if data is test:
            tested.append((model.tag, id(model)))
            return {"acc": 0.5}
        assert data is val
        return {"acc": score[model.tag]}

    monkeypatch.setattr(H, "train_model", train)
    monkeypatch.setattr(H, "evaluate", evaluate)
    s = H.random_subset(digits["train"], 1)
    r = H.evaluate_synthetic(
        s,
        "digits",
        ("convnet", "mlp"),
        3,
        candidates=cands,
        seed=2,
        progress=False,
        net_kw={"width": 8, "depth": 2},
        splits=splits,
    )
    # per arch: one model per candidate (seed of model 0), then n_models - 1 fresh ones
    assert trained == [
        ("convnet", 0.01, 2, 2000),
        ("convnet", 0.01, 3, 2000),
        ("convnet", 0.05, 2, 2000),
        ("convnet", 0.01, 3, 2001),
        ("convnet", 0.01, 3, 2002),
        ("mlp", 0.01, 2, 2000),
        ("mlp", 0.01, 3, 2000),
        ("mlp", 0.05, 2, 2000),
        ("mlp", 0.05, 2, 2001),
        ("mlp", 0.05, 2, 2002),
    ]
    # test read once per final model, only ever on the chosen config
    assert [t for t, _ in tested] == [("convnet", 0.01, 3)] * 3 + [("mlp", 0.05, 2)] * 3
    assert len({i for _, i in tested[:3]}) == 3  # three distinct models (0 reused, not retrained)
    conv, mlp = r["archs"]["convnet"], r["archs"]["mlp"]
    assert conv["chosen"] == asdict(cands[1]) and mlp["chosen"] == asdict(cands[2])
    assert conv["candidates"] == [
        {"lr": 0.01, "steps": 2, "val": 0.2},
        {"lr": 0.01, "steps": 3, "val": 0.6},
        {"lr": 0.05, "steps": 2, "val": 0.6},
    ]
    assert conv["val"] == [0.6, 0.6, 0.6] and mlp["val"] == [0.9] * 3
    assert len(conv["test"]) == 3 and r["eval"]["select_on"] == "val"
    assert len(r["eval"]["candidates"]) == 3


def test_select_on_val_single_candidate_matches_fixed(digits):
    """Model 0 of the chosen candidate has model 0's seed: one candidate = the fixed run."""
    s = H.random_subset(digits["train"], 1)
    cfg = H.EvalConfig(steps=3)
    kw = dict(progress=False, splits=_splits(digits), seed=1)
    fixed = H.evaluate_synthetic(s, "digits", ("mlp",), 2, cfg=cfg, **kw)
    sel = H.evaluate_synthetic(s, "digits", ("mlp",), 2, candidates=[cfg], **kw)
    for k in ("val", "test"):
        assert sel["archs"]["mlp"][k] == fixed["archs"]["mlp"][k]
    assert "chosen" not in fixed["archs"]["mlp"] and fixed["eval"]["steps"] == 3


@pytest.mark.parametrize(
    "cands,field",
    [
        ([], "eval.candidates"),
        ([H.EvalConfig(lr=0.0)], "eval.candidates.lr"),
        ([H.EvalConfig(), H.EvalConfig(steps=0)], "eval.candidates.steps"),
        ([{"lr": 0.01}], "eval.candidates"),
    ],
)
def test_select_on_val_bad_candidates(digits, cands, field):
    s = H.random_subset(digits["train"], 1)
    with pytest.raises(ConfigError, match=field):
        H.evaluate_synthetic(s, "digits", ("mlp",), 1, candidates=cands, splits=_splits(digits))


def test_select_on_val_not_with_cfg(digits):
    s = H.random_subset(digits["train"], 1)
    with pytest.raises(ConfigError, match="eval.cfg"):
        H.evaluate_synthetic(
            s,
            "digits",
            ("mlp",),
            1,
            cfg=H.EvalConfig(),
            candidates=[H.EvalConfig()],
            splits=_splits(digits),
        )


def test_cli_eval_select_on_val(tmp_path, capsys, digits):
    import json

    run = tmp_path / "run"
    H.random_subset(digits["train"], 1).save(run / "synthetic.safetensors")
    (run / "config.yaml").write_text(
        "method: dm\nipc: 1\ndata: {name: digits}\neval: {archs: [mlp], n_models: 2, steps: 2}\n"
    )
    assert main(["condense-eval", str(run), "--no-progress", "--select-on-val"]) == 0
    out = capsys.readouterr().out
    assert "chosen on val" in out and "mlp lr=" in out
    res = json.loads((run / "eval.json").read_text())["results"][0]["archs"]["mlp"]
    assert [(c["lr"], c["steps"]) for c in res["candidates"]] == [
        (0.01, 2),
        (0.01, 6),
        (0.05, 2),
        (0.05, 6),
    ]
    assert (res["chosen"]["lr"], res["chosen"]["steps"]) in {
        (c["lr"], c["steps"]) for c in res["candidates"]
    }
    assert len(res["test"]) == 2
