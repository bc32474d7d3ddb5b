"""Guards against NaN/inf: one host sync per optimiser step, detail only on failure.

:class:`StepGuard` checks the step's loss total (summed over the accumulation window) and
every gradient in one fused kernel and reads one flag. A weighted sum is non-finite whenever
one of its terms is, so the total stands for every term. Only when the flag fails do the
helpers here look closer, to name the term or the parameter.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

HINT = (
    "lower train.lr (or set train.grad_clip), check the inputs, the teacher's weights and the "
    "term weights, or set train.nan: skip to skip such steps"
)
HINT_SKIPPING = (  # already under train.nan: skip
    "skipping steps cannot repair this: lower train.lr (or set train.grad_clip), check the "
    "inputs, the teacher's weights and the term weights"
)


class NonFiniteError(ConfigError):
    """Training produced NaN or inf. One line naming what and where (the CLI exits 2)."""

    def __init__(self, what: str, where: str, hint: str = HINT):
        self.field, self.value, self.allowed = "train", what, hint
        ValueError.__init__(self, f"train: {what} at {where}; {hint}")


class StepGuard:
    """The per-step flag in one fused kernel: the grad scaler's own inf/NaN check
    (``_amp_foreach_non_finite_check_and_unscale_``, at scale 1, which leaves every value as
    it is) over the loss total and every gradient, then one ``.item()``."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        self._shards = any(hasattr(p, "to_local") for p in params)  # FSDP's DTensors
        kinds = {(p.device, p.dtype) for p in params}
        self._kind = next(iter(kinds)) if len(kinds) == 1 else None  # one kernel call
        self._found: dict = {}  # device -> 1-element flag
        self._one: dict = {}

    def ok(self, total: torch.Tensor | None, grads: bool = True, dist=None) -> bool:
        """``total``: a detached loss (it is multiplied by 1 in place, i.e. left as it is)."""
        ts = [] if total is None else [total]
        if grads and self._shards:
            ts += [_local(p.grad) for p in self.params if p.grad is not None]
        elif grads:
            ts += [p.grad for p in self.params if p.grad is not None]
        if not ts:
            return True
        one_kind = self._kind is not None and (
            total is None or (total.device, total.dtype) == self._kind
        )
        flags = []
        for group in [ts] if one_kind else _groups(ts):
            dev = group[0].device
            if dev not in self._found:
                self._found[dev] = torch.zeros(1, device=dev)
                self._one[dev] = torch.ones(1, device=dev)
            found = self._found[dev]  # 0 unless the last check failed (then zeroed there)
            torch._amp_foreach_non_finite_check_and_unscale_(group, found, self._one[dev])
            flags.append(found)
        found = flags[0] if len(flags) == 1 else sum(f.cpu() for f in flags)
        if dist is not None and dist.active:  # every rank takes the same decision
            found = found.clone()
            torch.distributed.all_reduce(found)
        bad = found.item()
        if bad:
            for f in flags:
                f.zero_()
        return not bad


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # an FSDP shard


def _groups(ts: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Same device and dtype per kernel call (usually one group)."""
    d0, t0 = ts[0].device, ts[0].dtype
    if all(t.device == d0 and t.dtype == t0 for t in ts):
        return [ts]
    out: dict = {}
    for t in ts:
        out.setdefault((t.device, t.dtype), []).append(t)
    return list(out.values())


def _kind(x: torch.Tensor) -> str:
    return "nan" if torch.isnan(x).any() else "inf"


def culprit(out, terms, epoch: float, named_params, window=None) -> str:
    """What made the step non-finite: a term, a term times its weight, an earlier
    micro-batch's loss (``window``: the total summed over the step's micro-batches), or a
    gradient. Runs only after the one flag has failed."""
    for name, v in out.losses.items():
        if not torch.isfinite(v.detach()).all():
            return f"term {name!r} is {_kind(v.detach())}"
    weights = {t.name: t.weight_at(epoch) for t in terms}
    for name, v in out.losses.items():
        w = weights.get(name, 1.0)
        weighted = v.detach().float() * w
        if not torch.isfinite(weighted).all():
            return f"term {name!r} times its weight {w:g} is {_kind(weighted)}"
    if window is not None and not torch.isfinite(window).all():
        return f"the loss of an earlier micro-batch of this step is {_kind(window)}"
    for name, p in named_params:
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return f"the gradient of {name} is {_kind(p.grad)}"
    return "the loss total (summed over the accumulated micro-batches) is non-finite"


def first_nonfinite(state: dict[str, torch.Tensor]) -> str | None:
    """The first floating tensor of ``state`` holding NaN/inf, else None (one sync)."""
    items = [(k, v) for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()]
    if not items:
        return None
    flags = torch.stack([torch.isfinite(v).all() for _, v in items])
    if bool(flags.all()):
        return None
    return next(k for (k, _), ok in zip(items, flags.tolist()) if not ok)
