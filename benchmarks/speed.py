"""Speed benchmark: what a KD step costs in crossdistill vs plain PyTorch, side by side.

In one process, same models, data, batch size and thread count, it times one epoch of
  (a) a student-only CE step (plain PyTorch),
  (b) a hand-written plain-PyTorch KD loop (online teacher under no_grad, CE + KD),
  (c) crossdistill online KD (Distiller + Trainer, CE + KD),
  (d) crossdistill KD from a stored teacher (TeacherStore, no teacher forward),
  (e) crossdistill online KD with two feature taps and auto projectors,
interleaving the modes round-robin and reporting the median of ``--repeats`` epochs. It prints
samples/s, the ratios c/b and d/a, peak memory per mode (a fresh subprocess each; RSS on CPU,
``max_memory_allocated`` on CUDA) and store bytes per sample (including top-8 logits of a
100-class teacher), and writes benchmarks/results/speed.json.

It also runs the linear-model probe (:func:`linear_probe`): the same KD step on
``nn.Linear(64, 10)`` student and teacher, where the models cost almost nothing, so the time
that crossdistill adds per step over a hand-written loop doing the same maths is what is left.
``--linear-only`` runs just the probe and writes benchmarks/results/speed_linear.json.

    python benchmarks/speed.py [--device cpu] [--threads 1] [--repeats 5] [--linear-only]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import crossdistill as cd
import crossdistill.report
from crossdistill.data import Batches
from crossdistill.teachers import TeacherStore, cache_teacher

MODES = ("a_student_ce", "b_plain_kd", "c_cd_online_kd", "d_cd_stored_kd", "e_cd_features_kd")
PROBE_MODES = ("hand_same_maths", "hand_usual", "cd_own_loop", "cd_trainer")
PROBE_TARGET_MS = 0.1  # per-step overhead of the Trainer over the hand-written loop


def load_data(limit: int):
    try:
        return cd.data.load("mnist", "train", limit=limit), "mnist (28x28)"
    except cd.ConfigError:
        return cd.data.load("digits", "train", img_size=28), "digits upsampled to 28x28"


def models(seed: int = 0):
    torch.manual_seed(seed)
    teacher = cd.models.create(
        "resnet", depth=20, width=1, num_classes=10, in_channels=1, img_size=28
    ).eval()
    student = cd.models.create(
        "cnn", channels=(32, 64, 128), num_classes=10, in_channels=1, img_size=28
    )
    return teacher, student


def plain_epoch(student, teacher, data, bs, device, kd: bool, T: float = 4.0) -> float:
    """The reference: what a user would write by hand. Returns the epoch loop's seconds."""
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    student.train()
    t0 = time.perf_counter()
    for batch in Batches(data, bs, seed=0).epoch(0):
        x, y = batch["x"].to(device), batch["y"].to(device)
        logits = student(x)
        loss = F.cross_entropy(logits, y)
        if kd:
            with torch.no_grad():
                t = teacher(x)
            loss = loss + 0.9 * T * T * F.kl_div(
                F.log_softmax(logits / T, 1), F.softmax(t / T, 1), reduction="batchmean"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def cd_epoch(student, teacher, data, bs, device, features: bool = False) -> float:
    """One epoch through the Trainer; returns its epoch loop's seconds (the trainer's own
    ``epoch_time``: the one-time dry run that builds projectors is not a per-step cost)."""
    terms = [cd.Term("ce"), cd.Term("kd", temperature=4.0, weight=0.9)]
    if features:
        terms += [
            cd.Term("mse", student="stage2", teacher="layer2", projector="auto", weight=1.0),
            cd.Term("mse", student="stage3", teacher="layer3", projector="auto", weight=1.0),
        ]
    d = cd.Distiller(student, teacher, terms)
    tr = cd.Trainer(
        d,
        data,
        epochs=1,
        batch_size=bs,
        lr=0.01,
        momentum=0.9,
        nesterov=False,
        weight_decay=0.0,
        schedule="constant",
        progress=False,
        device=device,
    )
    from crossdistill.train.console import quiet

    with quiet():  # no epoch lines between the benchmark's own
        tr.fit()
    return tr.log.rows[0]["epoch_time"]


def run_mode(mode: str, data, store_dir: Path, bs: int, device: str) -> float:
    teacher, student = models()
    teacher, student = teacher.to(device), student.to(device)
    if mode == "a_student_ce":
        return plain_epoch(student, teacher, data, bs, device, kd=False)
    if mode == "b_plain_kd":
        return plain_epoch(student, teacher, data, bs, device, kd=True)
    if mode == "c_cd_online_kd":
        return cd_epoch(student, teacher, data, bs, device)
    if mode == "d_cd_stored_kd":
        return cd_epoch(student, TeacherStore(store_dir), data, bs, device)
    return cd_epoch(student, teacher, data, bs, device, features=True)


def peak_memory(mode: str, args, store_dir: Path) -> float:
    """Peak memory (MiB) of one epoch of ``mode`` in a fresh process."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--store",
        str(store_dir),
        "--limit",
        str(args.limit),
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(args.threads),
        "--device",
        args.device,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def child(args) -> None:
    """Peak memory of one epoch above the process's baseline after loading the data: the
    peak-RSS counter is reset first (Linux ``clear_refs``), else ``ru_maxrss`` is used."""
    data, _ = load_data(args.limit)
    base = 0
    try:
        Path("/proc/self/clear_refs").write_text("5")
        base = _status_kib("VmRSS")
    except OSError:
        pass
    run_mode(args.child, data, Path(args.store), args.batch_size, args.device)
    if args.device.startswith("cuda"):
        print(torch.cuda.max_memory_allocated() / 2**20)
    elif base:
        print((_status_kib("VmHWM") - base) / 1024)
    else:
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


# -- the linear-model probe: per-step framework overhead ----------------------------------
def _probe_models(device: str):
    torch.manual_seed(0)
    teacher, student = torch.nn.Linear(64, 10).eval(), torch.nn.Linear(64, 10)
    return teacher.requires_grad_(False).to(device), student.to(device)


class _Clock:
    """Wall and this thread's CPU seconds of a block. With one thread the CPU time leaves
    out what other processes on a shared machine take, so it is the steadier figure."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        _sync(self.device)
        self.t0, self.c0 = time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *exc):
        _sync(self.device)
        self.wall, self.cpu = time.perf_counter() - self.t0, time.thread_time() - self.c0


