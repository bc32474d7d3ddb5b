"""Tiny valid configs, one per config surface, and the files they need (fixtures).

Every path in a base is relative to the case directory, where ``fx`` links to the fixtures
built once per session (a trained teacher, a teacher store, a small MNIST copy, ...), so a
case's files and arguments never depend on the temporary directory's name.
"""

from __future__ import annotations

import copy
import gzip
import struct
from pathlib import Path

import numpy as np

TRAIN = {"epochs": 1, "optimizer": "sgd", "lr": 0.05, "progress": False}
DIGITS = {"name": "digits", "batch_size": 128}
TEACHER = {"model": "cnn", "channels": [8, 16, 16], "checkpoint": "fx/teacher/student.safetensors"}
GPT2 = {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 32}
LM_DATA = {
    "name": "shakespeare",
    "batch_size": 32,
    "params": {"tokenizer": "char", "block": 32, "max_chars": 20000},
}
SEG_DATA = {
    "name": "canvas",
    "batch_size": 16,
    "params": {"n": {"train": 32, "val": 16, "test": 16}, "size": 32, "max_digits": 1},
}
AV_DATA = {
    "name": "av",
    "batch_size": 32,
    "params": {"limit": {"train": 64, "val": 32, "test": 32}},
}
ADAMW = {**TRAIN, "optimizer": "adamw", "lr": 0.003}

# surface -> (command, config). ``train/*`` run ``crossdistill train``.
BASES: dict[str, tuple[str, dict]] = {
    "train/digits": (
        "train",
        {
            "student": {"model": "mlp", "hidden": [16]},
            "data": DIGITS,
            "terms": [{"loss": "ce"}],
            "train": TRAIN,
        },
    ),
    "train/digits-cnn": (
        "train",
        {
            "name": "cnn_digits",
            "student": {"model": "cnn", "channels": [8, 8]},
            "data": {**DIGITS, "augment": {"shift": 1}},
            "terms": [{"loss": "ce", "label_smoothing": 0.1}],
            "train": {**TRAIN, "warmup_epochs": 0.5, "grad_clip": 5.0, "schedule": "step"},
        },
    ),
    "train/kd": (
        "train",
        {
            "teacher": TEACHER,
            "student": {"model": "mlp", "hidden": [16]},
            "data": DIGITS,
            "terms": [
                {"loss": "ce"},
                {"loss": "kd", "temperature": 4.0, "weight": 0.9},
                {
                    "loss": "mse",
                    "student": "layers.0",
                    "teacher": "flatten",
                    "projector": "auto",
                    "weight": 1.0,
                },
            ],
            "train": TRAIN,
        },
    ),
    "train/kd-vit": (
        "train",
        {
            "teacher": TEACHER,
            "student": {"model": "vit", "patch": 4, "dim": 8, "depth": 1, "heads": 2},
            "data": DIGITS,
            "terms": [
                {"loss": "ce"},
                {"loss": "dkd", "alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup": 1},
                {
                    "loss": "mse",
                    "student": "blocks.0",
                    "teacher": "stage3",
                    "projector": "auto",
                    "weight": 1.0,
                },
            ],
            "train": {**ADAMW, "weight_decay": 0.05},
        },
    ),
    "train/method": (
        "train",
        {
            "teacher": TEACHER,
            "student": {"model": "mlp", "hidden": [16]},
            "data": DIGITS,
            "method": {"name": "dkd"},
            "train": TRAIN,
        },
    ),
    "train/store": (
        "train",
        {
            "teacher": {"store": "fx/store"},
            "student": {"model": "mlp", "hidden": [16]},
            "data": DIGITS,
            "terms": [{"loss": "ce"}, {"loss": "kd", "temperature": 2.0, "weight": 1.0}],
            "train": TRAIN,
        },
    ),
    "train/mnist": (
        "train",
        {
            "student": {"model": "mlp", "hidden": [16]},
            "data": {"name": "mnist", "root": "fx/mnist", "batch_size": 64},
            "train": TRAIN,
        },
    ),
    "train/lm": (
        "train",
        {
            "student": {"hf": "gpt2", "config": GPT2, "inputs": {"input_ids": "input_ids"}},
            "data": LM_DATA,
            "train": ADAMW,
        },
    ),
    "train/lm-kd": (
        "train",
        {
            "teacher": {
                "hf": "gpt2",
                "config": GPT2,
                "inputs": {"input_ids": "input_ids"},
                "checkpoint": "fx/lm_teacher/student.safetensors",
            },
            "student": {"hf": "gpt2", "config": GPT2, "inputs": {"input_ids": "input_ids"}},
            "data": LM_DATA,
            "terms": [
                {"loss": "ce"},
                {"loss": "kd", "temperature": 1.0, "weight": 1.0},
                {
                    "loss": "mse",
                    "student": "output.hidden_states[-1]",
                    "teacher": "output.hidden_states[-1]",
                    "projector": "auto",
                    "weight": 1.0,
                },
            ],
            "train": ADAMW,
        },
    ),
    "train/seg": (
        "train",
        {"student": {"model": "seg-cnn", "width": 4}, "data": SEG_DATA, "train": ADAMW},
    ),
    "train/seg-kd": (
        "train",
        {
            "teacher": {
                "model": "seg-cnn",
                "width": 4,
                "checkpoint": "fx/seg_teacher/student.safetensors",
            },
            "student": {"model": "seg-cnn", "width": 4},
            "data": SEG_DATA,
            "terms": [
                {"loss": "ce"},
                {"loss": "kd", "temperature": 2.0, "weight": 1.0},
                {"loss": "mse", "student": "dec2", "teacher": "dec2", "projector": "auto"},
            ],
            "train": ADAMW,
        },
    ),
    "train/av": (
        "train",
        {
            "student": {
                "model": "audio-cnn",
                "img_size": [40, 48],
                "channels": [8, 8],
                "inputs": ["audio"],
            },
            "data": AV_DATA,
            "train": ADAMW,
        },
    ),
    "train/av-kd": (
        "train",
        {
            "teacher": {
                "model": "audio-cnn",
                "img_size": [40, 48],
                "channels": [8, 8],
                "inputs": ["audio"],
                "checkpoint": "fx/av_teacher/student.safetensors",
            },
            "student": {"model": "cnn", "channels": [8, 8], "inputs": ["image"]},
            "data": AV_DATA,
            "terms": [{"loss": "ce"}, {"loss": "kd", "temperature": 4.0, "weight": 0.9}],
            "train": ADAMW,
        },
    ),
    "condense": (
        "condense",
        {
            "method": "dm",
            "ipc": 1,
            "data": {"name": "digits"},
            "iterations": 2,
            "seed": 0,
            "net_kw": {"width": 8, "depth": 1},
            "batch_real": 16,
            "eval": {"archs": ["convnet"], "n_models": 1},
        },
    ),
    "cache-teacher": (
        "cache-teacher",
        {
            "teacher": TEACHER,
            "student": {"model": "mlp", "hidden": [16]},
            "data": DIGITS,
            "terms": [
                {"loss": "ce"},
                {"loss": "kd", "temperature": 4.0},
                {"loss": "mse", "student": "layers.0", "teacher": "flatten", "projector": "auto"},
            ],
            "train": TRAIN,
        },
    ),
}


