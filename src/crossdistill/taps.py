"""Taps: forward hooks on module paths, so any ``nn.Module`` can be distilled unchanged.

A :class:`Tap` names what to capture (a module's output or input, optionally one item of a
tuple, dict or model-output object). A :class:`Capture` installs the hooks on one model,
records one value per tap while ``active``, and raises if a tap did not fire, so a stale
feature from a previous step can never be used silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError, nearest

LOGITS = "logits"  # the model's logits, as its adapter (ModelIO) finds them
OUTPUT = "output"  # "output.hidden_states[2]": a selection from the model's return value
KINDS = ("output", "input", "weight", "bias")
PARAMS = ("weight", "bias")  # read from the module, not hooked


@dataclass(frozen=True)
class Tap:
    """What to capture: ``path`` of a submodule, its ``"output"`` or ``"input"``, and
    ``select`` (int index or str key/attribute) when that value is a tuple, dict or object;
    or its ``"weight"`` / ``"bias"`` parameter itself (``"lm_head:weight"``), for losses that
    run a model's output layer themselves (tiled token losses from hidden states)."""

    path: str = LOGITS
    kind: str = "output"
    select: int | str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError("tap.kind", self.kind, f"allowed: {', '.join(KINDS)}")

    @classmethod
    def parse(cls, spec: str | Tap | Mapping) -> Tap:
        """``"layer3"``, ``"head:input"``, ``"encoder:output[0]"``, ``"output.hidden_states[-1]"``
        (from the model's return value: HF hidden states / attentions), a dict or a Tap."""
        if isinstance(spec, Tap):
            return spec
        if isinstance(spec, Mapping):
            return cls(**spec)
        if not isinstance(spec, str):
            raise ConfigError("tap", spec, "a module path string, a dict or a Tap")
        path, kind, select = spec, "output", None
        if spec.endswith("]") and "[" in spec:
            spec, sel = spec[:-1].split("[", 1)
            select = int(sel) if sel.lstrip("-").isdigit() else sel.strip("'\"")
            path = spec
        if ":" in spec:
            path, kind = spec.rsplit(":", 1)
        if path == OUTPUT or path.startswith(OUTPUT + "."):  # the return value, not a hook
            steps = [p for p in path.split(".")[1:]] + ([] if select is None else [str(select)])
            if not steps:
                raise ConfigError(
                    "tap", spec, "select from the output, e.g. output.hidden_states[-1]"
                )
            return cls(OUTPUT, "output", ".".join(steps))
        return cls(path, kind, select)

    @property
    def module_path(self) -> str:
        return "" if self.path == LOGITS else self.path

    def __str__(self) -> str:
        s = self.path if self.kind == "output" else f"{self.path}:{self.kind}"
        return s if self.select is None else f"{s}[{self.select!r}]"


def module_paths(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def resolve(model: nn.Module, tap: Tap, field: str) -> nn.Module:
    """The module a tap points at; unknown paths fail listing the nearest valid ones."""
    modules = dict(model.named_modules())
    if tap.module_path not in modules:
        hint = nearest(tap.path, module_paths(model), n=6)
        raise ConfigError(
            field, tap.path, f"no such module path; nearest valid paths: {', '.join(hint)}"
        )
    return modules[tap.module_path]


def _select(value, tap: Tap, field: str) -> torch.Tensor:
    if tap.select is not None:
        try:
            if isinstance(value, (tuple, list, Mapping)):
                value = value[tap.select]
            else:
                value = getattr(value, tap.select)
        except (KeyError, IndexError, AttributeError, TypeError) as err:
            msg = f"select failed on {type(value).__name__}: {err}"
            raise ConfigError(field, str(tap), msg) from None
    elif tap.kind == "input":
        value = value[0] if len(value) == 1 else value
    if not torch.is_tensor(value):
        raise ConfigError(
            field,
            str(tap),
            f"captured a {type(value).__name__}, not a tensor; add select (an index or key)",
        )
    return value


class Capture:
    """Hooks for a set of taps on one model. Values are kept only while ``active``."""

    def __init__(self, model: nn.Module, taps: dict[str, Tap], field: str = "tap"):
        self.taps = taps
        self.values: dict[str, torch.Tensor] = {}
        self.active = False
        self._handles = []
        self._params: dict[str, tuple[nn.Module, str]] = {}
        self._field = field
        for key, tap in taps.items():
            where = f"{field} {key!r}" if key != str(tap) else field
            module = resolve(model, tap, where)
            if tap.kind in PARAMS:
                if not torch.is_tensor(getattr(module, tap.kind, None)):
                    raise ConfigError(where, str(tap), f"{type(module).__name__} at {tap.path!r} "
                                      f"has no {tap.kind} tensor")
                self._params[key] = (module, tap.kind)
                continue
            self._handles.append(self._install(module, key, tap))

    def _install(self, module: nn.Module, key: str, tap: Tap):
        if tap.kind == "input":

            def pre_hook(_mod, args):
                if self.active:
                    self.values[key] = _select(args, tap, self._field)

            return module.register_forward_pre_hook(pre_hook)

        def hook(_mod, _args, out):
            if self.active:
                self.values[key] = _select(out, tap, self._field)

        return module.register_forward_hook(hook)

    def clear(self) -> None:
        self.values = {}

    def get(self, key: str) -> torch.Tensor:
        if key in self._params:  # the live parameter: gradients flow into it
            module, name = self._params[key]
            return getattr(module, name)
        if key not in self.values:
            raise RuntimeError(
                f"tap {str(self.taps[key])!r} did not fire during this forward pass; "
                "the module is not used by forward(), or is used under a different path"
            )
        return self.values[key]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
