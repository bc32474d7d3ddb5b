"""The same config and seed give bit-identical weights: from the CLI and the Python API, in
fresh processes (torch's default seed differs per process), with a projector and dropout."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import crossdistill as cd
from crossdistill import config as C
from crossdistill.build import make_trainer
from crossdistill.io import save_weights

CHILD = """
import sys
from pathlib import Path
import torch
torch.set_num_threads(1)
import crossdistill as cd
from crossdistill import config as C
from crossdistill.build import make_trainer
from crossdistill.cli import main

cfg, out = sys.argv[1], Path(sys.argv[2])
assert main(["train", cfg, "--out", str(out / "cli")]) == 0
make_trainer(C.load(cfg), out / "api").fit()
torch.manual_seed(7)  # the Python API with your own models: seed before building them
m = cd.models.create("vit", num_classes=10, in_channels=1, img_size=8, patch=2, dim=16,
                     depth=1, heads=2, dropout=0.1)
data = cd.data.load("digits", "train", limit=300)
cd.Trainer(cd.Distiller(m), data, epochs=1, batch_size=32, seed=7, progress=False,
           out_dir=out / "own").fit()
"""


def _config(tmp_path):
    torch.manual_seed(0)
    teacher = cd.models.create("cnn", num_classes=10, in_channels=1, img_size=8, channels=(8, 16))
    save_weights(teacher.state_dict(), tmp_path / "teacher.safetensors")
    cfg = tmp_path / "kd.yaml"
    cfg.write_text(
        f"teacher: {{model: cnn, channels: [8, 16], checkpoint: {tmp_path}/teacher.safetensors}}\n"
        "student: {model: vit, patch: 2, dim: 16, depth: 2, heads: 2, dropout: 0.1}\n"
        "data: {name: digits, batch_size: 64}\n"
        "terms:\n  - {loss: ce}\n  - {loss: kd, temperature: 4.0}\n"
        "  - {loss: mse, student: blocks.1, teacher: stage2, projector: auto}\n"
        "train: {epochs: 1, optimizer: adamw, lr: 0.002, seed: 11, progress: false}\n"
    )
    return cfg


def test_make_trainer_seeds_models_and_projectors(tmp_path, one_thread, digits, monkeypatch):
    monkeypatch.setattr("crossdistill.build.load_splits", lambda cfg: digits)  # small splits
    cfg = C.load(_config(tmp_path))
    states = []
    for _ in range(2):
        torch.manual_seed(torch.seed())  # whatever the process RNG holds before
        tr = make_trainer(cfg, None).setup()
        states.append(tr.distiller.trainable_state())
    assert any(k.startswith("projectors.") for k in states[0])
    for k, v in states[0].items():
        assert torch.equal(v, states[1][k]), k


def test_a_seed_override_seeds_the_student_too(tmp_path, one_thread, digits, monkeypatch):
    """``make_trainer(cfg, seed=s)`` builds the student ``train.seed: s`` would."""
    monkeypatch.setattr("crossdistill.build.load_splits", lambda cfg: digits)
    cfg = C.load(_config(tmp_path))
    by_override = make_trainer(cfg, None, seed=5).distiller.student.state_dict()
    cfg.train.seed = 5
    by_config = make_trainer(cfg, None).distiller.student.state_dict()
    for k, v in by_override.items():
        assert torch.equal(v, by_config[k]), k


@pytest.mark.slow
def test_two_processes_give_identical_weights(tmp_path):
    cfg = _config(tmp_path)
    for run in ("a", "b"):
        subprocess.run(
            [sys.executable, "-c", CHILD, str(cfg), str(tmp_path / run)],
            check=True,
            capture_output=True,
            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
            cwd=tmp_path,
            timeout=300,
        )
    for kind in ("cli", "api", "own"):
        a = (tmp_path / "a" / kind / "student.safetensors").read_bytes()
        b = (tmp_path / "b" / kind / "student.safetensors").read_bytes()
        assert a == b, kind
    cli = load_file(str(tmp_path / "a/cli/student.safetensors"))
    api = load_file(str(tmp_path / "a/api/student.safetensors"))
    assert all(torch.equal(v, api[k]) for k, v in cli.items())  # the CLI is the Python API
    print(f"\nseeded runs: 2 processes x (cli, api, own model): {len(cli)} tensors bit-identical")
