"""Token-level distillation losses straight from hidden states, tiled so full logits never exist.

On a small LM the output layer dominates time and a B x L x V logits tensor (plus its softmax
and gradient) dominates memory. :func:`tiled_token_loss` runs both models' output layers
``token_chunk`` valid tokens at a time (and, with ``vocab_chunk``, ``vocab_chunk`` vocabulary
rows at a time), so the largest live tensor is one tile of logits. The gradient of each tile is
computed in the forward pass and the tile is freed (as Liger's fused linear cross-entropy does):
nothing of size V per token is kept for backward, and no logits are recomputed for the token
tiling. Values and gradients equal the untiled ``log_softmax`` -> divergence -> masked mean up to
summation order (tests/test_tiled.py).

``divergence(log_p_teacher, log_q_student)`` takes (n, V) log-probabilities at ``temperature``
and returns one value per row, (n,). With ``elementwise=True`` it returns the (n, V) terms
``g(log p_v, log q_v)`` whose sum over v is the divergence; vocabulary tiling needs that form
(forward/reverse KL, TVD, JSD with log-space mixing all have it), because a tile only sees part
of the vocabulary. The student's gradient through the softmax is then assembled exactly from
tiles: dL/dz_j = (g'_j - q_j * sum_v g'_v) / T with g' = dg/dlog q (three passes over the
vocabulary: logsumexps, loss and sum_v g', gradients).
No T^2 factor is applied; the caller owns the term weight. The teacher side never gets grads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from ..errors import ConfigError
from ..registry import LOSSES
from ..schema import Count, Prob, Temperature
from . import divergences as D
from .features import _upcast

Divergence = Callable[[Tensor, Tensor], Tensor]


def _logits(h: Tensor, w: Tensor, b: Tensor | None, temperature: float, on_chunk) -> Tensor:
    """One tile of ``h @ w.T + b`` divided by ``temperature``, in at least float32."""
    z = _upcast(h @ w.T if b is None else torch.addmm(b, h, w.T))
    if on_chunk is not None:
        on_chunk(tuple(z.shape))
    return z / temperature if temperature != 1.0 else z


class _Grads:
    """Gradient accumulators for the student's inputs (None where no grad is wanted)."""

    def __init__(self, hs: Tensor, ws: Tensor, bs: Tensor | None, needs: tuple[bool, ...]):
        dt = _upcast(hs[:0]).dtype
        self.h = torch.zeros(hs.shape, dtype=dt, device=hs.device) if needs[0] else None
        self.w = torch.zeros(ws.shape, dtype=dt, device=ws.device) if needs[1] else None
        self.b = torch.zeros(bs.shape, dtype=dt, device=bs.device) if needs[2] else None

    def add(self, dz: Tensor, h: Tensor, rows: slice, cols: slice, w: Tensor) -> None:
        """Accumulate a logits tile's gradient ``dz`` (rows x cols of the full logits)."""
        if self.h is not None:
            self.h[rows] += dz @ _upcast(w[cols])
        if self.w is not None:
            self.w[cols] += dz.T @ _upcast(h)
        if self.b is not None:
            self.b[cols] += dz.sum(0)


def _terms(divergence: Divergence, elementwise: bool, lp: Tensor, lq: Tensor) -> Tensor:
    out = divergence(lp, lq)
    return out.sum(-1) if elementwise else out


def _value_and_grad(fn, lp: Tensor, lq: Tensor, need: bool) -> tuple[Tensor, Tensor | None]:
    """``fn(lp, lq)`` summed, and its gradient w.r.t. ``lq`` when ``need``."""
    if not need:
        return fn(lp, lq).sum(), None
    with torch.enable_grad():
        lq = lq.detach().requires_grad_()
        val = fn(lp, lq).sum()
        (grad,) = torch.autograd.grad(val, lq)
    return val.detach(), grad


def _full_vocab(args, r: slice, grads: _Grads | None) -> Tensor:
    """Loss over rows ``r`` with the whole vocabulary in one tile."""
    hs, ws, bs, ht, wt, bt, div, elementwise, temp, on_chunk = args
    zs = _logits(hs[r], ws, bs, temp, on_chunk)
    lp = torch.log_softmax(_logits(ht[r], wt, bt, temp, on_chunk).to(zs.dtype), -1)
    fn = lambda lp, z: _terms(div, elementwise, lp, torch.log_softmax(z, -1))
    val, dz = _value_and_grad(fn, lp, zs, grads is not None)
    if grads is not None:
        grads.add(dz / temp, hs[r], r, slice(None), ws)
    return val


