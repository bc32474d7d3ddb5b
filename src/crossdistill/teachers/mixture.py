"""Mixtures of teachers: one target from several teachers' logits, weighted per sample.

Modes (``w`` are per-sample weights over the M teachers, summing to one):

* ``fixed``: constant weights (default uniform).
* ``entropy``: ``w_i(x) = softmax_i(-H(p_i(x)) / tau)``; confident (low-entropy) teachers
  count more, as in confidence-aware multi-teacher KD (Zhang et al., "Confidence-Aware
  Multi-Teacher Knowledge Distillation", ICASSP 2022, which weights by CE to the label).
* ``true_class``: ``w_i(x) = softmax_i(p_i(x)[y] / tau)`` on labelled samples; unlabelled
  ones (``y = -1``) fall back to the entropy rule.
* ``router``: a small MLP reads the teachers' probabilities and outputs ``w``; it is trained
  with the student by the auxiliary loss ``CE(mixture, y)`` on labelled samples (the
  mixture should itself classify well); the student's KD target is the detached mixture.

The combined target is ``log sum_i w_i softmax(z_i)`` (``space="prob"``: a mixture of the
teachers' distributions, returned as log-probabilities, i.e. valid logits) or
``sum_i w_i z_i`` (``space="logit"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

MODES = ("fixed", "entropy", "true_class", "router")


def mixture_weights_entropy(probs: torch.Tensor, tau: float) -> torch.Tensor:
    """(B, M, C) probabilities -> (B, M) weights, softmax of negative entropy / tau."""
    ent = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
    return F.softmax(-ent / tau, dim=1)


def mixture_weights_true_class(probs: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    labelled = y >= 0
    p_y = probs.gather(2, y.clamp_min(0)[:, None, None].expand(-1, probs.shape[1], 1))[..., 0]
    w = F.softmax(p_y / tau, dim=1)
    return torch.where(labelled[:, None], w, mixture_weights_entropy(probs, tau))


def combine(logits: torch.Tensor, w: torch.Tensor, space: str = "prob") -> torch.Tensor:
    """(B, M, C) logits and (B, M) weights -> (B, C) mixed logits."""
    if space == "logit":
        return (w[..., None] * logits).sum(1)
    probs = F.softmax(logits.float(), dim=-1)
    return (w[..., None] * probs).sum(1).clamp_min(1e-12).log()


class Mixture(nn.Module):
    """Combine named teachers' logits into one target (see the module docstring)."""

    name = "mix"

    def __init__(
        self,
        mode: str = "fixed",
        *,
        weights: dict[str, float] | None = None,
        tau: float = 1.0,
        space: str = "prob",
        router_hidden: int = 32,
    ):
        super().__init__()
        if mode not in MODES:
            raise ConfigError("mixture.mode", mode, f"allowed: {', '.join(MODES)}")
        if space not in ("prob", "logit"):
            raise ConfigError("mixture.space", space, "allowed: prob, logit")
        if tau <= 0:
            raise ConfigError("mixture.tau", tau, "must be > 0")
        if weights is not None and (
            any(v < 0 for v in weights.values()) or not sum(weights.values())
        ):
            raise ConfigError("mixture.weights", weights, "non-negative, not all zero")
        self.mode, self.fixed, self.tau, self.space = mode, weights, tau, space
        self.router_hidden = router_hidden
        self.router: nn.Module | None = None
        self.members: list[str] = []

    def setup(self, members: list[str], num_classes: int) -> None:
        """Called by the distiller once the teachers and the class count are known."""
        self.members = list(members)
        if self.fixed is not None and set(self.fixed) != set(members):
            raise ConfigError(
                "mixture.weights",
                sorted(self.fixed),
                f"give one weight per teacher: {', '.join(members)}",
            )
        if self.mode == "router" and self.router is None:
            m = len(members)
            self.router = nn.Sequential(
                nn.Linear(m * num_classes, self.router_hidden),
                nn.ReLU(),
                nn.Linear(self.router_hidden, m),
            )

    def weights(self, logits: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        b, m, _ = logits.shape
        probs = F.softmax(logits.float(), dim=-1)
        if self.mode == "fixed":
            raw = torch.tensor([self.fixed[k] for k in self.members] if self.fixed else [1.0] * m)
            return (raw / raw.sum()).to(logits.device).expand(b, m)
        if self.mode == "entropy":
            return mixture_weights_entropy(probs, self.tau)
        if self.mode == "true_class":
            if y is None:
                return mixture_weights_entropy(probs, self.tau)
            return mixture_weights_true_class(probs, y, self.tau)
        return F.softmax(self.router(probs.flatten(1)), dim=1)

    def forward(self, logits: dict[str, torch.Tensor], y: torch.Tensor | None = None):
        """-> (mixed logits (B, C), weights (B, M), auxiliary router loss or None)."""
        z = torch.stack([logits[k].float() for k in self.members], dim=1)
        w = self.weights(z, y)
        mixed = combine(z, w, self.space)
        aux = None
        if self.mode == "router" and y is not None and (y >= 0).any():
            aux = F.cross_entropy(mixed, y, ignore_index=-100)
        return mixed, w, aux
