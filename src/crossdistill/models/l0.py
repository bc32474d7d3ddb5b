"""Learnable L0 gates on a BERT-style encoder's attention heads and FFN channels, and the
structure ops that attach them and prune by them (TinyCLIP's automatic inheritance).

Hard-concrete gates (Louizos et al., "Learning Sparse Neural Networks through L0
Regularization", ICLR 2018, Eq. 10-12): per unit a learnable ``log_alpha``; in training
``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``, ``u ~ U(0, 1)``, stretched to
``(gamma, zeta)`` and clamped to ``[0, 1]``; in eval the noise-free value. The probability
that a gate is open is ``P = sigmoid(log_alpha - beta * log(-gamma / zeta))``, so the
expected size of the encoder is differentiable: per layer ``4 * D * d * E[heads] +
2 * D * E[ffn]`` weights (query, key, value and output rows of each head; the two FFN
matrices), ``D`` the hidden size and ``d`` the head size. ``beta = 2/3``, ``gamma = -0.1``,
``zeta = 1.1`` (the paper's and TinyCLIP's ``l0module.py`` values, read, not copied).

Masks act through forward pre-hooks on the encoder's own modules (the input of each
attention output projection, per head; the input of each FFN output matrix, per channel),
so the user's model is not rewritten. ``l0_prune`` keeps the chosen heads and channels
(slicing those modules; transformers 5 infers the head count from the query width) and
either re-attaches fresh gates (a further stage) or removes them (the last stage).
Hidden (embedding) dims are not gated: in a Hugging Face BERT the head size is
``hidden / heads``, so a narrower hidden size would change every head.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import STRUCTURE_OPS
from ..taps import Tap, resolve

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1
ATTR = "l0"  # the gates live at ``<encoder>.l0``; tap it for the size gap


def open_probability(log_alpha: Tensor) -> Tensor:
    """``P(z > 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))``."""
    return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))


def gate_values(log_alpha: Tensor, training: bool, generator=None) -> Tensor:
    """Hard-concrete samples (training) or their noise-free value (eval), in [0, 1]."""
    if training:
        u = torch.rand(log_alpha.shape, generator=generator, device=log_alpha.device)
        u = u.clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((u.log() - (-u).log1p() + log_alpha) / BETA)
    else:
        s = torch.sigmoid(log_alpha)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def _layers(encoder: nn.Module, field: str):
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if layers is None:
        raise ConfigError(field, type(encoder).__name__, "a BERT-style encoder "
                          "(encoder.layer[i].attention.self.query, ...)")
    return layers


def _head_size(encoder: nn.Module) -> int:
    c = encoder.config
    return int(c.hidden_size) // int(c.num_attention_heads)


class _Mask:
    """A forward pre-hook scaling a module's input by gates (per head or per channel)."""

    def __init__(self, gates: L0Gates, kind: str, layer: int):
        self.gates, self.kind, self.layer = gates, kind, layer

    def __call__(self, module, args):
        z = self.gates.z[self.kind][self.layer]
        if self.kind == "heads":
            z = z.repeat_interleave(self.gates.head_size)
        return (args[0] * z.to(args[0].dtype),) + tuple(args[1:])


