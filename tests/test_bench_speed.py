import importlib.util
import json
from pathlib import Path

import pytest
import torch

import crossdistill as cd

ROOT = Path(__file__).resolve().parents[1]


def _speed_module():
    spec = importlib.util.spec_from_file_location("speed", ROOT / "benchmarks" / "speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_speed_benchmark_smoke(tmp_path):
    mod = _speed_module()
    out = tmp_path / "speed.json"
    mod.main(["--repeats", "1", "--limit", "256", "--probe-steps", "10", "--results", str(out)])
    res = json.loads(out.read_text())
    assert set(res["samples_per_second"]) == set(mod.MODES)
    assert res["store_bytes_per_sample_top8_of_100"] <= 40
    assert set(res["linear_probe"]["ms_per_step"]) == set(mod.PROBE_MODES)


def test_linear_probe_runs_and_writes_json(tmp_path, capsys):
    """The probe at toy size: it runs, prints its table and writes its JSON (no speed claim)."""
    mod = _speed_module()
    out = tmp_path / "linear.json"
    argv = ["--linear-only", "--probe-steps", "6", "--probe-repeats", "1", "--results", str(out)]
    mod.main(argv)
    res = json.loads(out.read_text())
    assert set(res["ms_per_step"]) == set(mod.PROBE_MODES)
    assert set(res["overhead_ms_per_step"]) == {
        "trainer_vs_hand",
        "own_loop_vs_hand",
        "trainer_vs_usual_hand",
    }
    # the same-maths hand loop is the same training, so the difference is framework alone
    assert res["same_weights_hand_and_trainer"] is True
    assert "per-step overhead" in capsys.readouterr().out


def _trainer(data, terms, **kw):
    torch.manual_seed(0)
    student = cd.models.create(
        "cnn", channels=(4, 8, 8), num_classes=10, in_channels=1, img_size=8
    )
    teacher = cd.models.create(
        "cnn", channels=(4, 8, 8), num_classes=10, in_channels=1, img_size=8
    )
    d = cd.Distiller(student, teacher, terms)
    settings = dict(epochs=1, batch_size=16, lr=0.01, progress=False, schedule="constant")
    return cd.Trainer(d, data, **{**settings, **kw}).setup()


def _data(n=64):
    g = torch.Generator().manual_seed(0)
    return cd.data.Dataset.classification(
        torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
    )


def _hook_counts(model):
    return {
        name: len(m._forward_hooks) + len(m._forward_pre_hooks)
        for name, m in model.named_modules()
    }


def test_hooks_are_installed_once():
    terms = [cd.Term("ce"), cd.Term("mse", student="stage2", teacher="stage2", weight=1.0)]
    tr = _trainer(_data(), terms)
    d = tr.distiller
    before = (_hook_counts(d.student), _hook_counts(d.teachers["teacher"]))
    assert sum(before[0].values()) == 1 and sum(before[1].values()) == 1
    n = len(tr.batches)
    for b, batch in enumerate(tr.batches.epoch(0)):
        tr.train_step(batch, 0, b, n)
    assert (_hook_counts(d.student), _hook_counts(d.teachers["teacher"])) == before


def _reference_sums(steps) -> dict:
    """The running sums as one float32 add per key (what the stacked add must equal)."""
    sums = {}
    for add in steps:
        for key, v in add.items():
            sums[key] = sums[key] + v if key in sums else v
    return sums


def test_running_sums_equal_per_key_float32_sums():
    """The trainer's stacked running sums: bit for bit the per-key float32 sums, also when
    the sums are replaced by floats mid-epoch (a resume) and for the last, smaller batch."""
    tr = _trainer(_data(72), [cd.Term("ce"), cd.Term("kd", weight=0.9)])
    d, n = tr.distiller, len(tr.batches)
    outs = []
    for b, batch in enumerate(tr.batches.epoch(0)):
        out = tr.train_step(batch, 0, b, n)
        outs.append((out, batch))
        if b == 2:  # as after a resume: the checkpoint's floats
            tr.state["sums"] = tr._floats(tr.state["sums"])
    got = tr._floats(tr.state["sums"])
    steps = []
    for out, batch in outs:
        k = len(out.logits)
        add = {"n": torch.tensor(float(k)), "loss": out.total.detach().float() * k}
        task = {}
        d.task.update(task, out.logits, batch)
        add.update({f"task:{key}": v for key, v in task.items()})
        add.update({f"loss_{name}": v.detach().float() * k for name, v in out.losses.items()})
        steps.append(add)
    want = tr._floats(_reference_sums(steps))
    assert list(got) == list(want)
    assert got == want  # exact float equality, key by key
