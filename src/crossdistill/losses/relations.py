"""Relational losses: match how samples relate to each other, not the features themselves.

Each loss flattens its inputs to (B, D) and compares B x B (or B x B x B) relation tensors, so
student and teacher feature sizes may differ and no projector is needed. They need B >= 2
(RKD's angle term B >= 3) to carry any signal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import LOSSES
from ..schema import NonNeg, Pos
from .features import _no_autocast, _pair


def _flat(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    s, t = _pair(s, t)
    return s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1)


def _rkd_distances(diff: Tensor) -> Tensor:
    """Pairwise Euclidean distances from (B,B,D) differences, divided by their mean off-diagonal.

    The diagonal is exactly 0; ``clamp_min`` keeps sqrt's gradient finite there.
    """
    off_diag = 1 - torch.eye(diff.shape[0], dtype=diff.dtype, device=diff.device)
    dist = diff.pow(2).sum(-1).clamp_min(1e-12).sqrt() * off_diag
    mean = dist.sum() / (dist > 0).sum().clamp_min(1)
    return dist / mean.clamp_min(1e-12)


def _rkd_angles(diff: Tensor) -> Tensor:
    """cos of the angle at vertex i between points j and k: <e_ij, e_ik> with unit e_ij."""
    unit = F.normalize(diff, dim=2)
    return unit @ unit.transpose(1, 2)


@LOSSES.register(
    "rkd",
    paper="Relational Knowledge Distillation",
    year=2019,
    inputs="embeddings",
    default_weight=1.0,
)
def rkd(
    s: Tensor, t: Tensor, *, distance_weight: NonNeg = 25.0, angle_weight: NonNeg = 50.0
) -> Tensor:
    """RKD-DA (Wonpyo Park, Dongju Kim, Yan Lu, Minsu Cho, CVPR 2019).

    Distance-wise: ``psi_D(i,j) = ||x_i - x_j|| / mu`` with ``mu`` the mean over the non-zero
    pairs; angle-wise: ``psi_A(i,j,k) = <e_ji, e_jk>`` with ``e_ji = (x_i - x_j)/||x_i - x_j||``.
    ``L = distance_weight * l_delta(psi_D^s, psi_D^t) + angle_weight * l_delta(psi_A^s, psi_A^t)``
    where ``l_delta`` is the Huber (smooth L1, beta=1) loss averaged over all B^2 resp. B^3
    entries. Because only relations are compared, the two dimensions may differ.

    Shapes: (B, ...) each, flattened to (B, D_s) and (B, D_t). Defaults 25 and 50 (the paper's
    lambda_D and lambda_A); recommended term weight 1.0. A batch of one yields 0.
    """
    s, t = _flat(s, t)
    if s.shape[0] < 2:
        return s.sum() * 0
    with _no_autocast(s):
        diff_s = s.unsqueeze(0) - s.unsqueeze(1)
        diff_t = t.unsqueeze(0) - t.unsqueeze(1)
        loss_d = F.smooth_l1_loss(_rkd_distances(diff_s), _rkd_distances(diff_t))
        loss_a = F.smooth_l1_loss(_rkd_angles(diff_s), _rkd_angles(diff_t))
    return distance_weight * loss_d + angle_weight * loss_a


def _sp_gram(x: Tensor) -> Tensor:
    """Row-L2-normalised batch similarity matrix G = normalise(F F^T): (B, D) -> (B, B)."""
    return F.normalize(x @ x.T, dim=1)


@LOSSES.register(
    "sp",
    paper="Similarity-Preserving Knowledge Distillation",
    year=2019,
    inputs="features",
    default_weight=3000.0,
)
def sp(s: Tensor, t: Tensor) -> Tensor:
    """Similarity-preserving KD (Frederick Tung, Greg Mori, ICCV 2019).

    ``G = Q Q^T`` on the flattened activations Q (B, D), each row L2-normalised;
    ``L = 1/B^2 ||G_t - G_s||_F^2`` (the paper's Eq. 4 for one layer pair).

    Shapes: (B, ...) each; dimensions may differ. Recommended term weight 3000 (the paper's
    gamma for CIFAR).
    """
    s, t = _flat(s, t)
    with _no_autocast(s):
        return (_sp_gram(t) - _sp_gram(s)).pow(2).sum() / s.shape[0] ** 2


def _pkt_conditional(x: Tensor, eps: float) -> Tensor:
    """Row-stochastic affinity: cosine similarity mapped to [0, 1], normalised per row."""
    x = x / (x.norm(dim=1, keepdim=True) + eps)
    sim = (x @ x.T + 1) / 2
    return sim / sim.sum(dim=1, keepdim=True)


@LOSSES.register(
    "pkt",
    paper="Learning Deep Representations with Probabilistic Knowledge Transfer",
    year=2018,
    inputs="embeddings",
    default_weight=30000.0 / 64,
)
def pkt(s: Tensor, t: Tensor, *, eps: Pos = 1e-7) -> Tensor:
    """Probabilistic knowledge transfer (Nikolaos Passalis, Anastasios Tefas, ECCV 2018).

    With the cosine kernel ``K(a, b) = (cos(a, b) + 1) / 2`` the conditional probabilities are
    ``p_{i|j} = K(x_i, x_j) / sum_k K(x_k, x_j)``, and
    ``L = 1/B sum_j sum_i p^t_{i|j} log( (p^t_{i|j} + eps) / (p^s_{i|j} + eps) )``,
    i.e. the per-row KL(teacher || student), summed over each row and averaged over rows.

    Normalisation note: the authors' code takes the mean over all B^2 entries instead, which
    is this value divided by B; their CIFAR weight 30000 at batch 64 therefore corresponds to
    the registered default 30000/64 = 468.75 here, and this form does not change with B.

    Shapes: (B, ...) each; dimensions may differ.
    """
    s, t = _flat(s, t)
    with _no_autocast(s):
        p_s = _pkt_conditional(s, eps)
        p_t = _pkt_conditional(t, eps)
        return (p_t * torch.log((p_t + eps) / (p_s + eps))).sum(dim=1).mean()
