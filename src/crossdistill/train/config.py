"""Training settings: one dataclass, mirrored one to one by the YAML schema in ``config.py``."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "sgd"  # "sgd" | "adamw"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # "cosine" | "step" | "constant"
    warmup_epochs: float = 0.0
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    grad_clip: float | None = None
    accumulate: int = 1
    amp: bool = False
    seed: int = 0
    device: str = "cpu"
    checkpoint_every: int = 0  # optimizer steps between mid-epoch checkpoints; 0 = epoch ends
    augment_shift: int = 0
    augment_flip: bool = False
    eval_batch_size: int = 512
    num_workers: int = 0  # DataLoader workers for map-style datasets
    progress: bool = True
    strategy: str = "ddp"  # under torchrun: "ddp" | "fsdp"
    find_unused: bool = False  # DDP find_unused_parameters
    deterministic: bool = False  # deterministic kernels (needed for exact resume on CUDA)
    extra: dict = field(default_factory=dict)
