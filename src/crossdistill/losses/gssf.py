"""GSSF: the generalised structural sparse similarity, as a learnable metric.

Diao et al., "GSSF: Generalized Structural Sparse Function for Deep Cross-modal Metric
Learning" (IEEE TIP, 2024). No official code has been released (the repository holds a
README only), so beyond the abstract everything here is our reading. For two embeddings
``x, y`` of ``D`` channels split into ``K`` contiguous groups of ``D / K`` channels
(``x_(k)`` the k-th group):

``s(x, y) = sum_c w_c x_c y_c  +  sum_k x_(k)^T B_k y_(k)``

a diagonal term (learnable channel weights ``w``) plus a block-diagonal term (one learnable
``D/K x D/K`` matrix ``B_k`` per group). At init ``w = 1`` and ``B_k = 0``: the plain dot
product, so on unit-normalised inputs GSSF starts as the cosine. The paper's "dynamic"
variant (weights generated from the pair) is not implemented: the weights here are static
parameters.

``s`` is bilinear, ``s(x, y) = x^T M y`` with ``M = diag(w) + blockdiag(B_1..B_K)``, so a
gallery can be embedded once as ``M y`` (:meth:`GSSF.transform`) and searched by plain dot
products; that is how a :class:`~crossdistill.models.pair.PairDual` with ``metric="gssf"``
exposes it to the retrieval task (``similarity: dot``).

Two uses:

- in place of the cosine in ITC (InfoNCE): the metric lives in the student model
  (``PairDual(metric="gssf")``), because it is needed again at test time;
- ``relation_kd``: the kernel of a contrastive relational KD term between student and
  teacher embeddings, ``R_ij = k(s_i, t_j) / tau``, each student embedding contrasted
  against the teacher's embeddings of the batch (the positive: the same sample), both ways
  and for both sides of a pair; ``k`` = cosine or GSSF on unit rows (the GSSF parameters
  train with the student and are dropped afterwards). The form of this KD term (a CRD-style
  InfoNCE over the cross-model relation matrix) is our inference from "the relation kernel
  between student and teacher embeddings".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import LOSSES
from ..schema import Temperature, Width

KERNELS = ("cosine", "gssf")


def _check_groups(dim: int, groups: int, field: str) -> None:
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or dim % groups:
        raise ConfigError(field, groups, f"a positive divisor of the embedding size {dim}")


def gssf_scores(x: Tensor, y: Tensor, w: Tensor, blocks: Tensor) -> Tensor:
    """``S_ij = s(x_i, y_j)`` for ``x`` (N, D), ``y`` (M, D), ``w`` (D,), ``blocks``
    (K, D/K, D/K): ``(x * w) y^T + sum_k x_(k) B_k y_(k)^T`` (N, M)."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ConfigError("gssf.inputs", f"{tuple(x.shape)} vs {tuple(y.shape)}",
                          "two (N, D) and (M, D) matrices of one embedding size")
    d = x.shape[1]
    k = blocks.shape[0]
    if w.shape != (d,) or blocks.shape != (k, d // k, d // k) or d % k:
        raise ConfigError("gssf.params", (tuple(w.shape), tuple(blocks.shape)),
                          f"w of ({d},) and K blocks of (D/K, D/K) with K dividing {d}")
    diag = (x * w) @ y.T
    xg, yg = x.view(len(x), k, d // k), y.view(len(y), k, d // k)
    block = torch.einsum("nkc,kce,mke->nm", xg, blocks, yg)
    return diag + block


class GSSF(nn.Module):
    """The learnable metric (module docstring): ``forward(x, y)`` gives the (N, M) matrix
    ``s(x_i, y_j)``; :meth:`transform` gives ``M y`` (so ``x @ transform(y).T`` is the same
    matrix); :meth:`pair` scores aligned rows."""

    def __init__(self, dim: int, groups: int = 8):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ConfigError("gssf.dim", dim, "a positive embedding size")
        _check_groups(dim, groups, "gssf.groups")
        self.dim, self.groups = dim, groups
        self.w = nn.Parameter(torch.ones(dim))
        self.blocks = nn.Parameter(torch.zeros(groups, dim // groups, dim // groups))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return gssf_scores(x, y, self.w, self.blocks)

    def transform(self, y: Tensor) -> Tensor:
        """``M y`` for rows ``y`` (..., D): ``w * y + [B_k y_(k)]_k``."""
        if y.shape[-1] != self.dim:
            raise ConfigError("gssf.inputs", tuple(y.shape), f"rows of {self.dim} channels")
        g = y.reshape(*y.shape[:-1], self.groups, self.dim // self.groups)
        return self.w * y + torch.einsum("kce,...ke->...kc", self.blocks, g).reshape(y.shape)

    def pair(self, x: Tensor, y: Tensor) -> Tensor:
        """``s(x_i, y_i)`` for aligned rows."""
        return (x * self.transform(y)).sum(-1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, groups={self.groups}"


def _contrast(r: Tensor) -> Tensor:
    """``1/2 [CE(R, diag) + CE(R^T, diag)]`` of a square relation matrix."""
    target = torch.arange(len(r), device=r.device)
    return 0.5 * (F.cross_entropy(r, target) + F.cross_entropy(r.T, target))


def relation_kd_loss(s: list[Tensor], t: list[Tensor], kernels, temperature: float) -> Tensor:
    """Mean over sides of the symmetric InfoNCE of ``R_ij = k(unit s_i, unit t_j) / tau``;
    ``kernels``: one callable ``(x, y) -> (N, M)`` per side."""
    out = []
    for si, ti, k in zip(s, t, kernels):
        dt = torch.promote_types(si.dtype, torch.float32)
        out.append(_contrast(k(F.normalize(si.to(dt), dim=-1),
                               F.normalize(ti.detach().to(dt), dim=-1)) / temperature))
    return torch.stack(out).mean()


def _cosine(x: Tensor, y: Tensor) -> Tensor:
    return x @ y.T  # unit rows


@LOSSES.register(
    "relation_kd",
    paper="GSSF: Generalized Structural Sparse Function for Deep Cross-modal Metric Learning "
    "(relation kernel; CRD-style contrastive form: inference)",
    year=2024,
    inputs="embeddings",
    default_weight=1.0,
    stateful=True,
)
class RelationKD(nn.Module):
    """``student=[tap, ...]``, ``teacher=[tap, ...]`` (one pair of taps per side, (B, D)
    each, student and teacher of one width D): ``mean_side 1/2 [CE(R, diag) + CE(R^T,
    diag)]``, ``R_ij = k(s_i, t_j) / temperature`` on unit rows; ``kernel``: ``cosine`` or
    ``gssf`` (one learnable :class:`GSSF` per side, ``groups`` channel groups)."""

    def __init__(self, s_shapes, t_shapes, *, num_samples=None, kernel: str = "gssf",
                 groups: Width = 8, temperature: Temperature = 0.1):
        super().__init__()
        if kernel not in KERNELS:
            raise ConfigError("relation_kd.kernel", kernel, f"one of {', '.join(KERNELS)}")
        s_shapes = [s_shapes] if isinstance(s_shapes[0], int) else list(s_shapes)
        t_shapes = [t_shapes] if t_shapes and isinstance(t_shapes[0], int) else list(t_shapes or [])
        if not t_shapes or len(s_shapes) != len(t_shapes):
            raise ConfigError("relation_kd.teacher", t_shapes,
                              f"one teacher tap per student tap ({len(s_shapes)})")
        for i, (a, b) in enumerate(zip(s_shapes, t_shapes)):
            if len(a) != 2 or len(b) != 2 or a[-1] != b[-1]:
                raise ConfigError(f"relation_kd.student.{i}", (tuple(a), tuple(b)),
                                  "student and teacher embeddings (B, D) of one width D "
                                  "(give the student a projection to the teacher's width)")
        self.kernel, self.temperature = kernel, float(temperature)
        if kernel == "gssf":
            self.metrics = nn.ModuleList([GSSF(int(a[-1]), groups) for a in s_shapes])

    def forward(self, s, t, **_) -> Tensor:
        s = [s] if torch.is_tensor(s) else list(s)
        t = [t] if torch.is_tensor(t) else list(t)
        kernels = list(self.metrics) if self.kernel == "gssf" else [_cosine] * len(s)
        return relation_kd_loss(s, t, kernels, self.temperature)
