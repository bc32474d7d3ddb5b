"""Ranking losses of retrieval distillation: a cross-encoder teacher's in-batch scores.

A dual-encoder student embeds both sides of each pair (``s = [a, b]``, (B, D) each); its
score matrix is ``S_ij = sim(a_i, b_j) / tau`` (``similarity``: ``cosine`` on unit rows, or
``dot`` for outputs that carry their own metric, e.g. GSSF's ``(x, M y)``). The teacher
(a cross-encoder, :class:`~crossdistill.models.pair.CrossEncoder`) gives the (B, B) matrix
``T_ij`` of every ``a_i`` against every ``b_j`` of the batch as its logits, so every loss
here is a function of two matrices whose diagonal holds the positives. Rows are the
``a -> b`` queries, columns the ``b -> a`` ones; every loss averages both directions. Under
torch.distributed ``itc`` contrasts against the keys of every rank; the distillation terms
act on each rank's local batch (the teacher scores the local batch).

- ``itc``: the symmetric InfoNCE (CLIP, Radford et al. 2021): ``1/2 [CE(S, diag) + CE(S^T,
  diag)]``, the keys gathered across ranks as :mod:`~crossdistill.losses.similarity` does.
- ``pair_nce``: the same on a cross-encoder's own score matrix (training a cross-encoder
  with in-batch negatives).
- ``cprd``: contrastive partial ranking distillation (Chen et al., CVPR 2024). For query
  ``i`` the student's ``K`` hardest negatives ``N_i`` (top-K of ``S_ij``, ``j != i``; the
  choice is not differentiated) are put in the teacher's order ``j_1, ..., j_K`` (``T``
  descending); ``L_i = 1/(K-1) sum_{m<K} -log( e^{S_{i j_m}} / sum_{n>=m} e^{S_{i j_n}} )``
  (the Plackett-Luce likelihood of the teacher's order among the hard negatives; the last
  term is always 0 and is left out of the mean; a batch of ``B <= K`` uses its ``B - 1``).
  The positive and the easy negatives are left out, so only the teacher's order among hard
  negatives transfers; ``tau`` is the ITC
  one, so the two terms pull on one scale. No official code exists: this form is our
  reading of the paper's description.
- ``rank_kd``: full-list ranking KD, ListNet (Cao et al., ICML 2007) as KL: ``KL(softmax(T_i
  / T) || softmax(S_i))`` over every candidate of the batch, rows and columns.
- ``score_kd``: point-wise score KD, ``tau^2 mean (S_ij - T_ij)^2`` over the whole matrix
  (MSE to the teacher's raw scores, the score-distillation baseline; the ``tau^2`` factor
  keeps its gradient on the similarities at ITC's scale, as ``T^2`` does in KD: it is
  ``mean (sim_ij - tau T_ij)^2``).
- ``dcd``: dynamic contrastive distillation (Rao et al., 2022) for a cross-encoder student
  (``s`` its (B, B) in-batch score matrix). Per query, ``n`` candidates: the positive and
  the ``n - 1`` negatives the teacher scores highest (``mine="teacher"``) or ``n - 1`` in-batch
  neighbours (``mine="random"``: the batch is a random draw, so these are random negatives),
  the *same* candidates gathered from the student's and the teacher's matrices.
  ``L = a T^2 sum_i r_i MSE(s_i / T, t_i / T) + (1 - a) sum_i w_i BCE(s_i, e_0)``, ``e_0`` the
  positive-first one-hot, ``w_i = H(softmax(t_i)) / sum_j H(softmax(t_j))`` (teacher entropy
  share: uncertain queries weigh more in the hard loss) and ``r_i = softmax_i((1 - w_i)^2)``
  (the distillation weights of the official code). Two faults of the official code are not
  copied: (1) it multiplies ``r_i`` into ``F.mse_loss(...)``, already a scalar mean, and sums,
  so ``r`` (summing to 1) drops out and the distillation term is unweighted; here ``MSE_i``
  is per query and ``r_i`` weighs it (note that ``r`` is a softmax of values in ``[0, 1]``,
  so it stays close to uniform); (2) its mining keeps the teacher's top-8 scores in the
  teacher's sorted order while the student's list is rebuilt positive-first, so the two
  lists disagree whenever the teacher does not rank the positive first; here both are
  gathered at one index list. ``weights="uniform"`` sets ``w_i = r_i = 1 / B``: plain score KD.
  DCD trains one direction (images against drawn texts); here rows and columns both
  (the evaluation re-ranks both ways).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..registry import LOSSES
from ..schema import Count, Pos, Prob, Temperature
from .similarity import gather

SIMILARITIES = ("cosine", "dot")
MINING = ("teacher", "random")
WEIGHTS = ("dynamic", "uniform")


def _two(name: str, s) -> tuple[Tensor, Tensor]:
    if torch.is_tensor(s) or not isinstance(s, (list, tuple)) or len(s) != 2:
        raise ConfigError(f"{name}.student", type(s).__name__,
                          "two student taps: the query side's and the key side's embeddings")
    a, b = s
    if a.dim() != 2 or a.shape != b.shape or len(a) < 2:
        raise ConfigError(f"{name}.student", f"{tuple(a.shape)} vs {tuple(b.shape)}",
                          "two (B, D) embeddings of one size, B >= 2")
    return a, b


def _square(name: str, m: Tensor | None, n: int, what: str) -> Tensor:
    if isinstance(m, (list, tuple)) and len(m) == 1:  # one tap given as a list
        m = m[0]
    if m is None or not torch.is_tensor(m) or m.dim() != 2 or m.shape != (n, n):
        shape = tuple(m.shape) if torch.is_tensor(m) else m
        raise ConfigError(f"{name}.{what}", shape, f"a ({n}, {n}) in-batch score matrix "
                          "(every a_i against every b_j; positives on the diagonal)")
    return m.to(torch.promote_types(m.dtype, torch.float32))


def _check_sim(name: str, similarity: str) -> None:
    if similarity not in SIMILARITIES:
        raise ConfigError(f"{name}.similarity", similarity, f"one of {', '.join(SIMILARITIES)}")


def sim_matrix(a: Tensor, b: Tensor, temperature: float, similarity: str = "cosine") -> Tensor:
    """``S_ij = sim(a_i, b_j) / tau`` in float32 at least."""
    dt = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    a, b = a.to(dt), b.to(dt)
    if similarity == "cosine":
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    return a @ b.T / temperature


def symmetric_ce(m: Tensor) -> Tensor:
    """``1/2 [CE(m, diag) + CE(m^T, diag)]`` of a square matrix."""
    target = torch.arange(m.shape[0], device=m.device)
    return 0.5 * (F.cross_entropy(m, target) + F.cross_entropy(m.T, target))


@LOSSES.register("itc", paper="Learning Transferable Visual Models From Natural Language "
                 "Supervision (CLIP; image-text contrastive loss)", year=2021,
                 inputs="embeddings", default_weight=1.0)
def itc(s, t=None, *, temperature: Temperature = 0.05, similarity: str = "cosine") -> Tensor:
    """Symmetric InfoNCE of ``s = [a, b]`` (module docstring) at a fixed ``temperature``;
    under torch.distributed the keys of every rank are gathered."""
    _check_sim("itc", similarity)
    a, b = _two("itc", s)
    ga, start = gather(a)
    gb, _ = gather(b)
    target = torch.arange(len(a), device=a.device) + start
    return 0.5 * (F.cross_entropy(sim_matrix(a, gb, temperature, similarity), target)
                  + F.cross_entropy(sim_matrix(b, ga, temperature, similarity), target))


@LOSSES.register("pair_nce", paper="Kim et al., ViLT (image-text matching with in-batch "
                 "negatives as a listwise contrastive loss)", year=2021, inputs="logits",
                 default_weight=1.0)
def pair_nce(s: Tensor, t=None, *, temperature: Pos = 1.0) -> Tensor:
    """``s``: a cross-encoder's (B, B) in-batch score matrix; symmetric CE to the diagonal
    of ``s / temperature``."""
    m = _square("pair_nce", s, len(s) if torch.is_tensor(s) else 0, "student")
    return symmetric_ce(m / temperature)


def partial_rank(S: Tensor, T: Tensor, k: int) -> Tensor:
    """CPRD's loss of the rows of ``S`` (N, N) under the teacher's ``T`` (module docstring):
    mean over rows of the Plackett-Luce NLL of the teacher's order among each row's top-k
    student-scored negatives."""
    n = S.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=S.device)
    neg = S.detach().masked_fill(eye, float("-inf"))
    hard = neg.topk(k, dim=1).indices  # (N, k): the student's hardest negatives
    t_hard = T.gather(1, hard)
    order = t_hard.argsort(dim=1, descending=True, stable=True)
    s_sorted = S.gather(1, hard.gather(1, order))  # the teacher's order, student's scores
    # log sum_{n >= m} e^{s_n}: a reversed cumulative logsumexp
    tail = s_sorted.flip(1).logcumsumexp(1).flip(1)
    return (tail - s_sorted)[:, :-1].mean()


@LOSSES.register("cprd", paper="Chen et al., Contrastive Partial Ranking Distillation "
                 "(CPRD), CVPR", year=2024, inputs="embeddings", default_weight=1.0)
def cprd(s, t, *, temperature: Temperature = 0.05, k: Count = 8,
         similarity: str = "cosine") -> Tensor:
    """``s = [a, b]`` student embeddings, ``t`` the teacher's (B, B) scores: CPRD's partial
    ranking loss (module docstring), ``1/2 (rows + columns)``."""
    _check_sim("cprd", similarity)
    a, b = _two("cprd", s)
    n = len(a)
    T = _square("cprd", t, n, "teacher")
    if k < 2 or n < 3:
        raise ConfigError("cprd.k", k, f">= 2 hard negatives per query, in a batch of >= 3 "
                          f"(batch {n})")
    k = min(k, n - 1)  # a short (last) batch ranks every negative it has
    S = sim_matrix(a, b, temperature, similarity)
    return 0.5 * (partial_rank(S, T, k) + partial_rank(S.T, T.T, k))


@LOSSES.register("rank_kd", paper="Cao et al., Learning to Rank: From Pairwise Approach to "
                 "Listwise Approach (ListNet), ICML", year=2007, inputs="embeddings",
                 default_weight=1.0)
def rank_kd(s, t, *, temperature: Temperature = 0.05, teacher_temperature: Temperature = 1.0,
            similarity: str = "cosine") -> Tensor:
    """ListNet as KL over the full candidate list of the batch, rows and columns:
    ``KL(softmax(T / teacher_temperature) || softmax(S))``."""
    _check_sim("rank_kd", similarity)
    a, b = _two("rank_kd", s)
    T = _square("rank_kd", t, len(a), "teacher") / teacher_temperature
    S = sim_matrix(a, b, temperature, similarity)

    def kl(x: Tensor, y: Tensor) -> Tensor:
        p = F.log_softmax(y, -1)
        return (p.exp() * (p - F.log_softmax(x, -1))).sum(-1).mean()

    return 0.5 * (kl(S, T) + kl(S.T, T.T))


@LOSSES.register("score_kd", paper="point-wise score distillation: MSE to a cross-encoder's "
                 "scores (Hofstaetter et al., Margin-MSE baseline)", year=2020,
                 inputs="embeddings", default_weight=1.0)
def score_kd(s, t, *, temperature: Temperature = 0.05, similarity: str = "cosine") -> Tensor:
    """``tau^2 mean_ij (S_ij - T_ij)^2`` over the (B, B) matrix."""
    _check_sim("score_kd", similarity)
    a, b = _two("score_kd", s)
    T = _square("score_kd", t, len(a), "teacher")
    return temperature**2 * F.mse_loss(sim_matrix(a, b, temperature, similarity), T)


def dcd_candidates(n: int, m: int, T: Tensor | None, mine: str, device=None) -> Tensor:
    """(n, m) candidate columns per row of an (n, n) matrix: the positive (the diagonal)
    first, then ``m - 1`` negatives: the teacher's highest-scored (``mine="teacher"``, in
    the teacher's order) or the next rows of the batch (``"random"``)."""
    rows = torch.arange(n, device=device)
    if mine == "teacher":
        neg = T.detach().masked_fill(torch.eye(n, dtype=torch.bool, device=T.device),
                                     float("-inf"))
        others = neg.topk(m - 1, dim=1).indices
    else:
        others = (rows[:, None] + torch.arange(1, m, device=device)) % n
    return torch.cat([rows[:, None], others], 1)


