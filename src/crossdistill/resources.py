"""Resource checks before any data is read or model built: the device, the data's size and
the models' training memory against what this machine has, each refused with the figure and
the limit.

Estimates, deliberately simple: data = samples x input size x 4 bytes; a model's training
memory = parameters x 4 bytes x 4 (weights, gradients, two optimiser moments) + activations
of one batch x 4 bytes x 2 (kept for backward, and their gradients). Parameters and
activations come from building the zoo model on the ``meta`` device (no memory, no compute)
and one forward with hooks summing output sizes. Available memory is ``MemAvailable`` of
``/proc/meminfo``, or the free memory of the CUDA device.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .errors import ConfigError

FLOAT = 4  # bytes per value
TRAIN_FACTOR = 4  # weights + grads + two optimiser moments
ACT_FACTOR = 2  # activations kept for backward + their gradients
MAX_PARAMS = 2_000_000_000


def devices_here() -> list[str]:
    """The device names this torch can use here."""
    out = ["cpu"]
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        out += ["cuda"] + [f"cuda:{i}" for i in range(n)]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def check_device(device: str, field: str = "train.device") -> torch.device:
    """``device`` if this torch can run on it here, else one ConfigError listing what can."""
    here = devices_here()
    if not isinstance(device, str) or device.strip() not in here:
        raise ConfigError(field, device, f"not available here; available: {', '.join(here)}")
    return torch.device(device.strip())


def available_bytes(device: torch.device) -> int | None:
    """Free memory where the run's tensors live (None when it cannot be read)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def _samples(cfg) -> int:
    from .registry import DATASETS

    sizes = DATASETS.meta(cfg.data.name).get("sizes") or {}
    return int(sum(sizes.values()))


def _input_shape(spec, cfg) -> tuple[int, ...] | None:
    """(C, H, W) a zoo model will see, from the config alone (the data is not read yet)."""
    import inspect

    from .models import MODELS

    params = inspect.signature(MODELS.get(spec.model)).parameters
    kw = spec.kwargs()

    def arg(name, default=None):
        if name in kw:
            return kw[name]
        p = params.get(name)
        return default if p is None or p.default is inspect.Parameter.empty else p.default

    size = cfg.data.img_size or arg("img_size")
    c = arg("in_channels", 1)
    if size is None:
        return None
    hw = (size, size) if isinstance(size, int) else tuple(size)
    return (int(c), *map(int, hw)) if len(hw) == 2 else None


def model_figures(spec, cfg) -> tuple[int, int]:
    """(parameters, activation values for one batch) of a zoo model, built on ``meta``."""
    from .models import create

    kw = dict(spec.kwargs())
    if cfg.data.img_size is not None:
        kw.setdefault("img_size", cfg.data.img_size)
    with torch.device("meta"):
        try:
            model = create(spec.model, field="model", **kw)
        except (ConfigError, TypeError, ValueError, RuntimeError):
            return 0, 0  # the real build reports it with its own message
    params = sum(p.numel() for p in model.parameters())
    shape = _input_shape(spec, cfg)
    if shape is None or params > MAX_PARAMS:
        return params, 0
    total = [0]

    def add(_m, _i, out):
        if isinstance(out, torch.Tensor):
            total[0] += out.numel()

    hooks = [m.register_forward_hook(add) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(torch.empty(cfg.data.batch_size, *shape, device="meta"))
    except Exception:  # noqa: BLE001  (inputs that are not one image tensor: no estimate)
        total[0] = 0
    finally:
        for h in hooks:
            h.remove()
    return params, total[0]


def check(cfg, limit: int | None = None, field_device: str = "train.device") -> dict:
    """Refuse a run this machine cannot hold; returns the figures. ``limit`` (bytes) replaces
    the machine's available memory (tests)."""
    device = check_device(cfg.train.device, field_device)
    avail = limit if limit is not None else available_bytes(device)
    figures = {"data_bytes": 0, "params": {}, "train_bytes": 0, "available": avail}
    if cfg.data.img_size is not None:
        n = _samples(cfg)
        figures["data_bytes"] = n * cfg.data.img_size**2 * FLOAT
        if avail is not None and figures["data_bytes"] > avail:
            raise ConfigError(
                "data.img_size",
                cfg.data.img_size,
                f"{n:,} samples at {cfg.data.img_size}x{cfg.data.img_size} need at least "
                f"{_gib(figures['data_bytes'])} of memory; {_gib(avail)} available",
            )
    need = figures["data_bytes"] if device.type == "cpu" else 0
    specs = [("student", cfg.student), ("teacher", cfg.teacher)]
    specs += [(f"teachers.{k}", v) for k, v in (cfg.teachers or {}).items()]
    for field, spec in specs:
        if spec is None or not spec.model or getattr(spec, "store", None):
            continue
        params, acts = model_figures(spec, cfg)
        figures["params"][field] = params
        if params > MAX_PARAMS:
            raise ConfigError(
                field, spec.model, f"{params:,} parameters; at most {MAX_PARAMS:,}"
            )
        train = field == "student"
        need += params * FLOAT * (TRAIN_FACTOR if train else 1)
        need += acts * FLOAT * (ACT_FACTOR if train else 1)
    figures["train_bytes"] = need
    if avail is not None and need > avail:
        raise ConfigError(
            "config",
            _gib(need),
            f"the run needs about {_gib(need)} of memory (models, gradients, optimiser state "
            f"and one batch of activations); {_gib(avail)} available on {device}: use a "
            "smaller model, batch or img_size",
        )
    return figures


def fits(n_values: float, avail: int | None, field: str, value, what: str) -> None:
    """Refuse an allocation of ``n_values`` float32 values beyond ``avail`` bytes."""
    need = n_values * FLOAT
    if avail is not None and math.isfinite(need) and need > avail:
        raise ConfigError(field, value, f"{what} needs {_gib(need)}; {_gib(avail)} available")

