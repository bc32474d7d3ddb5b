"""Structure operations: registered, replayable changes to a model's architecture.

A method that prunes channels or drops layers calls ``distiller.apply_structure(op, **args)``;
the op and its arguments (plain data) are logged, the trainer rebuilds the optimiser and the
projectors, and a resumed run replays the log on a freshly built student before loading the
checkpoint's weights, so resume stays exact.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .errors import ConfigError
from .registry import STRUCTURE_OPS
from .taps import Tap, resolve


def apply(model: nn.Module, op: str, args: Mapping) -> None:
    fn = STRUCTURE_OPS.get(op, "structure.op")
    with torch.no_grad():
        fn(model, **args)


def _set(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = resolve(model, Tap(parent_path), "structure.path") if parent_path else model
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and name.isdigit():
        parent[int(name)] = new
    else:
        setattr(parent, name, new)


def _resized(m: nn.Module, n_in: int, n_out: int, field: str, role: str) -> nn.Module:
    """A fresh Conv2d / Linear like ``m`` with ``n_in`` inputs and ``n_out`` outputs."""
    if isinstance(m, nn.Conv2d):
        if m.groups != 1:
            raise ConfigError(field, "grouped conv", f"{role} must have groups=1")
        new = nn.Conv2d(
            n_in, n_out, m.kernel_size, m.stride, m.padding, m.dilation, 1, m.bias is not None
        )
    elif isinstance(m, nn.Linear):
        new = nn.Linear(n_in, n_out, m.bias is not None)
    else:
        raise ConfigError(field, type(m).__name__, "Conv2d, Linear or BatchNorm")
    return new.to(m.weight.device)


def _width(m: nn.Module) -> tuple[int, int]:
    """(inputs, outputs) of a Conv2d or Linear."""
    if isinstance(m, nn.Conv2d):
        return m.in_channels, m.out_channels
    return m.in_features, m.out_features


def _slice_out(m: nn.Module, keep: torch.Tensor) -> nn.Module:
    """``m`` keeping only output channels ``keep`` (Conv2d, Linear or BatchNorm)."""
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        new = type(m)(len(keep), m.eps, m.momentum, m.affine, m.track_running_stats)
        for name in ("running_mean", "running_var"):
            if getattr(m, name) is not None:
                getattr(new, name).copy_(getattr(m, name)[keep])
        if m.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(m.num_batches_tracked)
        new = new.to(m.weight.device if m.weight is not None else "cpu")
    else:
        new = _resized(m, _width(m)[0], len(keep), "structure.path", "pruned layers")
    for name in ("weight", "bias"):
        p = getattr(m, name, None)
        if p is not None:
            getattr(new, name).copy_(p[keep])
    return new


def _slice_in(m: nn.Module, keep: torch.Tensor) -> nn.Module:
    """``m`` reading only input channels ``keep`` (Conv2d or Linear)."""
    if not isinstance(m, (nn.Conv2d, nn.Linear)):
        raise ConfigError("structure.next", type(m).__name__, "Conv2d or Linear")
    new = _resized(m, len(keep), _width(m)[1], "structure.next", "followers")
    new.weight.copy_(m.weight[:, keep])
    if m.bias is not None:
        new.bias.copy_(m.bias)
    return new


@STRUCTURE_OPS.register("prune_channels", description="keep some output channels of a layer")
def prune_channels(model, *, path: str, keep: list[int], bn: str | None = None, next=()):
    """Keep output channels ``keep`` of the Conv2d/Linear at ``path`` (and of its BatchNorm
    ``bn``), and the matching input channels of each layer in ``next``."""
    layer = resolve(model, Tap(path), "structure.path")
    idx = torch.as_tensor(sorted(int(k) for k in keep), dtype=torch.long)
    width = _width(layer)[1]
    if len(idx) == 0 or int(idx.max()) >= width or len(set(idx.tolist())) != len(idx):
        raise ConfigError("structure.keep", keep, f"distinct channel indices in 0..{width - 1}")
    _set(model, path, _slice_out(layer, idx))
    if bn:
        _set(model, bn, _slice_out(resolve(model, Tap(bn), "structure.bn"), idx))
    for p in next:
        _set(model, p, _slice_in(resolve(model, Tap(p), "structure.next"), idx))


@STRUCTURE_OPS.register("drop_layers", description="keep some blocks of a Sequential/ModuleList")
def drop_layers(model, *, path: str, keep: list[int]):
    """Keep blocks ``keep`` (in order) of the ``nn.Sequential``/``nn.ModuleList`` at ``path``
    (contiguous layer pruning: the kept layers keep their weights)."""
    seq = resolve(model, Tap(path), "structure.path")
    if not isinstance(seq, (nn.Sequential, nn.ModuleList)):
        raise ConfigError("structure.path", path, "an nn.Sequential or nn.ModuleList")
    if not keep or any(not 0 <= int(k) < len(seq) for k in keep):
        raise ConfigError("structure.keep", keep, f"block indices in 0..{len(seq) - 1}")
    blocks = [seq[int(k)] for k in keep]
    _set(
        model, path, type(seq)(*blocks) if isinstance(seq, nn.Sequential) else nn.ModuleList(blocks)
    )
