"""`crossdistill cache-teacher` killed with SIGKILL at seeded points (mid shard bytes, after a
shard's rename, mid manifest, at a random moment): the store is refused as incomplete, and
re-running the same command completes it byte for byte like an uninterrupted run, with no temp
files left (issue #11, item 4)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import crossdistill as cd
from crossdistill import ConfigError
from crossdistill.cli import main
from crossdistill.io import save_weights
from crossdistill.teachers import TeacherStore

# Runs the CLI in a child process that SIGKILLs itself at one point: "save:K" halfway through
# writing the K-th file's bytes, "shard:K" right after the K-th shard is renamed into place,
# "manifest:K" before the K-th manifest replaces the old one, "timer:S" S seconds into
# cache_teacher.
DRIVER = r"""
import os, signal, sys, threading
import torch
torch.set_num_threads(1)
import crossdistill.io as cio
import crossdistill.teachers.store as store

point, arg = sys.argv[1].split(":")
seen = {"save": 0, "shard": 0, "manifest": 0}
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
real_save, real_replace, real_cache = cio.save_file, os.replace, store.cache_teacher

def save_file(tensors, path, metadata=None):
    real_save(tensors, path, metadata=metadata)
    seen["save"] += 1
    if point == "save" and seen["save"] == int(arg):
        os.truncate(path, os.path.getsize(path) // 2)
        die()

def replace(src, dst):
    kind = "manifest" if os.path.basename(dst) == "manifest.json" else "shard"
    seen[kind] += 1
    hit = point == kind and seen[kind] == int(arg)
    if hit and kind == "manifest":
        die()
    real_replace(src, dst)
    if hit:
        die()

def cache_teacher(*a, **kw):
    if point == "timer":
        threading.Timer(float(arg), die).start()
    return real_cache(*a, **kw)

cio.save_file, os.replace, store.cache_teacher = save_file, replace, cache_teacher
from crossdistill.cli import main
sys.exit(main(sys.argv[2:]))
"""

SHARD_SIZE, BATCH = 100, 64  # 1077 digits samples: 11 shards, cut mid-batch


@pytest.fixture
def setup(tmp_path, one_thread):
    torch.manual_seed(0)
    t = cd.models.create("cnn", num_classes=10, in_channels=1, img_size=8, channels=(8, 16, 16))
    ckpt = save_weights(t.state_dict(), tmp_path / "teacher.safetensors")
    cfg = {
        "student": {"model": "mlp", "hidden": [16]},
        "data": {"name": "digits"},
        "train": {"progress": False},
        "teacher": {"model": "cnn", "channels": [8, 16, 16], "checkpoint": str(ckpt)},
        "terms": [{"loss": "kd"}],
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))

    def args(out):
        return [
            "cache-teacher",
            str(path),
            "--out",
            str(out),
            "--shard-size",
            str(SHARD_SIZE),
            "--batch-size",
            str(BATCH),
            "--taps",
            "fc:input",
        ]

    ref = tmp_path / "ref"
    assert main(args(ref)) == 0
    return args, ref


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _kill(args, point: str) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", DRIVER, point, *args]
    return subprocess.run(cmd, env=env, capture_output=True, timeout=120).returncode


def _refused_or_done(out: Path, rc: int, ref: Path) -> str:
    """After a kill the store is refused with one clear line, or, when the kill came after
    the final manifest was written, it is the complete store."""
    assert rc in (0, -signal.SIGKILL)
    try:
        TeacherStore(out)
    except ConfigError as e:
        msg = str(e)
        assert rc != 0 and "\n" not in msg
        assert "not a teacher store" in msg or (
            "incomplete" in msg and str(out) in msg and "re-run `crossdistill cache-teacher`" in msg
        )
        return "refused"
    assert _files(out) == _files(ref)
    return "complete"


def test_kill_mid_shard_then_rerun_completes_byte_for_byte(tmp_path, setup, capsys):
    args, ref = setup
    out = tmp_path / "out"
    rc = _kill(args(out), "save:4")  # three shards in place, the fourth half written
    _refused_or_done(out, rc, ref)
    assert rc == -signal.SIGKILL and any(p.name.endswith(".tmp") for p in out.iterdir())
    assert main(args(out)) == 0
    assert _files(out) == _files(ref)  # same bytes, and no temp file left behind
    TeacherStore(out).verify()


@pytest.mark.slow
def test_ten_seeded_kills_each_completed_by_a_rerun(tmp_path, setup):
    args, ref = setup
    rng = np.random.default_rng(0)
    n_shards = len(list(ref.glob("shard-*.safetensors")))
    points = ["save:1", f"shard:{n_shards}", f"manifest:{n_shards + 1}"]  # first, last, final
    while len(points) < 10:
        kind = rng.choice(["save", "shard", "manifest", "timer"])
        arg = f"{rng.uniform(0, 0.1):.3f}" if kind == "timer" else str(rng.integers(1, n_shards))
        points.append(f"{kind}:{arg}")
    outcomes = []
    for i, point in enumerate(points):
        out = tmp_path / f"out{i}"
        seen = [_refused_or_done(out, _kill(args(out), point), ref)]
        if i % 3 == 1:  # kill the re-run too, further on
            seen.append(_refused_or_done(out, _kill(args(out), f"save:{1 + i % 2}"), ref))
        assert main(args(out)) == 0, point
        assert _files(out) == _files(ref), point
        outcomes.append(f"{point}: {', '.join(seen)}, completed by re-run")
    print("\n".join(["cache-teacher kills:", *outcomes]))