def _tiled_vocab(args, r: slice, grads: _Grads | None, chunk: int) -> Tensor:
    """Loss over rows ``r`` in vocabulary tiles of ``chunk`` (``divergence`` elementwise)."""
    hs, ws, bs, ht, wt, bt, div, _, temp, on_chunk = args
    tiles = [slice(c, c + chunk) for c in range(0, ws.shape[0], chunk)]

    def pair(c: slice) -> tuple[Tensor, Tensor]:
        zs = _logits(hs[r], ws[c], None if bs is None else bs[c], temp, on_chunk)
        zt = _logits(ht[r], wt[c], None if bt is None else bt[c], temp, on_chunk)
        return zs, zt.to(zs.dtype)

    n = hs[r].shape[0]
    lse_s = lse_t = torch.full((n, 1), -torch.inf, dtype=_upcast(hs[:0]).dtype, device=hs.device)
    for c in tiles:  # pass 1: each row's logsumexp for both models
        zs, zt = pair(c)
        lse_s = torch.logaddexp(lse_s, zs.logsumexp(-1, keepdim=True))
        lse_t = torch.logaddexp(lse_t, zt.logsumexp(-1, keepdim=True))
    need = grads is not None
    total, g_sum = zs.new_zeros(()), zs.new_zeros((n, 1))
    for c in tiles:  # pass 2: the loss, and sum_v g'_v per row
        zs, zt = pair(c)
        val, gp = _value_and_grad(div, zt - lse_t, zs - lse_s, need)
        total = total + val
        if need:
            g_sum += gp.sum(-1, keepdim=True)
    if need:
        for c in tiles:  # pass 3: dL/dz = (g' - q * sum_v g') / T, tile by tile
            zs, zt = pair(c)
            _, gp = _value_and_grad(div, zt - lse_t, zs - lse_s, True)
            grads.add((gp - (zs - lse_s).exp() * g_sum) / temp, hs[r], r, c, ws)
    return total


