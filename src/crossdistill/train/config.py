"""Training settings: one dataclass, the single source of the YAML ``train:`` section.

``config.TrainSpec`` is derived from these fields (types, ranges, defaults, descriptions),
so a setting is declared once. Fields in :data:`FROM_DATA` come from the ``data:`` section.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import Field

from ..schema import MAX_FLOAT, MAX_SEED

FROM_DATA = ("batch_size", "augment_shift", "augment_flip", "extra")


@dataclass
class TrainConfig:
    epochs: Annotated[int, Field(ge=1, le=100_000, description="passes over the train split")] = (
        10
    )
    batch_size: Annotated[int, Field(ge=1, le=65_536)] = 64
    optimizer: Annotated[
        Literal["sgd", "adamw"],
        Field(description="SGD (momentum, Nesterov by default) or AdamW"),
    ] = "sgd"
    lr: Annotated[
        float,
        Field(gt=0, le=MAX_FLOAT, description="peak learning rate (after warm-up); 0.05 suits "
              "SGD at batch 64, AdamW usually wants 1e-3"),
    ] = 0.05
    momentum: Annotated[float, Field(ge=0, lt=1, description="SGD momentum")] = 0.9
    nesterov: Annotated[
        bool, Field(description="Nesterov momentum for SGD (on by default; off when momentum 0)")
    ] = True
    weight_decay: Annotated[float, Field(ge=0, le=10, description="L2 / decoupled decay")] = 5e-4
    schedule: Annotated[
        Literal["cosine", "step", "constant"],
        Field(description="lr decay after warm-up; cosine is updated every optimizer step"),
    ] = "cosine"
    schedule_unit: Annotated[
        Literal["step", "epoch"],
        Field(description="'step': the schedule moves every optimizer step; 'epoch': it holds "
              "its value through each epoch (warm-up stays per step)"),
    ] = "step"
    min_lr: Annotated[
        float, Field(ge=0, le=MAX_FLOAT, description="floor of the cosine and step schedules")
    ] = 0.0
    warmup_epochs: Annotated[
        float,
        Field(ge=0, le=100_000, description="linear warm-up from 0, in epochs (fractions ok)"),
    ] = 0.0
    milestones: Annotated[
        tuple[Annotated[float, Field(ge=0, le=1)], ...],
        Field(max_length=100, description="step schedule: fractions of training where lr *= gamma"),
    ] = (0.5, 0.75)
    gamma: Annotated[float, Field(gt=0, le=1, description="step schedule decay factor")] = 0.1
    grad_clip: Annotated[
        float | None,
        Field(gt=0, le=MAX_FLOAT, description="clip the global gradient norm to this; null = off"),
    ] = None
    accumulate: Annotated[
        int, Field(ge=1, le=1024, description="micro-batches summed per optimizer step")
    ] = 1
    amp: Annotated[
        bool, Field(description="autocast (bf16, or fp16 with a grad scaler on older GPUs)")
    ] = False
    seed: Annotated[
        int, Field(ge=0, le=MAX_SEED, description="seeds models, projectors and data order")
    ] = 0
    device: Annotated[
        str,
        Field(max_length=32, description="cpu, cuda, cuda:N or mps; checked against this torch"),
    ] = "cpu"
    checkpoint_every: Annotated[
        int,
        Field(ge=0, le=10**9, description="optimizer steps between mid-epoch checkpoints "
              "(last.ckpt); 0 = at epoch ends only"),
    ] = 0
    augment_shift: Annotated[int, Field(ge=0, le=8)] = 0
    augment_flip: bool = False
    eval_batch_size: Annotated[
        int, Field(ge=1, le=65_536, description="batch size of validation and test passes")
    ] = 512
    num_workers: Annotated[
        int, Field(ge=0, le=64, description="DataLoader workers for map-style datasets")
    ] = 0
    precise_bn: Annotated[
        int,
        Field(ge=0, le=10**7, description="train samples (a fixed seeded draw) on which every "
              "BatchNorm's statistics are recomputed before each validation (precise BN: an "
              "epoch-to-epoch steady val metric); 0 = off"),
    ] = 0
    progress: Annotated[bool, Field(description="progress bars")] = True
    strategy: Annotated[
        Literal["ddp", "fsdp"], Field(description="multi-process strategy under --nproc / torchrun")
    ] = "ddp"
    find_unused: Annotated[bool, Field(description="DDP find_unused_parameters")] = False
    deterministic: Annotated[
        bool,
        Field(description="deterministic kernels (CPU runs are already; needed for exact resume "
              "on CUDA)"),
    ] = False
    nan: Annotated[
        Literal["error", "skip"],
        Field(description="a NaN/inf loss or gradient: 'error' stops naming the term and step; "
              "'skip' skips that step and counts it"),
    ] = "error"
    log: Annotated[
        list[Literal["tensorboard"]],
        Field(max_length=1, description="extra loggers: [tensorboard] writes RUN_DIR/tb "
              "(pip install crossdistill[tensorboard])"),
    ] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