def _probe_hand(data, bs, device, usual: bool, T: float = 4.0):
    """A hand-written CE + KD loop. ``usual``: the loop people write (mean-reduced CE and
    batchmean KL); otherwise exactly the maths crossdistill runs (per-sample values, CE
    averaged over the labelled samples, then ``ce + 0.9 * kd``), so the two trainings give
    bit-identical weights and their time difference is the framework alone."""
    teacher, student = _probe_models(device)
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    with _Clock(device) as clock:
        for batch in Batches(data, bs, seed=0).epoch(0):
            x, y = batch["x"].to(device), batch["y"].to(device)
            logits = student(x)
            with torch.no_grad():
                t = teacher(x)
            if usual:
                ce = F.cross_entropy(logits, y)
                log_p, p_t = F.log_softmax(logits / T, 1), F.softmax(t / T, 1)
                loss = ce + 0.9 * T * T * F.kl_div(log_p, p_t, reduction="batchmean")
            else:
                ce = F.cross_entropy(logits, y, ignore_index=-100, reduction="none")
                ok = y != -100
                ce = torch.where(ok, ce, 0.0).sum() / ok.sum().clamp_min(1)
                kl = F.kl_div(F.log_softmax(logits / T, -1), F.softmax(t / T, -1), reduction="none")
                loss = ce + 0.9 * (kl.sum(-1) * T**2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return clock, student


def _probe_cd(data, bs, device, trainer: bool):
    """The same step through crossdistill: a whole ``Trainer.train_epoch`` (its end-of-epoch
    row included, so the figure errs against crossdistill), or a Distiller in the user's
    own loop (forward, backward, SGD step). Set-up (the dry run) is not timed."""
    from crossdistill.train.console import quiet

    teacher, student = _probe_models(device)
    terms = [cd.Term("ce", weight=1.0), cd.Term("kd", temperature=4.0, weight=0.9)]
    d = cd.Distiller(student, teacher, terms)
    tr = cd.Trainer(
        d,
        data,
        epochs=1,
        batch_size=bs,
        lr=0.01,
        momentum=0.9,
        nesterov=False,
        weight_decay=0.0,
        schedule="constant",
        progress=False,
        device=device,
    ).setup()
    opt, batches = tr.opt, tr.batches
    with quiet(), _Clock(device) as clock:
        if trainer:
            tr.train_epoch(0)
        else:
            d.train()
            for batch in batches.epoch(0):
                out = d({k: v.to(device) for k, v in batch.items()})
                opt.zero_grad(set_to_none=True)
                out.total.backward()
                opt.step()
    return clock, student


def _probe_run(mode: str, data, bs: int, device: str):
    if mode.startswith("hand"):
        return _probe_hand(data, bs, device, usual=mode == "hand_usual")
    return _probe_cd(data, bs, device, trainer=mode == "cd_trainer")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def linear_probe(steps: int = 500, batch_size: int = 16, repeats: int = 7, device="cpu") -> dict:
    """Per-step overhead (ms) of crossdistill over a hand-written loop, with linear models:
    one epoch of ``steps`` steps per mode, the modes interleaved round-robin ``repeats``
    times after a warm-up round, medians compared (wall time and thread CPU time). Also
    checks that the same-maths hand loop and the Trainer end with bit-identical weights."""
    g = torch.Generator().manual_seed(0)
    n = steps * batch_size
    data = cd.data.Dataset.classification(
        torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)
    )
    wall = {m: [] for m in PROBE_MODES}
    cpu = {m: [] for m in PROBE_MODES}
    weights = {}
    for r in range(repeats + 1):
        for m in PROBE_MODES:
            clock, student = _probe_run(m, data, batch_size, device)
            if r:  # round 0 warms up
                wall[m].append(clock.wall)
                cpu[m].append(clock.cpu)
            weights[m] = [p.detach().cpu() for p in student.parameters()]

    def per_step(times):
        return {m: 1e3 * statistics.median(v) / steps for m, v in times.items()}

    def overheads(ms):
        return {
            "trainer_vs_hand": ms["cd_trainer"] - ms["hand_same_maths"],
            "own_loop_vs_hand": ms["cd_own_loop"] - ms["hand_same_maths"],
            "trainer_vs_usual_hand": ms["cd_trainer"] - ms["hand_usual"],
        }

    ms, cpu_ms = per_step(wall), per_step(cpu)
    same = all(
        torch.equal(a, b) for a, b in zip(weights["hand_same_maths"], weights["cd_trainer"])
    )
    return {
        "steps": steps,
        "batch_size": batch_size,
        "repeats": repeats,
        "models": "nn.Linear(64, 10) student and teacher; CE + KD (T=4, weight 0.9); SGD",
        "ms_per_step": ms,
        "cpu_ms_per_step": cpu_ms,
        "all_seconds": wall,
        "all_cpu_seconds": cpu,
        "overhead_ms_per_step": overheads(ms),
        "cpu_overhead_ms_per_step": overheads(cpu_ms),
        "same_weights_hand_and_trainer": same,
        "target_ms": PROBE_TARGET_MS,
    }