class L0Gates(nn.Module):
    """Gates on every layer's heads and FFN channels of ``encoder``. Calling it (the
    encoder's pre-hook does, once per forward) draws the gates for that forward and returns
    ``expected size / full size - target``, shape (1,): the tap of the ``l0_budget`` loss."""

    def __init__(self, encoder: nn.Module, droprate_init: float = 0.05, full: float | None = None):
        super().__init__()
        layers = _layers(encoder, "l0.encoder")
        self.head_size, self.hidden = _head_size(encoder), int(encoder.config.hidden_size)
        heads = [lay.attention.self.query.out_features // self.head_size for lay in layers]
        ffn = [lay.intermediate.dense.out_features for lay in layers]
        init = math.log(1 - droprate_init) - math.log(droprate_init)
        self.heads = nn.ParameterList([nn.Parameter(torch.full((h,), init)) for h in heads])
        self.ffn = nn.ParameterList([nn.Parameter(torch.full((f,), init)) for f in ffn])
        # full size: the encoder the first stage started from (later stages keep the ratio)
        self.register_buffer("full", torch.tensor(float(full or self.size(heads, ffn))),
                             persistent=False)
        self.register_buffer("target", torch.tensor(1.0))  # set by the schedule; resumed
        self.z: dict[str, list[Tensor]] = {}
        self.generator: torch.Generator | None = None

    def size(self, heads, ffn) -> Tensor | float:
        """Gated weights of the encoder with ``heads[l]`` heads and ``ffn[l]`` channels."""
        return sum(4 * self.hidden * self.head_size * h + 2 * self.hidden * f
                   for h, f in zip(heads, ffn))

    def expected_ratio(self) -> Tensor:
        heads = [open_probability(a).sum() for a in self.heads]
        ffn = [open_probability(a).sum() for a in self.ffn]
        return self.size(heads, ffn) / self.full

    def forward(self) -> Tensor:
        self.z = {k: [gate_values(a, self.training, self.generator) for a in getattr(self, k)]
                  for k in ("heads", "ffn")}
        return (self.expected_ratio() - self.target).reshape(1)

    def keep(self, ratio: float) -> dict[str, list[list[int]]]:
        """Units to keep for an encoder of ``ratio`` x the full size: the gates ranked by
        ``log_alpha`` (heads and channels by their weights per unit), largest first, until
        the size is reached; every layer keeps at least one head and one channel."""
        units = []
        for kind, w in (("heads", 4 * self.hidden * self.head_size), ("ffn", 2 * self.hidden)):
            for layer, a in enumerate(getattr(self, kind)):
                units += [(float(v), kind, layer, i, w) for i, v in enumerate(a.detach())]
        budget = float(ratio) * float(self.full)
        out = {k: [[] for _ in getattr(self, k)] for k in ("heads", "ffn")}
        used = 0.0
        for kind in ("heads", "ffn"):  # the floor: the best unit of each layer
            for layer, a in enumerate(getattr(self, kind)):
                i = int(a.detach().argmax())
                out[kind][layer].append(i)
                used += 4 * self.hidden * self.head_size if kind == "heads" else 2 * self.hidden
        for _, kind, layer, i, w in sorted(units, key=lambda u: -u[0]):
            if i in out[kind][layer] or used + w > budget:
                continue
            out[kind][layer].append(i)
            used += w
        return {k: [sorted(v) for v in out[k]] for k in out}


def _pre_forward(module, args, kwargs):
    getattr(module, ATTR)()  # draw this forward's gates (and feed the size tap)


def attach(encoder: nn.Module, droprate_init: float = 0.05, full: float | None = None) -> L0Gates:
    if hasattr(encoder, ATTR):
        raise ConfigError("l0.encoder", type(encoder).__name__, "an encoder without L0 gates")
    gates = L0Gates(encoder, droprate_init, full).to(next(encoder.parameters()).device)
    setattr(encoder, ATTR, gates)
    handles = [encoder.register_forward_pre_hook(_pre_forward, with_kwargs=True)]
    for i, lay in enumerate(_layers(encoder, "l0.encoder")):
        out = lay.attention.output.dense
        handles.append(out.register_forward_pre_hook(_Mask(gates, "heads", i)))
        handles.append(lay.output.dense.register_forward_pre_hook(_Mask(gates, "ffn", i)))
    gates._handles = handles
    return gates


def detach(encoder: nn.Module) -> None:
    gates = getattr(encoder, ATTR, None)
    if gates is None:
        return
    for h in gates._handles:
        h.remove()
    delattr(encoder, ATTR)


def _rows(lin: nn.Linear, keep: Tensor) -> nn.Linear:
    new = nn.Linear(lin.in_features, len(keep), lin.bias is not None).to(lin.weight.device)
    new.weight.copy_(lin.weight[keep])
    if lin.bias is not None:
        new.bias.copy_(lin.bias[keep])
    return new


def _cols(lin: nn.Linear, keep: Tensor) -> nn.Linear:
    new = nn.Linear(len(keep), lin.out_features, lin.bias is not None).to(lin.weight.device)
    new.weight.copy_(lin.weight[:, keep])
    if lin.bias is not None:
        new.bias.copy_(lin.bias)
    return new


def _indices(keep, n: int, field: str) -> Tensor:
    idx = sorted(int(k) for k in keep)
    if not idx or idx[0] < 0 or idx[-1] >= n or len(set(idx)) != len(idx):
        raise ConfigError(field, keep, f"distinct indices in 0..{n - 1}, at least one")
    return torch.as_tensor(idx, dtype=torch.long)


@STRUCTURE_OPS.register("l0_gates", description="attach L0 gates to a BERT encoder's heads and FFN")
def l0_gates(model, *, path: str, droprate_init: float = 0.05):
    attach(resolve(model, Tap(path), "structure.path"), droprate_init)


@STRUCTURE_OPS.register("l0_prune",
                        description="keep some heads and FFN channels of a BERT encoder")
@torch.no_grad()
def l0_prune(model, *, path: str, heads: list[list[int]], ffn: list[list[int]],
             regate: bool = False, droprate_init: float = 0.05):
    """Keep ``heads[l]`` and ``ffn[l]`` of each layer ``l`` of the encoder at ``path``; with
    ``regate``, fresh gates on what is left (measured against the same full size)."""
    enc = resolve(model, Tap(path), "structure.path")
    layers = _layers(enc, "structure.path")
    if len(heads) != len(layers) or len(ffn) != len(layers):
        raise ConfigError("structure.heads", (len(heads), len(ffn)),
                          f"one list per layer ({len(layers)})")
    d = _head_size(enc)
    picks = [(_indices(h, lay.attention.self.query.out_features // d, "structure.heads"),
              _indices(f, lay.intermediate.dense.out_features, "structure.ffn"))
             for lay, h, f in zip(layers, heads, ffn)]  # every index checked before any change
    old = getattr(enc, ATTR, None)
    full = float(old.full) if old is not None else None
    detach(enc)
    for lay, (hk, fk) in zip(layers, picks):
        att = lay.attention.self
        rows = (hk[:, None] * d + torch.arange(d)).reshape(-1)
        att.query, att.key, att.value = (_rows(m, rows) for m in (att.query, att.key, att.value))
        att.num_attention_heads, att.all_head_size = len(hk), len(hk) * d
        lay.attention.output.dense = _cols(lay.attention.output.dense, rows)
        lay.intermediate.dense = _rows(lay.intermediate.dense, fk)
        lay.output.dense = _cols(lay.output.dense, fk)
    if regate:
        attach(enc, droprate_init, full)
