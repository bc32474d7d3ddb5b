"""The condenser API: learn a small synthetic training set instead of a student.

A :class:`Condenser` is initialised from real data (``init``), improved one outer iteration
at a time (``step``) and read out as a :class:`SyntheticSet` (``synthetic``). The evaluation
harness (``harness.py``) judges every condenser the same way: fresh models trained on the
synthetic set only, hyper-parameters fixed in advance or chosen on the validation split.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import Dataset
from ..errors import ConfigError
from ..io import load_weights, save_weights


@dataclass
class SyntheticSet:
    """A condensed training set.

    ``x`` (N, C, H, W) images in the real data's normalised space; ``y`` (N,) hard labels;
    ``soft`` optional (N, K) soft-label *logits* stored per image (learned labels, or a
    teacher's); ``relabel`` optional callable ``x_batch -> logits (B, K)`` giving
    batch-specific soft labels at evaluation time (CV-DD's BSSL, INFER's ensemble); models
    trained with ``soft`` or ``relabel`` use KL at ``temperature``. ``meta`` records method,
    ipc, synthesis seconds, peak memory and ``stored_numbers`` (label storage per image).
    """

    x: torch.Tensor
    y: torch.Tensor
    soft: torch.Tensor | None = None
    relabel: Callable[[torch.Tensor], torch.Tensor] | None = None
    temperature: float = 1.0
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.y)

    def save(self, path: str | os.PathLike) -> Path:
        """Safetensors (x, y, soft) + a JSON sidecar with ``meta`` and ``temperature``.
        ``relabel`` is code, not data: it is not saved (record in meta how to rebuild it)."""
        path = Path(path)
        tensors = {"x": self.x, "y": self.y}
        if self.soft is not None:
            tensors["soft"] = self.soft
        save_weights(tensors, path)
        meta = {**self.meta, "temperature": self.temperature}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2, default=str))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> SyntheticSet:
        path = Path(path)
        t = load_weights(path, "synthetic")
        if "x" not in t or "y" not in t:
            raise ConfigError("synthetic", str(path), "a synthetic set file with x and y tensors")
        meta_path = path.with_suffix(".json")
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        return cls(t["x"], t["y"].long(), t.get("soft"), None, meta.pop("temperature", 1.0), meta)


class RealSampler:
    """Seeded access to the real training split, by class (what matching methods need)."""

    def __init__(self, data: Dataset, seed: int = 0, device: str | torch.device = "cpu"):
        labelled = data.y >= 0
        self.x, self.y = data.x[labelled].to(device), data.y[labelled].to(device)
        self.num_classes = data.num_classes
        self.by_class = [torch.nonzero(self.y == c).flatten() for c in range(self.num_classes)]
        self.gen = torch.Generator().manual_seed(seed)

    def class_batch(self, c: int, n: int) -> torch.Tensor:
        ids = self.by_class[c]
        pick = torch.randperm(len(ids), generator=self.gen)[:n]
        return self.x[ids[pick.to(ids.device)]]

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        pick = torch.randperm(len(self.y), generator=self.gen)[:n].to(self.y.device)
        return self.x[pick], self.y[pick]


class Condenser:
    """Base class. Subclasses set ``name``, implement ``step`` and usually ``init``.

    Constructor arguments every condenser takes: ``ipc`` (images per class), ``num_classes``,
    ``input_shape`` (C, H, W), ``device``, ``seed``, ``iterations`` (outer steps the harness
    runs), plus method hyper-parameters as keyword arguments with the papers' defaults.
    """

    name = "base"

    def __init__(self, *, ipc: int, num_classes: int, input_shape: tuple[int, ...],
                 device: str | torch.device = "cpu", seed: int = 0, iterations: int = 1000,
                 init: str = "real"):
        if ipc < 1:
            raise ConfigError("condense.ipc", ipc, "must be >= 1")
        if init not in ("real", "noise"):
            raise ConfigError("condense.init", init, "allowed: 'real' or 'noise'")
        self.ipc, self.num_classes, self.input_shape = ipc, num_classes, tuple(input_shape)
        self.device, self.seed, self.iterations, self.init_mode = device, seed, iterations, init
        self.gen = torch.Generator().manual_seed(seed)
        self.x_syn: torch.Tensor | None = None
        self.y_syn = torch.arange(num_classes).repeat_interleave(ipc).to(device)

    def init(self, real: RealSampler) -> None:
        """Synthetic images from random real images of each class (or Gaussian noise)."""
        if self.init_mode == "real":
            x = torch.cat([real.class_batch(c, self.ipc) for c in range(self.num_classes)])
            if len(x) < self.ipc * self.num_classes:
                raise ConfigError("condense.ipc", self.ipc, "more than some class has samples")
        else:
            x = torch.randn(self.ipc * self.num_classes, *self.input_shape, generator=self.gen)
        self.x_syn = x.detach().clone().to(self.device).requires_grad_(True)

    def step(self, real: RealSampler, it: int) -> dict[str, float]:
        raise NotImplementedError

    def synthetic(self) -> SyntheticSet:
        return SyntheticSet(self.x_syn.detach().cpu().clone(), self.y_syn.cpu().clone(),
                            meta={"method": self.name, "ipc": self.ipc})
