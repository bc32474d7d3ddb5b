"""Prototype maths for ProC-KD (prototype-guided cross-task KD, 2022): soft assignment of
local features to K prototypes, their reconstruction, prototype fitting, and the
distillation loss toward prototype reconstructions.

No official code exists; every form here is our inference from the abstract (say so when
citing). Local features are vectors ``x`` of dimension D (a (B, D, H, W) map gives B*H*W
of them), prototypes a (K, D) matrix ``P``:

* distance per dimension ``d_k(x) = ||x - p_k||^2 / D`` (so ``tau`` does not depend on D);
* soft assignment ``a_k(x) = softmax_k(-d_k(x) / tau)``;
* reconstruction ``r(x) = sum_k a_k(x) p_k`` (a point of the prototypes' convex hull);
* fitting: ``min_P mean_x ||x - r(x)||^2 / D`` (soft k-means by gradient), started from K
  distinct seeded samples;
* augmentation: student queries ``q`` attend over the prototypes,
  ``attend(q, W_k P, W_v P) = softmax(q (W_k P)^T / sqrt(d)) W_v P`` (:func:`attend`);
* distillation (the ``proc_kd`` loss): ``mean over positions ||phi(s) - r(t)||^2 / D`` with
  ``phi(s)`` the student's local feature through the term's projector and ``t`` the
  teacher's local feature at the same position, ``r(t)`` constant: the student learns the
  part of the teacher's local structure the prototypes carry, not the teacher's
  task-specific residual ``t - r(t)`` (FitNet's plain ``||phi(s) - t||^2`` learns both).
  ``target="self"`` uses ``r(phi(s))`` detached instead (the student's own feature pulled
  to its nearest prototype mix; no teacher feature needed at that position).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import LOSSES
from ..schema import Pos

TARGETS = ("teacher", "self")


def _check_protos(x: Tensor, protos: Tensor, field: str) -> None:
    if protos.dim() != 2 or protos.shape[0] < 1:
        raise ConfigError(f"{field}.prototypes", tuple(protos.shape), "a (K, D) matrix, K >= 1")
    if x.shape[-1] != protos.shape[1]:
        raise ConfigError(f"{field}.inputs", f"features of dim {x.shape[-1]}",
                          f"the prototypes' dim {protos.shape[1]}")


def _check_tau(tau: float, field: str) -> None:
    if not (isinstance(tau, (int, float)) and tau > 0 and tau == tau):
        raise ConfigError(f"{field}.tau", tau, "a positive temperature")


def to_tokens(x: Tensor) -> Tensor:
    """(B, D, H, W) maps -> (B, H*W, D) local features; (B, N, D) and (N, D) pass through."""
    if x.dim() == 4:
        return x.flatten(2).transpose(1, 2)
    if x.dim() in (2, 3):
        return x
    raise ConfigError("prototypes.inputs", tuple(x.shape),
                      "local features as (B, D, H, W) maps or (B, N, D) / (N, D) tokens")


def soft_assign(x: Tensor, protos: Tensor, tau: float = 0.1) -> Tensor:
    """(..., D) features, (K, D) prototypes -> (..., K): ``softmax_k(-||x - p_k||^2 / (D tau))``."""
    _check_protos(x, protos, "prototypes")
    _check_tau(tau, "prototypes")
    # ||x - p||^2 = ||x||^2 - 2 x.p + ||p||^2, without the (..., K, D) difference tensor
    d2 = (x.pow(2).sum(-1, keepdim=True) - 2 * x @ protos.t() + protos.pow(2).sum(-1))
    d2 = d2.clamp_min(0) / x.shape[-1]  # (..., K), squared distance / D
    return F.softmax(-d2 / tau, dim=-1)


def reconstruct(x: Tensor, protos: Tensor, tau: float = 0.1) -> Tensor:
    """``r(x) = sum_k a_k(x) p_k`` (..., D)."""
    return soft_assign(x, protos, tau) @ protos


def fit_loss(x: Tensor, protos: Tensor, tau: float = 0.1) -> Tensor:
    """The prototypes' reconstruction error ``mean_x ||x - r(x)||^2 / D`` (scalar)."""
    return (x - reconstruct(x, protos, tau)).pow(2).mean()


