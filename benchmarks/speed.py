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

    python benchmarks/speed.py [--device cpu] [--threads 1] [--repeats 5]
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


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--limit", type=int, default=3000, help="training samples per epoch")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--results", default="benchmarks/results/speed.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
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
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(res, indent=2))
    print(f"wrote {args.results}")
    return res


if __name__ == "__main__":
    main()