def print_probe(res: dict) -> None:
    ms, cpu = res["ms_per_step"], res["cpu_ms_per_step"]
    labels = {
        "hand_same_maths": "(p) hand-written loop, crossdistill's maths",
        "hand_usual": "(q) hand-written loop, usual maths (mean CE, batchmean KL)",
        "cd_own_loop": "(r) Distiller in your own loop",
        "cd_trainer": "(s) Trainer.train_epoch",
    }
    rows = [(labels[m], f"{ms[m]:.4f}", f"{cpu[m]:.4f}") for m in ms]
    print(cd.report.format_table(["linear probe", "ms/step wall", "ms/step CPU"], rows))
    for kind, key in (("wall", "overhead_ms_per_step"), ("CPU", "cpu_overhead_ms_per_step")):
        over = res[key]
        print(
            f"per-step overhead ({kind}): s-p = {over['trainer_vs_hand']:.3f} ms "
            f"(target <= {res['target_ms']}), r-p = {over['own_loop_vs_hand']:.3f} ms, "
            f"s-q = {over['trainer_vs_usual_hand']:.3f} ms"
        )
    print(f"p and s end with bit-identical weights: {res['same_weights_hand_and_trainer']}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--limit", type=int, default=3000, help="training samples per epoch")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--results", help="default benchmarks/results/speed[_linear].json")
    p.add_argument("--linear-only", action="store_true", help="run only the linear probe")
    p.add_argument("--probe-steps", type=int, default=1000, help="steps per probe epoch")
    p.add_argument("--probe-repeats", type=int, default=15, help="interleaved rounds (medians)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
    name = "speed_linear.json" if args.linear_only else "speed.json"
    args.results = args.results or f"benchmarks/results/{name}"
    probe = linear_probe(args.probe_steps, repeats=args.probe_repeats, device=args.device)
    if args.linear_only:
        meta = {"device": args.device, "threads": args.threads, "torch": torch.__version__}
        probe = {**meta, **probe}
        print_probe(probe)
        return _write(args.results, probe)
    data, data_name = load_data(args.limit)
    tmp = Path(tempfile.mkdtemp(prefix="cd-speed-"))
    teacher, _ = models()
    cache_teacher(teacher, data, tmp / "store", progress=False)
    torch.manual_seed(0)
    big = cd.models.create(
        "resnet", depth=20, width=1, num_classes=100, in_channels=1, img_size=28
    ).eval()
    cache_teacher(big, data.subset(torch.arange(256)), tmp / "store100", topk=8, progress=False)
    bytes100 = TeacherStore(tmp / "store100").manifest
    times = {m: [] for m in MODES}
    run_mode("a_student_ce", data, tmp / "store", args.batch_size, args.device)  # warm-up
    for r in range(args.repeats):
        for m in MODES:
            times[m].append(run_mode(m, data, tmp / "store", args.batch_size, args.device))
        print(
            f"repeat {r + 1}/{args.repeats}: "
            + ", ".join(f"{m[0]} {times[m][-1]:.2f}s" for m in MODES),
            flush=True,
        )
    med = {m: statistics.median(v) for m, v in times.items()}
    sps = {m: len(data) / med[m] for m in MODES}
    mem = {m: peak_memory(m, args, tmp / "store") for m in MODES}
    store_bytes = TeacherStore(tmp / "store").manifest
    res = {
        "device": args.device,
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "data": data_name,
        "samples_per_epoch": len(data),
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "teacher": "resnet20 (272k params)",
        "student": "cnn (32,64,128)",
        "median_seconds": med,
        "all_seconds": times,
        "samples_per_second": sps,
        "peak_memory_mib": mem,
        "ratio_c_over_b": sps["c_cd_online_kd"] / sps["b_plain_kd"],
        "ratio_d_over_a": sps["d_cd_stored_kd"] / sps["a_student_ce"],
        "store_bytes_per_sample_10cls_fp16": store_bytes["bytes_per_sample"],
        "store_bytes_per_sample_top8_of_100": bytes100["bytes_per_sample"],
        "store_bytes_per_sample_top8_of_100_without_id": bytes100["bytes_per_sample_signals"],
        "targets": {"c/b": 0.97, "d/a": 0.95, "top8_of_100_bytes": 40},
        "linear_probe": probe,
    }
    rows = [(m, f"{sps[m]:.0f}", f"{med[m]:.3f}", f"{mem[m]:.1f}") for m in MODES]
    print(
        cd.report.format_table(
            ["mode", "samples/s", "median s/epoch", "peak MiB above baseline"], rows
        )
    )
    print(
        f"c/b = {res['ratio_c_over_b']:.3f} (target >= 0.97)   "
        f"d/a = {res['ratio_d_over_a']:.3f} (target >= 0.95)"
    )
    print(
        f"store bytes/sample: top-8 of 100 classes = {res['store_bytes_per_sample_top8_of_100']}"
        f" (target <= 40); 10-class fp16 = {res['store_bytes_per_sample_10cls_fp16']}"
    )
    print_probe(probe)
    return _write(args.results, res)


def _write(path: str, res: dict) -> dict:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(res, indent=2))
    print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main()
