"""Kill anywhere: SIGKILL ``crossdistill train`` at seeded random points (some inside a
checkpoint write, held open by ``CROSSDISTILL_CKPT_PAUSE``), resume each with ``--resume``:
every run ends with the uninterrupted run's weights, bit for bit, and no temp files."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from crossdistill.cli import main

CONFIG = (
    "student: {model: mlp, hidden: [32], dropout: 0.2}\n"
    "data: {name: digits, batch_size: 32, augment: {shift: 1}}\n"
    "terms: [{loss: ce}]\n"
    "train: {epochs: EPOCHS, optimizer: adamw, lr: 0.003, warmup_epochs: 0.5, seed: 5,\n"
    "        checkpoint_every: 1, progress: false}\n"
)
PAUSE = "0.3"  # seconds each checkpoint write stays a temp file, for the write kills


def _cmd(cfg, out, *extra):
    return [sys.executable, "-m", "crossdistill.cli", "train", str(cfg), "--out", str(out), *extra]


def _env(pause=False):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CROSSDISTILL_CKPT_PAUSE", None)
    if pause:
        env["CROSSDISTILL_CKPT_PAUSE"] = PAUSE
    return env


def _wait(cond, proc, timeout=120.0):
    end = time.time() + timeout
    while not cond():
        if proc.poll() is not None:
            return False  # finished (or failed) first
        if time.time() > end:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.005)
    return True


def _kill_and_resume(cfg, out, plan: tuple) -> str:
    """One kill (``("write", n)``: inside the n-th checkpoint write; ``("time", s)``: s seconds
    after the first checkpoint), then ``--resume``. Returns where the kill landed."""
    kind, arg = plan
    proc = subprocess.Popen(
        _cmd(cfg, out),
        env=_env(kind == "write"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert _wait(lambda: (out / "last.ckpt").is_file(), proc), "ended before a checkpoint"
    if kind == "write":
        seen: set = set()

        def nth_write():
            seen.update(p.name for p in out.glob(".last.ckpt.*.tmp"))
            return len(seen) >= arg and any(out.glob(".last.ckpt.*.tmp"))

        _wait(nth_write, proc)
    else:
        time.sleep(arg)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    temps = sorted(p.name[1:].rsplit(".", 2)[0] for p in out.glob(".*.tmp"))  # .NAME.X.tmp
    st = torch.load(out / "last.ckpt", weights_only=True)["state"]
    where = (
        f"{kind} {arg:g}: "
        + (
            f"killed at step {st['step']} (epoch {st['epoch']}, batch "
            f"{st['batch']}), temp files of {temps or 'none'}"
        )
        if alive
        else f"{kind} {arg:g}: finished before the kill"
    )
    done = subprocess.run(
        _cmd(cfg, out, "--resume"), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert not list(out.rglob("*.tmp")), list(out.rglob("*.tmp"))
    return where


def _reference(tmp_path, epochs: int, in_process: bool):
    """The uninterrupted run: its weights and, run as a subprocess, the seconds from its first
    checkpoint to its results (the span the timed kills are drawn from)."""
    cfg = tmp_path / "kill.yaml"
    cfg.write_text(CONFIG.replace("EPOCHS", str(epochs)))
    ref = tmp_path / "ref"
    if in_process:
        n = torch.get_num_threads()
        torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1)
        try:
            assert main(["train", str(cfg), "--out", str(ref)]) == 0
        finally:
            torch.set_num_threads(n)
        seconds = 0.0
    else:  # seconds from the first checkpoint to the results, as the parent sees them
        proc = subprocess.Popen(_cmd(cfg, ref), env=_env(), stdout=subprocess.DEVNULL)
        assert _wait(lambda: (ref / "last.ckpt").is_file(), proc)
        t0 = time.time()
        _wait(lambda: (ref / "results.json").is_file(), proc)
        seconds = time.time() - t0
        assert proc.wait(timeout=300) == 0
    return cfg, load_file(str(ref / "student.safetensors")), seconds


def _check(tmp_path, plans, epochs=2):
    timed = any(kind == "time" for kind, _ in plans)
    cfg, ref, seconds = _reference(tmp_path, epochs, in_process=not timed)
    lines = []
    for i, plan in enumerate(plans):
        if plan[0] == "time":  # a fraction of the uninterrupted run's training time
            plan = ("time", round(plan[1] * seconds, 3))
        out = tmp_path / f"k{i}"
        where = _kill_and_resume(cfg, out, plan)
        got = load_file(str(out / "student.safetensors"))
        same = got.keys() == ref.keys() and all(torch.equal(got[k], v) for k, v in ref.items())
        lines.append(f"kill {i + 1}: {where} -> resumed, {'identical' if same else 'DIFFERENT'}")
        assert same, lines[-1]
    print(
        f"\n{len(plans)} SIGKILLs, each resumed with --resume; all bit-identical to the "
        "uninterrupted run, no temp files left:\n  " + "\n  ".join(lines)
    )


def test_kill_in_a_checkpoint_write_resumes_bit_identical(tmp_path):
    _check(tmp_path, [("write", 3)])


@pytest.mark.slow
def test_ten_random_kills_resume_bit_identical(tmp_path):
    rng = random.Random(11)
    plans = [
        ("write", rng.randint(1, 12)) if i % 3 == 0 else ("time", rng.uniform(0.05, 0.9))
        for i in range(10)
    ]
    _check(tmp_path, plans, epochs=6)
