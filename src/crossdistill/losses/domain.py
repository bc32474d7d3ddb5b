"""Domain-adaptation losses of BiDA (Zhang et al., "Cross-domain Hyperspectral Image
Classification based on Bi-directional Domain Adaptation", IEEE TCSVT 2025): the
multi-bandwidth Gaussian MMD, the soft cross-entropy of its bi-directional distillation and
the mean-teacher consistency against an EMA copy of the network.

The first two are pure functions of two student taps (a multi-tap term with no teacher:
``student=[a, b], teacher=None``); the consistency term is a stateful module that owns the
EMA copy, so the copy is checkpointed with the loss state and never exported with the
student. Facts about the official code (YuxiangZhang-BIT/IEEE_TCSVT_BiDA, loss/mmd_loss.py,
train_pipeline.py) were read, not copied.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import LOSSES
from ..schema import Count, Pos, Prob
from .features import _upcast


def _two(name: str, s) -> tuple[Tensor, Tensor]:
    if isinstance(s, Tensor) or not isinstance(s, Sequence) or len(s) != 2:
        raise ConfigError(
            f"{name}.student",
            tuple(s.shape) if isinstance(s, Tensor) else s,
            "a list of two student taps, e.g. [output.source, output.target]",
        )
    a, b = s
    if not (torch.is_tensor(a) and torch.is_tensor(b)) or a.shape[-1] != b.shape[-1]:
        raise ConfigError(
            f"{name}.student",
            [tuple(getattr(x, "shape", ())) for x in s],
            "two tensors with the same last (feature) dimension",
        )
    return _upcast(a), _upcast(b)


def gaussian_kernels(
    x: Tensor, y: Tensor, kernel_mul: float = 2.0, kernel_num: int = 5, bandwidth=None
) -> Tensor:
    """Sum of ``kernel_num`` Gaussian kernels over the pooled set ``z = [x; y]``:
    ``K_ij = sum_k exp(-||z_i - z_j||^2 / (b * kernel_mul^(k - kernel_num // 2)))``.

    ``b`` is ``bandwidth`` if given, else the mean squared distance over the off-diagonal
    pairs, held constant (no gradient), as the official ``guassian_kernel`` does with
    ``.data``; clamped at 1e-12 so identical samples give finite values."""
    z = torch.cat([x, y], 0)
    n = z.shape[0]
    d2 = (z[:, None, :] - z[None, :, :]).square().sum(-1)
    if bandwidth is None:
        b = (d2.detach().sum() / max(n * n - n, 1)).clamp_min(1e-12)
    else:
        b = torch.as_tensor(float(bandwidth), dtype=z.dtype, device=z.device)
    b = b / kernel_mul ** (kernel_num // 2)
    return sum(torch.exp(-d2 / (b * kernel_mul**k)) for k in range(kernel_num))


@LOSSES.register(
    "mmd",
    paper="Learning Transferable Features with Deep Adaptation Networks (multi-kernel MMD); "
    "used as BiDA's alignment loss",
    year=2015,
    inputs="logits",
    default_weight=0.1,
)
def mmd(
    s,
    t=None,
    *,
    kernel_mul: Pos = 2.0,
    kernel_num: Count = 5,
    bandwidth: Pos | None = None,
) -> Tensor:
    """Biased squared MMD with a multi-bandwidth Gaussian kernel (Long et al., DAN, ICML
    2015, Eq. 3; BiDA's ``MMD_loss``):
    ``MMD^2 = mean(K_XX) + mean(K_YY) - 2 mean(K_XY)`` with ``K`` from
    :func:`gaussian_kernels`. For equal set sizes this is the official
    ``mean(XX + YY - XY - YX)``; unequal sizes are allowed here.

    ``s``: ``[x, y]`` two taps of shape (..., D); all leading dims are samples of the two
    sets (the batch). Returns a scalar. ``bandwidth`` fixes the base bandwidth (the official
    ``fix_sigma``; None: data-driven, see :func:`gaussian_kernels`)."""
    x, y = _two("mmd", s)
    if isinstance(kernel_num, bool) or not isinstance(kernel_num, int) or kernel_num < 1:
        raise ConfigError("mmd.kernel_num", kernel_num, "a positive int")
    x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    if len(x) == 0 or len(y) == 0:
        raise ConfigError("mmd.student", (len(x), len(y)), "two non-empty sets of samples")
    x, y = (x, y.to(x.dtype)) if x.dtype == y.dtype else (x.float(), y.float())
    k = gaussian_kernels(x, y, kernel_mul, kernel_num, bandwidth)
    n = len(x)
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


@LOSSES.register(
    "soft_ce",
    paper="Cross-domain Hyperspectral Image Classification based on Bi-directional Domain "
    "Adaptation (bi-directional distillation)",
    year=2025,
    inputs="logits",
    default_weight=0.1,
)
def soft_ce(s, t=None, *, detach_teacher: bool = True, temperature: Pos = 1.0) -> Tensor:
    """Soft cross-entropy ``H(p_b, p_a) = -sum_k softmax(b/T)_k log softmax(a/T)_k`` per
    position: tap ``b`` (BiDA: a coupled-branch output) teaches tap ``a`` (the branch).

    ``s``: ``[a, b]`` two (..., K) logits. ``detach_teacher`` (default True, our choice): the
    teacher side is a constant, so the coupled branch teaches and is not pulled toward the
    branch it teaches; the official ``distill_loss`` does not detach it (False reproduces
    that: the gradient then also sharpens ``p_b`` toward the student's mode). Returns one
    value per position (the Term averages)."""
    a, b = _two("soft_ce", s)
    if not isinstance(detach_teacher, bool):
        raise ConfigError("soft_ce.detach_teacher", detach_teacher, "true or false")
    if detach_teacher:
        b = b.detach()
    return -(F.softmax(b / temperature, -1) * F.log_softmax(a / temperature, -1)).sum(-1)


@LOSSES.register(
    "ema_consistency",
    paper="Mean teachers are better role models (consistency to an EMA copy); BiDA's "
    "consistency term",
    year=2017,
    inputs="logits",
    default_weight=1.0,
    stateful=True,
)
class EMAConsistency(nn.Module):
    """``sum_d mean_{i,k} (softmax(z_d)_ik - softmax(z^ema_d)_ik)^2`` over domains ``d``:
    each student tap ``z_d`` (logits of batch key ``keys[d]``) against an exponential moving
    average copy of ``model`` run on the same batch key (Tarvainen & Valpola, NeurIPS 2017;
    BiDA's ``loss_con_src + loss_con_tar``).

    Official code vs ours: ``softmax_mse_loss`` is handed probabilities and applies a
    second softmax (flattening both towards uniform); we compare the probabilities once.
    Its sum / K / B is the mean over elements, as here. The EMA update after every optimiser
    step is the official one, ``a = min(1 - 1/(step + 1), decay)``,
    ``ema = a * ema + (1 - a) * live`` (buffers copied), with ``step`` counted in a buffer
    so a resumed run continues the same average. The copy runs in the loss module's mode
    (training: dropout on, as the official EMA net, which is never put in eval mode) and
    without gradient. It starts as a copy of ``model`` (the official one is a separately
    initialised net; the warm-up ``a`` makes the difference vanish after a few steps).

    State: ``ema.*`` and ``steps`` live in the distiller's ``loss_modules``, so checkpoints
    keep them and ``Distiller.export`` (the student) does not."""

    takes_batch = True

    def __init__(
        self,
        s_shapes,
        t_shapes=None,
        *,
        model: nn.Module | None = None,
        keys: list[str] | None = None,
        decay: Prob = 0.999,
        num_samples: int | None = None,
    ):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ConfigError(
                "ema_consistency.model",
                type(model).__name__,
                "the student network to average (the bida recipe passes student.net)",
            )
        n = len(s_shapes) if isinstance(s_shapes, list) else 1
        keys = list(keys or [])
        if len(keys) != n or not all(isinstance(k, str) and k for k in keys):
            raise ConfigError(
                "ema_consistency.keys", keys, f"{n} batch keys, one per student tap (its input)"
            )
        if isinstance(decay, bool) or not 0.0 <= float(decay) < 1.0:
            raise ConfigError("ema_consistency.decay", decay, "a number in [0, 1)")
        self.keys, self.decay = keys, float(decay)
        self.ema = copy.deepcopy(model)
        for m in self.ema.modules():  # hooks (taps) of the live model must not fire here
            m._forward_hooks.clear()
            m._forward_pre_hooks.clear()
        self.ema.requires_grad_(False)
        self._live = [model]  # a plain reference: not a submodule, not in the state dict
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, s, t=None, *, y=None, idx=None, batch=None) -> Tensor:
        zs = [s] if torch.is_tensor(s) else list(s)
        if batch is None:
            raise ConfigError("ema_consistency.batch", None, "the batch (the distiller passes it)")
        missing = [k for k in self.keys if k not in batch]
        if missing:
            raise ConfigError("ema_consistency.keys", missing[0], f"batch keys: {sorted(batch)}")
        total = None
        for z, key in zip(zs, self.keys):
            with torch.no_grad():
                ze = self.ema(batch[key])
            z = _upcast(z)
            part = (F.softmax(z, -1) - F.softmax(ze.to(z.dtype), -1)).square().mean()
            total = part if total is None else total + part
        return total

    @torch.no_grad()
    def on_step(self, distiller=None) -> None:
        """The EMA update (after every optimiser step)."""
        self.steps += 1
        a = min(1.0 - 1.0 / (int(self.steps) + 1), self.decay)
        live = self._live[0]
        for e, p in zip(self.ema.parameters(), live.parameters()):
            e.mul_(a).add_(p.detach().to(e.dtype), alpha=1.0 - a)
        for e, b in zip(self.ema.buffers(), live.buffers()):
            e.copy_(b)