def fit_prototypes(
    x: Tensor,
    k: int,
    *,
    tau: float = 0.1,
    steps: int = 200,
    lr: float = 0.05,
    batch: int = 8192,
    seed: int = 0,
) -> Tensor:
    """K prototypes for the (N, D) features ``x`` (constant): init at K distinct seeded rows,
    then ``steps`` Adam steps on :func:`fit_loss` over seeded mini-batches of ``batch`` rows
    (all rows when fewer). Returns a (K, D) tensor, detached."""
    if x.dim() != 2 or len(x) < 1:
        raise ConfigError("prototypes.features", tuple(x.shape), "an (N, D) matrix, N >= 1")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(x):
        raise ConfigError("prototypes.k", k, f"an int in 1..{len(x)} (the number of features)")
    _check_tau(tau, "prototypes")
    for name, v in (("steps", steps), ("batch", batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (name == "batch" and v < 1):
            raise ConfigError(f"prototypes.{name}", v, "a non-negative int (batch >= 1)")
    x = x.detach()
    g = torch.Generator().manual_seed(int(seed))
    protos = x[torch.randperm(len(x), generator=g)[:k]].clone().requires_grad_(True)
    opt = torch.optim.Adam([protos], lr=lr)
    for _ in range(steps):
        rows = x if len(x) <= batch else x[torch.randint(len(x), (batch,), generator=g)]
        opt.zero_grad(set_to_none=True)
        fit_loss(rows, protos, tau).backward()
        opt.step()
    return protos.detach()


def attend(q: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """Task-adaptive retrieval (ProC-KD's feature augmentation, our form): queries (..., d)
    attend over K prototype keys (K, d); returns ``softmax(q keys^T / sqrt(d)) values``
    (..., C), a mix of the (K, C) prototype values per query."""
    if keys.dim() != 2 or values.dim() != 2 or keys.shape[0] != values.shape[0]:
        raise ConfigError("prototypes.attention", (tuple(keys.shape), tuple(values.shape)),
                          "keys (K, d) and values (K, C) with the same K")
    if q.shape[-1] != keys.shape[1]:
        raise ConfigError("prototypes.attention", f"queries of dim {q.shape[-1]}",
                          f"the keys' dim {keys.shape[1]}")
    w = F.softmax(q @ keys.t() / keys.shape[1] ** 0.5, dim=-1)
    return w @ values


def proto_distill(s: Tensor, t: Tensor | None, protos: Tensor, tau: float = 0.1,
                  target: str = "teacher") -> Tensor:
    """Per-sample ProC-KD distillation ``mean_positions ||s - r(.)||^2 / D`` (B,): ``s`` the
    projected student local features, ``t`` the teacher's, same shape ((B, D, H, W) or
    (B, N, D)); the target ``r(t)`` (``target="teacher"``) or ``r(s)`` (``"self"``) is
    constant."""
    if target not in TARGETS:
        raise ConfigError("proc_kd.target", target, f"one of {', '.join(TARGETS)}")
    if target == "teacher":
        if t is None or s.shape != t.shape:
            raise ConfigError(
                "proc_kd.inputs",
                f"student {tuple(s.shape)} vs teacher {None if t is None else tuple(t.shape)}",
                "equal shapes: give the term a projector (conv1x1 / auto) onto the teacher's "
                "local features",
            )
    s_tok = to_tokens(s)
    ref = to_tokens(t if target == "teacher" else s).detach()
    with torch.no_grad():
        goal = reconstruct(ref.to(protos.dtype), protos, tau).to(s_tok.dtype)
    d = (s_tok - goal).pow(2).mean(-1)  # (B, N)
    return d.mean(-1) if d.dim() == 2 else d


@LOSSES.register(
    "proc_kd",
    paper="Prototype-guided Cross-task Knowledge Distillation for Large-scale Models",
    year=2022,
    inputs="features",
    default_weight=1.0,
    stateful=True,
)
class ProCKDLoss(nn.Module):
    """ProC-KD's distillation toward prototype reconstructions (:func:`proto_distill`; the
    form is our inference, module docstring), with the frozen (K, D) ``prototypes`` kept as
    a buffer (they move with the distiller and are saved in its checkpoints). The student
    tap goes through the term's projector onto the teacher tap's shape. Per-sample values:
    the Term averages them (with its mask)."""

    def __init__(
        self,
        s_shape,
        t_shape=None,
        *,
        num_samples=None,
        prototypes: Tensor,
        tau: Pos = 0.1,
        target: Literal["teacher", "self"] = "teacher",
    ):
        super().__init__()
        p = torch.as_tensor(prototypes).detach().float()
        if p.dim() != 2:
            raise ConfigError("proc_kd.prototypes", tuple(p.shape), "a (K, D) matrix")
        if target not in TARGETS:
            raise ConfigError("proc_kd.target", target, f"one of {', '.join(TARGETS)}")
        if target == "teacher" and t_shape is None:
            raise ConfigError("proc_kd.teacher", None, "the teacher's local-feature tap")
        d = int(s_shape[1]) if len(s_shape) == 4 else int(s_shape[-1])  # (B, D, H, W) / (B, N, D)
        if d != p.shape[1]:
            raise ConfigError("proc_kd.student", tuple(s_shape),
                              f"local features of dim {p.shape[1]} (the prototypes'); give "
                              "the term a projector onto the teacher's local features")
        if target == "teacher" and tuple(t_shape[1:]) != tuple(s_shape[1:]):
            raise ConfigError("proc_kd.inputs", f"student {tuple(s_shape)} vs teacher "
                              f"{tuple(t_shape)}", "equal per-sample shapes (a projector)")
        self.register_buffer("prototypes", p)
        self.tau, self.target = float(tau), target

    def forward(self, s, t=None, *, y=None, idx=None, **_) -> Tensor:
        return proto_distill(s, t, self.prototypes, self.tau, self.target)


__all__ = ["ProCKDLoss", "TARGETS", "attend", "fit_loss", "fit_prototypes", "proto_distill",
           "reconstruct", "soft_assign", "to_tokens"]