def base(surface: str) -> tuple[str, dict]:
    cmd, cfg = BASES[surface]
    return cmd, copy.deepcopy(cfg)


# -- fixtures: built once per session under WORKDIR/fx by running the CLI ----------------------
# name -> (argv run with cwd = WORKDIR, config written to fx/cfg/<name>.yaml, needs)
FIXTURE_RUNS: dict[str, tuple[list[str], dict | None, tuple[str, ...]]] = {
    "teacher": (
        ["train", "fx/cfg/teacher.yaml", "--out", "fx/teacher"],
        {
            "student": {k: v for k, v in TEACHER.items() if k != "checkpoint"},
            "data": DIGITS,
            "terms": [{"loss": "ce"}],
            "train": TRAIN,
        },
        (),
    ),
    "store": (
        ["cache-teacher", "fx/cfg/store.yaml", "--out", "fx/store"],
        {
            "teacher": TEACHER,
            "student": {"model": "mlp", "hidden": [16]},
            "data": DIGITS,
            "terms": [{"loss": "kd"}],
            "train": TRAIN,
        },
        ("teacher",),
    ),
    "lm_teacher": (
        ["train", "fx/cfg/lm_teacher.yaml", "--out", "fx/lm_teacher"],
        BASES["train/lm"][1],
        (),
    ),
    "seg_teacher": (
        ["train", "fx/cfg/seg_teacher.yaml", "--out", "fx/seg_teacher"],
        BASES["train/seg"][1],
        (),
    ),
    "av_teacher": (
        ["train", "fx/cfg/av_teacher.yaml", "--out", "fx/av_teacher"],
        BASES["train/av"][1],
        (),
    ),
}


def fixtures_of(surface: str) -> tuple[str, ...]:
    """The fixtures a surface's base config reads."""
    need = {
        "train/kd": ("teacher",),
        "train/kd-vit": ("teacher",),
        "train/method": ("teacher",),
        "train/store": ("teacher", "store"),
        "cache-teacher": ("teacher",),
        "train/mnist": ("mnist",),
        "train/lm-kd": ("lm_teacher",),
        "train/seg-kd": ("seg_teacher",),
        "train/av-kd": ("av_teacher",),
    }
    return need.get(surface, ())


def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    """An IDX file (LeCun's MNIST format) holding ``arr`` (uint8)."""
    head = bytes([0, 0, code, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def write_mnist(root: Path, n: int = 300, seed: int = 0) -> None:
    """A small, valid MNIST-format copy (gzip IDX): blobs whose position encodes the class."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 10
    x = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
    for i, c in enumerate(y):
        r, col = 2 + (c // 5) * 12, 2 + (c % 5) * 5
        x[i, r : r + 10, col : col + 4] = 255
    root.mkdir(parents=True, exist_ok=True)
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(x), mtime=0))
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(y), mtime=0))
