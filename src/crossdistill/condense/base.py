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

    def __init__(
        self,
        *,
        ipc: int,
        num_classes: int,
        input_shape: tuple[int, ...],
        device: str | torch.device = "cpu",
        seed: int = 0,
        iterations: int = 1000,
        init: str = "real",
    ):
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
        return SyntheticSet(
            self.x_syn.detach().cpu().clone(),
            self.y_syn.cpu().clone(),
            meta={"method": self.name, "ipc": self.ipc},
        )


# ---------------------------------------------------------------------------------------------
# Compatible extensions (issue 6A): peak-memory meter and the shared machinery of the matching
# condensers (DC/DSA, DM, MTT, NCFM; FYI is a flag of each).
# ---------------------------------------------------------------------------------------------


class MemoryMeter:
    """Peak memory of a block of work, in MiB, and how it was measured (``meter.how``).

    On CUDA: ``torch.cuda.max_memory_allocated`` (reset at entry). On Linux CPU: the process's
    peak resident set size (``VmHWM`` in /proc/self/status), reset at entry by writing 5 to
    /proc/self/clear_refs; this counts Python, torch tensors and everything else the process
    holds, so it includes the loaded dataset. Elsewhere: ``resource.getrusage`` ru_maxrss
    (the whole process lifetime's peak, not resettable).
    """

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.peak_mib: float | None = None
        self.how = ""

    @staticmethod
    def _vmhwm() -> float | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def __enter__(self) -> MemoryMeter:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.how = "torch.cuda.max_memory_allocated"
            return self
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.how = "peak RSS (Linux VmHWM, reset at start; whole process)"
        except OSError:
            self.how = "peak RSS (ru_maxrss; whole process, lifetime peak)"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.how.startswith("peak RSS (Linux"):
            self.peak_mib = self._vmhwm()
        if self.peak_mib is None:
            import resource
            import sys

            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.peak_mib = rss / 2**20 if sys.platform == "darwin" else rss / 1024


def seeded_model(name: str, seed: int, *, num_classes: int, input_shape, device="cpu", **kw):
    """A fresh model from the zoo whose initialisation depends only on ``seed`` (the global
    RNG state outside is left untouched)."""
    from .. import models

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = models.create(
            name,
            num_classes=num_classes,
            in_channels=input_shape[0],
            img_size=tuple(input_shape[1:]),
            **kw,
        )
    return net.to(device)


class MatchingCondenser(Condenser):
    """Shared machinery of the matching condensers.

    Hyper-parameters common to all: ``net``/``net_kw`` (the network family used inside the
    matching loss; default the ConvNet-3 of the literature), ``dsa`` (siamese augmentation,
    see augment.py) with ``dsa_strategy``, ``fyi`` (FYI's ``S ∪ hflip(S)`` inside the loss,
    see fyi.py), ``batch_real`` (real images per class per step), ``lr_img``/``momentum_img``
    (SGD on the pixels unless a subclass says otherwise).
    """

    optimizer_img = "sgd"

    def __init__(
        self,
        *,
        net: str = "convnet",
        net_kw: dict | None = None,
        dsa: bool = True,
        dsa_strategy: str = "color_crop_cutout_flip_scale_rotate",
        fyi: bool = False,
        batch_real: int = 256,
        lr_img: float = 1.0,
        momentum_img: float = 0.5,
        **base,
    ):
        super().__init__(**base)
        from ..registry import MODELS
        from .augment import DSA

        MODELS.get(net, "condense.net")
        for k, v in (("batch_real", batch_real), ("lr_img", lr_img)):
            if not v > 0:
                raise ConfigError(f"condense.{k}", v, "must be > 0")
        self.net_name, self.net_kw = net, dict(net_kw or {})
        self.dsa = DSA(dsa_strategy, shared=True) if dsa else None
        self.dsa_strategy = dsa_strategy if dsa else None
        self.fyi, self.batch_real = fyi, batch_real
        self.lr_img, self.momentum_img = lr_img, momentum_img
        self._nets = 0

    def new_net(self) -> torch.nn.Module:
        """A freshly initialised network; the k-th one depends only on (seed, k)."""
        self._nets += 1
        return seeded_model(
            self.net_name,
            self.seed * 1_000_003 + self._nets,
            num_classes=self.num_classes,
            input_shape=self.input_shape,
            device=self.device,
            **self.net_kw,
        )

    def init(self, real: RealSampler) -> None:
        super().init(real)
        if self.optimizer_img == "adam":
            self.opt_img = torch.optim.Adam([self.x_syn], lr=self.lr_img)
        else:
            self.opt_img = torch.optim.SGD([self.x_syn], lr=self.lr_img, momentum=self.momentum_img)

    def class_syn(self, c: int) -> torch.Tensor:
        """Synthetic images of class ``c`` as the loss sees them (with FYI: S_c ∪ hflip(S_c))."""
        from .augment import hflip_union

        s = self.x_syn[c * self.ipc : (c + 1) * self.ipc]
        return hflip_union(s) if self.fyi else s

    def siamese(self, real: torch.Tensor, syn: torch.Tensor):
        """The same DSA draw applied to the real and the synthetic batch (identity if off)."""
        if self.dsa is None:
            return real, syn
        p = self.dsa.sample(real, self.gen)
        return self.dsa.apply(real, p), self.dsa.apply(syn, p)

    def synthetic(self) -> SyntheticSet:
        s = super().synthetic()
        s.meta.update(net=self.net_name, net_kw=self.net_kw, dsa=self.dsa_strategy, fyi=self.fyi)
        return s