class _TiledLoss(torch.autograd.Function):
    """Sum of the divergence over rows; gradients computed tile by tile in forward."""

    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, opts):
        div, elementwise, temp, token_chunk, vocab_chunk, on_chunk, need = opts
        grads = _Grads(hs, ws, bs, ctx.needs_input_grad[:3]) if need else None
        args = (hs, ws, bs, ht, wt, bt, div, elementwise, temp, on_chunk)
        total = _upcast(hs.new_zeros(()))
        for start in range(0, hs.shape[0], token_chunk):
            r = slice(start, start + token_chunk)
            if vocab_chunk is None or vocab_chunk >= ws.shape[0]:
                total = total + _full_vocab(args, r, grads)
            else:
                total = total + _tiled_vocab(args, r, grads, vocab_chunk)
        ctx.grads = grads
        ctx.dtypes = (hs.dtype, ws.dtype, None if bs is None else bs.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        g = ctx.grads
        out = [
            None if x is None else (x * grad_out).to(dt)
            for x, dt in zip((g.h, g.w, g.b), ctx.dtypes)
        ]
        return out[0], out[1], out[2], None, None, None, None


def _check(h_s, w_s, h_t, w_t, mask, temperature, token_chunk, vocab_chunk, elementwise):
    if not temperature > 0:
        raise ConfigError("temperature", temperature, "must be a positive number")
    for name, v in (("token_chunk", token_chunk), ("vocab_chunk", vocab_chunk)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(name, v, "must be a positive integer")
    if vocab_chunk is not None and not elementwise:
        raise ConfigError(
            "vocab_chunk", vocab_chunk, "vocabulary tiling needs an elementwise divergence"
        )
    if w_s.shape[0] != w_t.shape[0]:
        raise ConfigError(
            "vocabulary",
            f"student {w_s.shape[0]} vs teacher {w_t.shape[0]}",
            "a same-tokenizer loss needs one vocabulary (use ULD or ALM across tokenizers)",
        )
    if h_s.shape[:-1] != h_t.shape[:-1] or h_s.shape[-1] != w_s.shape[1]:
        raise ConfigError(
            "hidden",
            f"student {tuple(h_s.shape)} vs teacher {tuple(h_t.shape)}",
            "need the same (..., D) token positions, D matching each output layer",
        )
    if h_t.shape[-1] != w_t.shape[1] or (mask is not None and mask.shape != h_s.shape[:-1]):
        raise ConfigError(
            "hidden",
            f"teacher {tuple(h_t.shape)}, mask {None if mask is None else tuple(mask.shape)}",
            "teacher D must match its output layer; mask must be the hidden states' (...)",
        )


def tiled_token_loss(
    h_s: Tensor,
    w_s: Tensor,
    h_t: Tensor,
    w_t: Tensor,
    divergence: Divergence,
    *,
    mask: Tensor | None = None,
    b_s: Tensor | None = None,
    b_t: Tensor | None = None,
    temperature: float = 1.0,
    token_chunk: int | None = None,
    vocab_chunk: int | None = None,
    elementwise: bool = False,
    reduction: str = "mean",
    _on_chunk: Callable[[tuple[int, ...]], None] | None = None,
):
    """``divergence`` between teacher and student token distributions from hidden states.

    ``h_s`` (..., D_s) and ``w_s`` (V, D_s) (an ``nn.Linear`` weight, as an lm_head) are the
    student's, ``h_t``/``w_t`` the teacher's (never differentiated); ``mask`` (...) keeps the
    valid positions. ``reduction="mean"`` returns the mean over valid tokens (0 when there are
    none, so an all-padding micro-batch cannot NaN a step); ``"sum"`` returns ``(sum, count)``
    so the caller can normalise over a global batch (gradient accumulation, DDP).
    ``_on_chunk(shape)`` sees every logits tile built (tests use it to bound memory).
    """
    if reduction not in ("mean", "sum"):
        raise ConfigError("reduction", reduction, "one of: mean, sum")
    _check(h_s, w_s, h_t, w_t, mask, temperature, token_chunk, vocab_chunk, elementwise)
    if token_chunk is None:  # ~2^20 logits (4 MiB in fp32) per tile, whatever the vocabulary
        token_chunk = max(1, 2**20 // w_s.shape[0])
    hs, ht = h_s.reshape(-1, h_s.shape[-1]), h_t.detach().reshape(-1, h_t.shape[-1])
    if mask is not None:
        keep = mask.reshape(-1).to(torch.bool)
        hs, ht = hs[keep], ht[keep]
    w_t = w_t.detach()
    b_t = None if b_t is None else b_t.detach()
    need = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (hs, w_s, b_s)
    )
    opts = (divergence, elementwise, float(temperature), token_chunk, vocab_chunk, _on_chunk, need)
    total = _TiledLoss.apply(hs, w_s, b_s, ht, w_t, b_t, opts)
    count = torch.tensor(hs.shape[0], device=hs.device)
    if reduction == "sum":
        return total, count
    return total / count.clamp(min=1)


def _parts(x, field: str) -> tuple[Tensor, Tensor, Tensor | None]:
    if not isinstance(x, (list, tuple)) or len(x) not in (2, 3):
        raise ConfigError(
            field, f"{len(x) if isinstance(x, (list, tuple)) else 1} taps",
            "two or three taps per side: the hidden states before the output layer, its "
            "weight and optionally its bias, e.g. [transformer.ln_f, 'lm_head:weight']",
        )
    return x[0], x[1], (x[2] if len(x) == 3 else None)


@LOSSES.register(
    "tiled",
    paper="Liger Kernel: Efficient Triton Kernels for LLM Training (fused linear, chunked "
    "token losses); divergences of GKD / DistiLLM",
    year=2024,
    inputs="features",
    default_weight=1.0,
    reduction="sum",
)
def tiled(
    s: list,
    t: list,
    *,
    mask: Tensor | None = None,
    divergence: Literal["fkl", "rkl", "jsd", "tvd", "skl", "srkl"] = "fkl",
    beta: Prob = 0.5,
    alpha: Prob = 0.1,
    temperature: Temperature = 1.0,
    token_chunk: Count | None = None,
    vocab_chunk: Count | None = None,
) -> Tensor:
    """A token divergence computed from both models' hidden states through their output
    layers in tiles (:func:`tiled_token_loss`), so full ``B x L x V`` logits never exist:
    the same values and gradients as ``fkl`` / ``jsd`` / ... on the logits, at the memory of
    one ``token_chunk x vocab_chunk`` tile (default: about 2^20 logits per tile). Taps per
    side: ``[hidden states, 'head:weight']`` (+ ``'head:bias'``); for GPT-2
    ``[transformer.ln_f, 'lm_head:weight']``. When no term reads a model's logits, the
    distiller asks a Hugging Face LM for the last position's only (``logits_to_keep=1``).
    Returns the *sum* over the valid tokens; the Term divides by their count (global under
    accumulation and DDP), like every token loss."""
    h_s, w_s, b_s = _parts(s, "tiled.student")
    h_t, w_t, b_t = _parts(t, "tiled.teacher")

    def div(log_p: Tensor, log_q: Tensor) -> Tensor:
        return D.terms(divergence, log_p, log_q, beta=beta, alpha=alpha)

    total, _ = tiled_token_loss(
        h_s, w_s, h_t, w_t, div, mask=mask, b_s=b_s, b_t=b_t, temperature=temperature,
        token_chunk=token_chunk, vocab_chunk=vocab_chunk, elementwise=True, reduction="sum",
    )
    return total
