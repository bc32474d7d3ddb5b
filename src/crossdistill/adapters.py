"""Model I/O adapters: how one model (student or a teacher) is called on a batch, and where
its logits are in what it returns.

``inputs`` maps batch keys to forward arguments: a key or a list of keys (positional,
``model(batch["x"])``), or a dict ``{argument: batch key}`` (keyword,
``model(input_ids=batch["tokens"], attention_mask=batch["mask"])``). ``logits`` selects the
logits in the output: ``None`` finds them in a tensor, a tuple (first item, the HF
``return_dict=False`` convention), a dict with a ``"logits"`` key or an object with a
``.logits`` attribute (a Hugging Face ``ModelOutput``); an int indexes a tuple, a string is a
dict key or attribute, a dotted string or a list walks several levels. ``class_dim`` moves
the class axis of dense logits (e.g. ``(B, K, H, W)`` with ``class_dim=1``) to the last
dimension, where every loss and metric expects it. ``classes`` keeps only the first
``classes`` entries of the class axis: two LMs of one tokenizer whose embedding tables were
padded to different sizes (a multiple of 64, say) then score the same vocabulary.

A keyword input whose batch key starts with ``?`` is optional: passed when the batch holds
the key, left out otherwise (``{"x": "image", "target_queries": "?target_queries"}``: a
prepare stage adds the key in training; evaluation calls the model without it).

Everything is checked on the first batch (:meth:`ModelIO.check`), with errors that list the
batch's keys or the output's structure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

Selector = int | str | Sequence[int | str] | None


def describe(out: Any, depth: int = 0) -> str:
    """A short, readable picture of a model output's structure."""
    if torch.is_tensor(out):
        return f"tensor {tuple(out.shape)}"
    if depth > 1:
        return type(out).__name__
    if isinstance(out, Mapping):
        items = ", ".join(f"{k!r}: {describe(v, depth + 1)}" for k, v in out.items())
        return f"{type(out).__name__} {{{items}}}"
    if isinstance(out, (tuple, list)):
        items = ", ".join(f"[{i}] {describe(v, depth + 1)}" for i, v in enumerate(out[:6]))
        more = f", ... ({len(out)} items)" if len(out) > 6 else ""
        return f"{type(out).__name__} ({items}{more})"
    if out is None:
        return "None"
    fields = [a for a in ("logits", "last_hidden_state", "hidden_states") if hasattr(out, a)]
    return f"{type(out).__name__} with {', '.join(fields) or 'no tensor fields'}"


def _steps(sel: Selector) -> list[int | str]:
    if sel is None:
        return []
    if isinstance(sel, (int, str)):
        if isinstance(sel, str) and "." in sel:
            return [int(p) if p.lstrip("-").isdigit() else p for p in sel.split(".")]
        return [sel]
    return list(sel)


def select(out: Any, sel: Selector, field: str) -> Any:
    """Walk ``sel`` into ``out`` (index, key or attribute per step)."""
    value = out
    for step in _steps(sel):
        try:
            if isinstance(value, Mapping):
                value = value[step]
            elif isinstance(value, (tuple, list)):
                value = value[int(step)]
            else:
                value = getattr(value, str(step))
        except (KeyError, IndexError, AttributeError, ValueError, TypeError):
            raise ConfigError(
                field, step, f"not in the model's output; the output is {describe(out)}"
            ) from None
    return value


def find_logits(out: Any) -> torch.Tensor | None:
    """The logits of a standard output layout, or None."""
    if torch.is_tensor(out):
        return out
    if isinstance(out, Mapping):
        v = out.get("logits")
        return v if torch.is_tensor(v) else None
    v = getattr(out, "logits", None)
    if torch.is_tensor(v):
        return v
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0]
    return None