def dcd_list_loss(s: Tensor, t: Tensor | None, *, alpha: float, temperature: float,
                  weights: str) -> Tensor:
    """DCD on aligned lists ``s``, ``t`` (B, n), positive first (module docstring)."""
    target = torch.zeros_like(s)
    target[:, 0] = 1
    bce = F.binary_cross_entropy_with_logits(s, target, reduction="none").mean(1)
    b = len(s)
    if t is None:
        return bce.mean()
    if weights == "dynamic":
        p = F.softmax(t.float(), -1)
        h = -(p * p.clamp_min(1e-12).log()).sum(-1)
        w = h / h.sum().clamp_min(1e-12)
        r = F.softmax((1 - w) ** 2, 0)
    else:
        w = r = torch.full((b,), 1.0 / b, device=s.device)
    mse = ((s / temperature - t / temperature) ** 2).mean(1)
    return alpha * temperature**2 * (r * mse).sum() + (1 - alpha) * (w * bce).sum()


@LOSSES.register("dcd", paper="Rao et al., Dynamic Contrastive Distillation for Image-Text "
                 "Retrieval", year=2022, inputs="logits", default_weight=1.0)
def dcd(s: Tensor, t: Tensor | None = None, *, candidates: Count = 8, alpha: Prob = 0.2,
        temperature: Temperature = 1.0, mine: str = "teacher",
        weights: str = "dynamic") -> Tensor:
    """``s``: the student cross-encoder's (B, B) in-batch scores, ``t``: the teacher's (or
    None: no KD, the BCE alone over random in-batch candidates). Module docstring."""
    if mine not in MINING:
        raise ConfigError("dcd.mine", mine, f"one of {', '.join(MINING)}")
    if weights not in WEIGHTS:
        raise ConfigError("dcd.weights", weights, f"one of {', '.join(WEIGHTS)}")
    n = len(s) if torch.is_tensor(s) else 0
    S = _square("dcd", s, n, "student")
    if t is None and mine == "teacher":
        raise ConfigError("dcd.mine", mine, "random: teacher mining needs a teacher")
    T = None if t is None else _square("dcd", t, n, "teacher")
    if candidates < 2 or n < 2:
        raise ConfigError("dcd.candidates", candidates, f">= 2: the positive and "
                          f"candidates - 1 in-batch negatives, in a batch of >= 2 (batch {n})")
    candidates = min(candidates, n)  # a short (last) batch lists every negative it has
    out = []
    for Sd, Td in ((S, T), (S.T, None if T is None else T.T)):
        idx = dcd_candidates(n, candidates, Td, mine, S.device)
        out.append(dcd_list_loss(Sd.gather(1, idx), None if Td is None else Td.gather(1, idx),
                                 alpha=alpha, temperature=temperature, weights=weights))
    return 0.5 * (out[0] + out[1])