class ModelIO:
    """How to call one model and read its logits (see the module docstring)."""

    def __init__(
        self,
        inputs: str | Sequence[str] | Mapping[str, str] | None = None,
        logits: Selector = None,
        *,
        class_dim: int | None = None,
        kwargs: Mapping[str, Any] | None = None,
        field: str = "student",
        classes: int | None = None,
    ):
        if isinstance(inputs, str):
            inputs = [inputs]
        if inputs is not None and not isinstance(inputs, Mapping):
            inputs = list(inputs)
            if not all(isinstance(k, str) for k in inputs):
                raise ConfigError(f"{field}.inputs", inputs, "batch keys (strings)")
        self.inputs = inputs
        self.logits_sel = logits
        self.class_dim = class_dim
        self.kwargs = dict(kwargs or {})
        self.field = field
        self.classes = classes

    def with_defaults(self, inputs, class_dim: int | None) -> ModelIO:
        """A copy with the task's default inputs / class axis where none were given."""
        io = ModelIO(
            self.inputs if self.inputs is not None else inputs,
            self.logits_sel,
            class_dim=self.class_dim if self.class_dim is not None else class_dim,
            kwargs=self.kwargs,
            field=self.field,
            classes=self.classes,
        )
        return io

    @property
    def keys(self) -> list[str]:
        """The batch keys the model needs (optional ``?`` keys left out)."""
        if self.inputs is None:
            return ["x"]
        if isinstance(self.inputs, Mapping):
            return [k for k in self.inputs.values() if not k.startswith("?")]
        return self.inputs

    def check_batch(self, batch: Mapping) -> None:
        missing = [k for k in self.keys if k not in batch]
        if missing:
            raise ConfigError(
                f"{self.field}.inputs",
                missing[0],
                f"not a key of the batch; the batch has: {', '.join(sorted(batch))}",
            )

    def call(self, model: nn.Module, batch: Mapping, **extra) -> Any:
        inputs = self.inputs if self.inputs is not None else ["x"]
        kw = {**self.kwargs, **extra}
        if isinstance(inputs, Mapping):
            args = {
                arg: batch[key.removeprefix("?")]
                for arg, key in inputs.items()
                if not key.startswith("?") or key[1:] in batch
            }
            return model(**args, **kw)
        return model(*[batch[k] for k in inputs], **kw)

    def logits(self, out: Any) -> torch.Tensor:
        z = find_logits(out) if self.logits_sel is None else select(out, self.logits_sel, "")
        if self.class_dim is not None and self.class_dim not in (-1, z.dim() - 1):
            z = z.movedim(self.class_dim, -1)
        if self.classes is not None and z.shape[-1] > self.classes:
            z = z[..., : self.classes]
        return z

    def check(self, out: Any) -> torch.Tensor:
        """The logits of a first output, or a clear error showing the output's structure."""
        if self.logits_sel is None:
            z = find_logits(out)
            if z is None:
                raise ConfigError(
                    f"{self.field}.logits",
                    None,
                    f"no logits found in the output, which is {describe(out)}; "
                    f"select them with `logits: KEY` (an index, key or attribute)",
                )
        else:
            z = select(out, self.logits_sel, f"{self.field}.logits")
            if not torch.is_tensor(z):
                raise ConfigError(
                    f"{self.field}.logits",
                    self.logits_sel,
                    f"selects a {type(z).__name__}, not a tensor; the output is {describe(out)}",
                )
        if self.class_dim is not None and not -z.dim() <= self.class_dim < z.dim():
            raise ConfigError(
                f"{self.field}.class_dim", self.class_dim, f"the logits have {z.dim()} dims"
            )
        return self.logits(out)

    @classmethod
    def parse(cls, spec, field: str) -> ModelIO:
        if spec is None:
            return cls(field=field)
        if isinstance(spec, ModelIO):
            spec.field = field
            return spec
        if isinstance(spec, Mapping):
            return cls(**spec, field=field)
        raise ConfigError(field, spec, "a ModelIO or a dict with inputs / logits / class_dim")

    def __repr__(self) -> str:
        return (
            f"ModelIO(inputs={self.inputs}, logits={self.logits_sel}, class_dim={self.class_dim})"
        )
