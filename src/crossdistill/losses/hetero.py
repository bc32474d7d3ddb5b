"""Losses of the heterogeneous-architecture seed methods: OFA, PLD, TAID, ScaleKD, and the
CNN-Transformer collaborative-learning pieces (DML, BSD per sample and per region, HFD).

Every function takes student logits/features first and the teacher's second, treats the
teacher as a constant and returns a scalar averaged over the batch. Stateful losses (TAID's
adaptive interpolation schedule, HFD's two projectors, region-wise BSD's two heads) are
``nn.Module`` classes registered with ``stateful=True``. Recipes in ``crossdistill.methods``
wire these into terms.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import projectors as P
from ..context import at_dims
from ..errors import ConfigError
from ..registry import LOSSES, PROJECTORS
from ..schema import Depth, NonNeg, Pos, Prob, Temperature
from .features import _upcast
from .logits import _check_logits, _check_temperature


def _check(name: str, field: str, value, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name}.{field}", value, allowed)


def _target_mask(s: Tensor, y: Tensor | None) -> Tensor:
    """One-hot of ``y`` (..., K); positions without a label (``y == -100``) are all zero."""
    if y is None:
        return torch.zeros_like(s)
    y = y.long()
    lab = (y >= 0).unsqueeze(-1)
    return F.one_hot(y.clamp_min(0), s.shape[-1]).to(s.dtype) * lab


# --------------------------------------------------------------------------------------
# OFA-KD
# --------------------------------------------------------------------------------------
@LOSSES.register(
    "ofa",
    paper="One-for-All: Bridge the Gap Between Heterogeneous Architectures in Knowledge "
    "Distillation",
    year=2023,
    inputs="logits",
    default_weight=1.0,
)
def ofa(
    s: Tensor,
    t: Tensor,
    *,
    y: Tensor | None = None,
    gamma: NonNeg = 1.0,
    temperature: Temperature = 1.0,
) -> Tensor:
    """OFA loss (Hao et al., "One-for-All: Bridge the Gap Between Heterogeneous Architectures
    in Knowledge Distillation", NeurIPS 2023, Eq. 5):

    ``L = -1/B sum_i sum_c ((p_t^c + 1[c=y_i])^gamma - 1[c=y_i]) * log p_s^c`` with
    ``p = softmax(z / T)``. ``gamma >= 1`` (the official code's ``eps``) enlarges the weight of
    the target class; ``gamma = 1`` is soft cross-entropy to ``p_t``. Samples with ``y = -1``
    (unlabelled) get no target mask. As in the official ``ofa_loss`` (Hao840/OFAKD,
    distillers/ofa.py) there is no ``T^2`` factor and the default temperature is 1; we use
    ``log_softmax`` instead of ``log(softmax)`` for numerical safety.

    Shapes: ``s``, ``t`` (..., K) logits; ``y`` (...) labels or None. Returns one value per
    position (the Term averages over the context's mask).
    """
    _check_logits("ofa", s, t)
    _check_temperature("ofa", temperature)
    _check("ofa", "gamma", gamma, isinstance(gamma, (int, float)) and gamma >= 1, "a number >= 1")
    s32, t32 = _upcast(s), _upcast(t).detach()
    log_p_s = F.log_softmax(s32 / temperature, dim=-1)
    p_t = F.softmax(t32 / temperature, dim=-1)
    mask = _target_mask(s32, y)
    weight = (p_t + mask).pow(gamma) - mask
    return -(weight * log_p_s).sum(-1)


# --------------------------------------------------------------------------------------
# PLD
# --------------------------------------------------------------------------------------
@LOSSES.register(
    "pld",
    paper="PLD: A Choice-Theoretic List-Wise Knowledge Distillation",
    year=2025,
    inputs="logits",
    default_weight=1.0,
)
def pld(s: Tensor, t: Tensor, *, y: Tensor | None = None, temperature: Temperature = 1.0) -> Tensor:
    """Plackett-Luce distillation ("PLD: A Choice-Theoretic List-Wise Knowledge
    Distillation", 2025; list-wise / ListMLE form, methods.md):

    ``L = 1/B sum_i sum_k alpha_k * ( logsumexp_{j >= k} z_s[pi_j] - z_s[pi_k] )``

    where ``pi`` is the teacher-optimal permutation (the true label first, then the other
    classes by descending teacher logit) and ``alpha_k = softmax(z_t / T)[pi_k]``. The ``k=1``
    term is a cross-entropy on the label weighted by the teacher's confidence in it, so PLD
    replaces CE + KD (use it alone).

    Choice (no official code was found): ``alpha`` is the teacher's softmax *without
    renormalisation* over the permutation (it sums to 1 over all K positions); the student
    logits enter at temperature 1. Unlabelled samples (``y = -1`` or ``y=None``) use the pure
    teacher ranking. The suffix logsumexp is a ``logcumsumexp`` over the flipped, gathered
    student logits (no loops).

    Shapes: ``s``, ``t`` (..., K) logits; ``y`` (...) labels or None. Returns one value per
    position (the Term averages over the context's mask).
    """
    _check_logits("pld", s, t)
    _check_temperature("pld", temperature)
    s32, t32 = _upcast(s), _upcast(t).detach()
    key = t32.clone()
    mask = _target_mask(t32, y).bool()
    key[mask] = math.inf  # the label goes first
    pi = key.argsort(dim=-1, descending=True)
    alpha = F.softmax(t32 / temperature, dim=-1).gather(-1, pi)
    zs = s32.gather(-1, pi)
    suffix = zs.flip(-1).logcumsumexp(-1).flip(-1)  # suffix[k] = logsumexp_{j>=k} zs[j]
    return (alpha * (suffix - zs)).sum(-1)


# --------------------------------------------------------------------------------------
# TAID
# --------------------------------------------------------------------------------------
@LOSSES.register(
    "taid",
    paper="TAID: Temporally Adaptive Interpolated Distillation for Efficient Knowledge "
    "Transfer in Language Models",
    year=2025,
    inputs="logits",
    default_weight=1.0,
    stateful=True,
)
class TAIDLoss(nn.Module):
    """TAID (Shing et al., "TAID: Temporally Adaptive Interpolated Distillation for Efficient
    Knowledge Transfer in Language Models", ICLR 2025): one module for the classification
    form and the language-model form (per token).

    Interpolated target (Eq. 2): ``r = softmax((1 - t) * sg(z_s) + t * z_t)`` at T = 1 and
    loss ``-sum_v r_v log softmax(z_s)_v`` per position (a cross-entropy: forward KL to
    ``r`` plus ``r``'s entropy, same gradient), which the Term averages over the context's
    mask: per sample for a classifier, over the valid tokens (labels != -100) for the lm
    task -- the paper's LM loss, used there without a next-token CE (the ``taid`` method's
    ``ce_weight: 0``). After each optimiser step (``on_step``) ``t`` follows the adaptive
    schedule (Alg. 1 / official ``update_t``):

    ``t_lin = t_start + (t_end - t_start) * progress``,
    ``m = beta * m + (1 - beta) * (L_prev - L) / (L_prev + eps)``,
    ``t = min(t_end, max(t_lin, t + alpha * sigmoid(m) * (1 - t)))``,

    with ``progress = distiller.epoch / distiller.total_epochs`` (the Trainer's step / total)
    and ``L`` the masked mean of this loss over every valid position of the optimiser step:
    all its micro-batches under gradient accumulation, all ranks under DDP. Only training
    forwards count and the schedule moves once per optimiser step, never on validation
    batches (the official code, SakanaAI/TAID src/distil_losses/taid.py, moves ``t`` inside
    forward: per micro-batch and on validation too). The first step only records ``L_prev``;
    ``alpha = 0`` is the linear schedule. ``t``, ``m``, ``L_prev`` (and the last ``L``) are
    buffers, so they are checkpointed and resume is exact; nothing is pinned to CUDA.
    Defaults: t_start 0.4, t_end 1.0, alpha 5e-4, beta 0.99 (the paper's).
    """

    def __init__(
        self,
        s_shape,
        t_shape,
        *,
        num_samples=None,
        t_start: Prob = 0.4,
        t_end: Prob = 1.0,
        alpha: NonNeg = 5e-4,
        beta: Prob = 0.99,
        eps: Pos = 1e-8,
    ):
        super().__init__()
        _check("taid", "t_start", t_start, 0.0 <= t_start <= 1.0, "a number in [0, 1]")
        _check("taid", "t_end", t_end, t_start <= t_end <= 1.0, "a number in [t_start, 1]")
        _check("taid", "alpha", alpha, alpha >= 0, "a number >= 0")
        _check("taid", "beta", beta, 0.0 <= beta < 1.0, "a number in [0, 1)")
        if len(s_shape) < 2 or t_shape is None or tuple(s_shape) != tuple(t_shape):
            raise ConfigError(
                "taid.inputs", f"{s_shape} vs {t_shape}", "two (..., classes) logit tensors"
            )
        self.t_start, self.t_end, self.alpha, self.beta, self.eps = (
            float(t_start),
            float(t_end),
            float(alpha),
            float(beta),
            float(eps),
        )
        self.register_buffer("t", torch.tensor(float(t_start), dtype=torch.float64))
        self.register_buffer("m", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("L_prev", torch.tensor(math.nan, dtype=torch.float64))
        self.register_buffer("last", torch.tensor(math.nan, dtype=torch.float64))
        # (loss sum, valid positions) of the optimiser step so far; empty at step boundaries,
        # where checkpoints are written, so it is not saved
        self.register_buffer("window", torch.zeros(2, dtype=torch.float64), persistent=False)

    takes_mask = True  # the distiller passes the context's mask (the schedule's L is masked)

    def forward(self, s: Tensor, t: Tensor, *, y=None, idx=None, mask=None, **_) -> Tensor:
        """Per-position loss (the Term averages it over the mask); per token for LMs. A
        training forward adds its masked sum and count to the step's window (no host sync)."""
        s32, t32 = _upcast(s), _upcast(t).detach()
        w = float(self.t)
        target = F.softmax((1.0 - w) * s32.detach() + w * t32, dim=-1)
        loss = -(target * F.log_softmax(s32, dim=-1)).sum(-1)
        if self.training:
            with torch.no_grad():
                keep = (torch.ones_like(loss, dtype=torch.bool) if mask is None
                        else at_dims(mask, loss.shape, "terms.taid").to(loss.device))
                total = torch.where(keep, loss.detach(), 0.0).sum().double()
                self.window += torch.stack([total, keep.sum().double()])
                self._dtype = loss.dtype
                self.last.copy_(self._mean(self.window))
        return loss

    _dtype = torch.float32

    def _mean(self, window: Tensor) -> Tensor:
        """sum / count in the loss's dtype: one micro-batch gives exactly the Term's masked
        mean (and the schedule's numbers of earlier versions)."""
        dt = self._dtype
        return (window[0].to(dt) / window[1].to(dt).clamp_min(1)).double()

    @torch.no_grad()
    def update(self, loss: float, progress: float) -> None:
        """One step of the adaptive schedule with the latest loss and progress in [0, 1]."""
        if not math.isfinite(loss):
            return
        t_lin = self.t_start + (self.t_end - self.t_start) * min(max(progress, 0.0), 1.0)
        if math.isnan(float(self.L_prev)):
            self.L_prev.fill_(loss)
            self.t.fill_(min(self.t_end, max(t_lin, float(self.t))))
            return
        prev = float(self.L_prev)
        m = self.beta * float(self.m) + (1.0 - self.beta) * (prev - loss) / (prev + self.eps)
        t = float(self.t)
        t = min(self.t_end, max(t_lin, t + self.alpha * (1.0 / (1.0 + math.exp(-m))) * (1.0 - t)))
        self.m.fill_(m)
        self.t.fill_(t)
        self.L_prev.fill_(loss)

    @torch.no_grad()
    def on_step(self, distiller) -> None:
        """Once per optimiser step: the step's masked mean loss (summed over micro-batches
        and, under torch.distributed, over ranks) drives one schedule update."""
        import torch.distributed as dist

        window = self.window.clone()
        self.window.zero_()
        if dist.is_available() and dist.is_initialized():
            window = window.to(self.t.device)
            dist.all_reduce(window)
        if float(window[1]) <= 0:  # no training forward since the last step (or a skipped one)
            return
        loss = float(self._mean(window))
        self.last.fill_(loss)
        total = max(float(getattr(distiller, "total_epochs", 1) or 1), 1e-12)
        self.update(loss, float(getattr(distiller, "epoch", 0.0)) / total)


# --------------------------------------------------------------------------------------
# ScaleKD: DCT frequency mimicking, cross-attention projector
# --------------------------------------------------------------------------------------
def dct_matrix(n: int, dtype=torch.float64, device=None) -> Tensor:
    """Orthonormal DCT-II matrix ``D`` (n, n): ``X = D @ x`` is the DCT-II of ``x``."""
    k = torch.arange(n, dtype=dtype, device=device)[:, None]
    i = torch.arange(n, dtype=dtype, device=device)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] = d[0] / math.sqrt(2.0)
    return d


def dct2(x: Tensor) -> Tensor:
    """Orthonormal 2-D DCT-II over the last two dims, by two matrix multiplies."""
    h, w = x.shape[-2:]
    dh = dct_matrix(h, x.dtype, x.device)
    dw = dct_matrix(w, x.dtype, x.device)
    return dh @ x @ dw.T


def as_map(x: Tensor) -> Tensor:
    """Per-sample feature -> (B, C, H, W): maps pass, square-grid tokens (cls dropped) are
    laid out on their grid, other token sets are treated as a (1, N, D) image."""
    if x.dim() == 4:
        return x
    if x.dim() == 3:
        if P.grid_of(x.shape[1]) is not None:
            return P.tokens_to_map(x)
        return x.unsqueeze(1)
    raise ConfigError("dct_mse.inputs", tuple(x.shape), "a (B,C,H,W) map or (B,N,D) tokens")


@LOSSES.register(
    "dct_mse",
    paper="ScaleKD: Strong Vision Transformers Could Be Excellent Teachers",
    year=2024,
    inputs="features",
    default_weight=0.06,
)
def dct_mse(s: Tensor, t: Tensor) -> Tensor:
    """Frequency-domain feature mimicking of ScaleKD (Fan et al., NeurIPS 2024, Sec. 3.2
    "dual-view feature mimicking"): ``MSE(DCT2(F_s) * M, DCT2(F_t) * M)`` where ``DCT2`` is
    the orthonormal 2-D DCT-II over the spatial grid and ``M`` zeroes the DC (zero-frequency)
    coefficient, so the term ignores the per-channel mean and stresses the rest of the
    spectrum. Token features are laid on their patch grid (a cls token is dropped). The mean
    is over all remaining elements (official code, deep-optimization/ScaleKD fmdv2.py, sums
    and divides by the batch; our mean only rescales the weight). Default weight 0.06.

    Shapes: equal ``s``, ``t`` of (B, C, H, W) or (B, N, D).
    """
    if s.shape != t.shape:
        raise ConfigError("dct_mse.inputs", f"{tuple(s.shape)} vs {tuple(t.shape)}", "equal shapes")
    fs, ft = dct2(as_map(_upcast(s))), dct2(as_map(_upcast(t).detach()))
    mask = torch.ones(fs.shape[-2:], dtype=fs.dtype, device=fs.device)
    mask[0, 0] = 0.0
    return ((fs - ft) * mask).pow(2).mean()


@PROJECTORS.register("cross_attention")
class CrossAttentionProjector(nn.Module):
    """ScaleKD's cross-attention projector: ``N_t`` learnable queries (the teacher's token
    count, or H*W of a teacher map) attend to the student's tokens (a CNN map is flattened to
    H*W tokens; a vector is one token), keys/values are the student tokens linearly embedded
    into the teacher width plus a learnable position embedding. Output: the teacher feature's
    per-sample shape. One multi-head attention layer plus a residual MLP (our size choice).
    """

    def __init__(self, s_shape, t_shape, *, heads: Depth = 4):
        super().__init__()
        s_shape, t_shape = tuple(s_shape), tuple(t_shape)
        if len(t_shape) == 3:
            n_t, d_t = t_shape[1] * t_shape[2], t_shape[0]
        elif len(t_shape) == 2:
            n_t, d_t = t_shape
        else:
            raise ConfigError(
                "projector", "cross_attention", f"teacher side must be (C,H,W) or (N,D): {t_shape}"
            )
        if len(s_shape) == 3:
            n_s, d_s = s_shape[1] * s_shape[2], s_shape[0]
        elif len(s_shape) == 2:
            n_s, d_s = s_shape
        elif len(s_shape) == 1:
            n_s, d_s = 1, s_shape[0]
        else:
            raise ConfigError("projector", "cross_attention", f"bad student shape {s_shape}")
        heads = math.gcd(heads, d_t) or 1
        self.t_shape = t_shape
        self.embed = nn.Linear(d_s, d_t)
        self.pos = nn.Parameter(torch.zeros(1, n_s, d_t))
        self.queries = nn.Parameter(torch.randn(1, n_t, d_t) * 0.02)
        self.attn = nn.MultiheadAttention(d_t, heads, batch_first=True)
        self.norm = nn.LayerNorm(d_t)
        self.mlp = nn.Sequential(nn.Linear(d_t, 2 * d_t), nn.GELU(), nn.Linear(2 * d_t, d_t))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:
            x = x.flatten(2).transpose(1, 2)
        elif x.dim() == 2:
            x = x.unsqueeze(1)
        kv = self.embed(x) + self.pos
        q = self.queries.expand(x.shape[0], -1, -1)
        out, _ = self.attn(q, kv, kv, need_weights=False)
        out = out + self.mlp(self.norm(out))
        if len(self.t_shape) == 3:
            c, h, w = self.t_shape
            out = out.transpose(1, 2).reshape(x.shape[0], c, h, w)
        return out


# --------------------------------------------------------------------------------------
# Collaborative learning: DML, BSD, HFD
# --------------------------------------------------------------------------------------
def _pair_logits(name: str, s) -> tuple[Tensor, Tensor]:
    if not isinstance(s, (list, tuple)) or len(s) != 2:
        raise ConfigError(
            f"{name}.student",
            s if not isinstance(s, Tensor) else tuple(s.shape),
            "a list of two taps: the logits of model A and of model B",
        )
    a, b = s
    _check_logits(name, a, b)
    return _upcast(a), _upcast(b)


@LOSSES.register(
    "dml",
    paper="Deep Mutual Learning",
    year=2018,
    inputs="logits",
    default_weight=1.0,
)
def dml(s, t=None, *, temperature: Temperature = 1.0) -> Tensor:
    """Deep mutual learning (Zhang, Xiang, Hospedales & Lu, CVPR 2018, Eqs. 2 and 4): the
    symmetric KL between two peers trained together,
    ``KL(sg(p_b) || p_a) + KL(sg(p_a) || p_b)`` (batch mean, ``T^2``-scaled; T=1 in the paper).
    Each direction treats the other peer as a constant, exactly as the paper's alternating
    updates do within one step.

    ``s``: a list ``[z_a, z_b]`` of two (..., K) logits (a multi-tap term with no teacher).
    Returns one value per position (the Term averages over the context's mask).
    """
    a, b = _pair_logits("dml", s)
    _check_temperature("dml", temperature)
    T = temperature
    kl = lambda x, y: F.kl_div(  # noqa: E731  KL(sg(p_y) || p_x) per position
        F.log_softmax(x / T, -1), F.softmax(y.detach() / T, -1), reduction="none"
    ).sum(-1)
    return (kl(a, b) + kl(b, a)) * T * T


def _selection(la: Tensor, lb: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
    """Which peer teaches, per row of log-probabilities ``(B, ..., K)``: the one with the lower
    CE on the sample's label ``y`` (B,), or, for unlabelled samples (``y = -1``/None), the one
    with the higher max probability. Returns float masks ``(a_teaches, b_teaches)``; ties are
    in neither, so they transfer nothing."""
    score_a, score_b = -la.max(-1).values, -lb.max(-1).values
    if y is not None:
        y = y.long()
        if y.shape != la.shape[:-1]:  # per-sample labels for per-region predictions
            y = y.reshape(-1, *[1] * (la.dim() - 2)).expand(la.shape[:-1])
        lab, yy = y >= 0, y.clamp(min=0).unsqueeze(-1)
        score_a = torch.where(lab, -la.gather(-1, yy).squeeze(-1), score_a)
        score_b = torch.where(lab, -lb.gather(-1, yy).squeeze(-1), score_b)
    return (score_a < score_b).to(la.dtype), (score_b < score_a).to(la.dtype)


def _kl_rows(student: Tensor, teacher: Tensor, T: float) -> Tensor:
    """``KL(sg(softmax(teacher / T)) || softmax(student / T))`` over the last dim."""
    log_p_t = F.log_softmax(teacher.detach() / T, -1)
    return (log_p_t.exp() * (log_p_t - F.log_softmax(student / T, -1))).sum(-1)


@LOSSES.register(
    "bsd",
    paper="A Good Student is Cooperative and Reliable: CNN-Transformer Collaborative "
    "Learning for Semantic Segmentation (BSD)",
    year=2023,
    inputs="logits",
    default_weight=1.0,
)
def bsd(s, t=None, *, y: Tensor | None = None, temperature: Temperature = 1.0) -> Tensor:
    """Bidirectional selective distillation, per-sample form (Zhu et al., "A Good Student is
    Cooperative and Reliable: CNN-Transformer Collaborative Learning for Semantic
    Segmentation", ICCV 2023, pixel-wise BSD recast per sample).

    For every sample the peer with the lower cross-entropy on the label teaches the other:
    ``L = 1/B sum_i [ 1[CE_a,i < CE_b,i] KL(sg(p_a,i) || p_b,i) + 1[CE_b,i < CE_a,i]
    KL(sg(p_b,i) || p_a,i) ] * T^2``. Unlabelled samples (``y = -1``/None) select the peer
    with the higher max-probability (more confident). Ties transfer nothing. The paper's
    region-wise selection is ``bsd_region`` (on region predictions of feature-map patches).

    ``s``: ``[z_a, z_b]`` two (..., K) logits; ``y`` (...) labels. Returns one value per
    position (the Term averages over the context's mask).
    """
    a, b = _pair_logits("bsd", s)
    _check_temperature("bsd", temperature)
    T = temperature
    with torch.no_grad():
        a_teaches, b_teaches = _selection(F.log_softmax(a, -1), F.log_softmax(b, -1), y)
    rows = a_teaches * _kl_rows(b, a, T) + b_teaches * _kl_rows(a, b, T)
    return rows * T * T


@LOSSES.register(
    "bsd_region",
    paper="A Good Student is Cooperative and Reliable: CNN-Transformer Collaborative "
    "Learning for Semantic Segmentation (region-wise BSD)",
    year=2023,
    inputs="logits",
    default_weight=1.0,
)
def bsd_region(
    s,
    t=None,
    *,
    y: Tensor | None = None,
    temperature: Temperature = 1.0,
    ce_weight: NonNeg = 1.0,
) -> Tensor:
    """Bidirectional selective distillation, region-wise form (Zhu et al., "A Good Student is
    Cooperative and Reliable: CNN-Transformer Collaborative Learning for Semantic
    Segmentation", ICCV 2023, region-wise BSD), on image labels: every region ``r`` of sample
    ``i`` is predicted by both peers, and in each region the peer whose prediction has the
    lower CE on the image label teaches the other:

    ``L_bsd = 1/(B R) sum_{i,r} [ 1[CE^a_ir < CE^b_ir] KL(sg(p^a_ir) || p^b_ir)
    + 1[CE^b_ir < CE^a_ir] KL(sg(p^b_ir) || p^a_ir) ] * T^2``

    with ``p = softmax(z / T)`` and ``CE`` at T = 1. Unlabelled samples pick the more
    confident peer per region (higher max probability), as ``bsd``; ties transfer nothing.
    The region predictions come from heads that nothing else trains, so the loss also holds
    their own CE, ``ce_weight * 1/B_lab sum_{i labelled} 1/R sum_r (CE^a_ir + CE^b_ir)``
    (mean over labelled samples like ``ce``; ``ce_weight=0`` gives the pure selective KL).

    ``s``: ``[r_a, r_b]`` two (B, R, K) region logits; ``y`` (B,) image labels.
    """
    if not isinstance(s, (list, tuple)) or len(s) != 2:
        raise ConfigError(
            "bsd_region.student",
            s if not isinstance(s, Tensor) else tuple(s.shape),
            "a list of two (batch, regions, classes) region logits, model A's then B's",
        )
    a, b = _upcast(s[0]), _upcast(s[1])
    if a.dim() != 3 or a.shape != b.shape:
        raise ConfigError(
            "bsd_region.inputs",
            f"{tuple(a.shape)} vs {tuple(b.shape)}",
            "two equal (batch, regions, classes) region logits",
        )
    _check_temperature("bsd_region", temperature)
    _check("bsd_region", "ce_weight", ce_weight, ce_weight >= 0, "a number >= 0")
    T = temperature
    la, lb = F.log_softmax(a, -1), F.log_softmax(b, -1)
    a_teaches, b_teaches = _selection(la.detach(), lb.detach(), y)
    loss = (a_teaches * _kl_rows(b, a, T) + b_teaches * _kl_rows(a, b, T)).mean() * T * T
    if y is None or ce_weight == 0:
        return loss
    y = y.long()
    lab = y >= 0
    yy = y.clamp(min=0)[:, None, None].expand(-1, a.shape[1], 1)
    ce = -(la + lb).gather(-1, yy)[..., 0].mean(1)  # (B,): per-region CE of both heads
    return loss + ce_weight * (ce * lab).sum() / lab.sum().clamp_min(1)


class RegionHead(nn.Module):
    """A peer's region predictions for region-wise BSD: feature -> (B, R, K) logits.

    The feature (a (C, H, W) map, or (N, D) tokens on a square grid, a leading cls token
    dropped) is average-pooled to ``grid x grid`` patch regions (R = grid^2) and each region
    is classified by one fresh ``Linear(C, K)``. Pooling plus a linear head (our choice)
    keeps the head too weak to hide what the backbone's region features know. A (C,) vector
    (an MLP peer) has no spatial layout: its one prediction stands for every region, so each
    of the other peer's regions is compared with the MLP's whole-image view. A projector
    factory: ``t_shape`` is the logits' (K,).
    """

    def __init__(self, s_shape, t_shape, *, grid: int = 2):
        super().__init__()
        s_shape, t_shape = tuple(s_shape), tuple(t_shape)
        ok = isinstance(grid, int) and not isinstance(grid, bool) and grid >= 1
        _check("bsd_region", "grid", grid, ok, "a positive integer")
        if len(t_shape) != 1:
            raise ConfigError("bsd_region.head", t_shape, "the target side must be logits (K,)")
        if len(s_shape) in (1, 3):
            c = s_shape[0]
        elif len(s_shape) == 2 and P.grid_of(s_shape[0]) is not None:
            c = s_shape[1]
        else:
            raise ConfigError(
                "bsd_region.feature",
                s_shape,
                "a (C, H, W) map, (N, D) tokens on a square grid (plus an optional cls token) "
                "or a (C,) vector",
            )
        self.grid = grid
        self.fc = nn.Linear(c, t_shape[0])

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:  # a vector: one prediction for every region
            return self.fc(x)[:, None, :].expand(-1, self.grid * self.grid, -1)
        if x.dim() == 3:
            x = P.tokens_to_map(x)
        x = F.adaptive_avg_pool2d(x, self.grid)  # (B, C, g, g)
        return self.fc(x.flatten(2).transpose(1, 2))  # (B, g*g, K), regions row-major


@LOSSES.register(
    "bsd_region_heads",
    paper="A Good Student is Cooperative and Reliable: CNN-Transformer Collaborative "
    "Learning for Semantic Segmentation (region-wise BSD)",
    year=2023,
    inputs="features",
    default_weight=1.0,
    stateful=True,
)
class RegionBSDLoss(nn.Module):
    """Region-wise BSD with its two trainable :class:`RegionHead` s (``self.a``, ``self.b``),
    for a multi-tap term ``[F_a, F_b, z_a, z_b]``: each peer's feature goes through its own
    head and ``bsd_region`` scores the two region predictions. The logit taps only fix K at
    build time. A stateful loss (as ``hfd``) because Distiller projectors bridge one tap
    only; as a loss module the heads are trained and checkpointed with the distiller and
    never exported with the student.
    """

    def __init__(
        self,
        s_shapes,
        t_shapes=None,
        *,
        num_samples=None,
        grid: Depth = 2,
        temperature: Temperature = 1.0,
        ce_weight: NonNeg = 1.0,
    ):
        super().__init__()
        if (
            not isinstance(s_shapes, (list, tuple))
            or len(s_shapes) != 4
            or not isinstance(s_shapes[0], (list, tuple))
        ):
            raise ConfigError(
                "bsd_region_heads.student",
                s_shapes,
                "four taps: model A's feature, model B's feature, A's logits, B's logits",
            )
        fa, fb, za, zb = (tuple(x[1:]) for x in s_shapes)
        if len(za) != 1 or za != zb:
            raise ConfigError(
                "bsd_region_heads.student", f"{za} vs {zb}", "taps 3 and 4: two (K,) logits"
            )
        _check_temperature("bsd_region", temperature)
        _check("bsd_region", "ce_weight", ce_weight, ce_weight >= 0, "a number >= 0")
        self.temperature, self.ce_weight = float(temperature), float(ce_weight)
        self.a, self.b = RegionHead(fa, za, grid=grid), RegionHead(fb, zb, grid=grid)

    def forward(self, s, t=None, *, y=None, idx=None, **_) -> Tensor:
        return bsd_region(
            [self.a(s[0]), self.b(s[1])],
            y=y,
            temperature=self.temperature,
            ce_weight=self.ce_weight,
        )


class _VectorToMap(nn.Module):
    """(D,) -> (C, H, W): a linear map to C channels, constant over the H x W grid."""

    def __init__(self, s_shape, t_shape):
        super().__init__()
        self.size = tuple(t_shape[1:])
        self.proj = nn.Linear(s_shape[0], t_shape[0])

    def forward(self, x):
        return self.proj(x)[:, :, None, None].expand(-1, -1, *self.size)


@LOSSES.register(
    "hfd",
    paper="A Good Student is Cooperative and Reliable: CNN-Transformer Collaborative "
    "Learning for Semantic Segmentation (HFD)",
    year=2023,
    inputs="features",
    default_weight=1.0,
    stateful=True,
)
class HFDLoss(nn.Module):
    """Heterogeneous feature distillation (Zhu et al., "A Good Student is Cooperative and
    Reliable", ICCV 2023, HFD): the low-layer
    features of each peer are projected into the other's feature space and matched with MSE,
    the target detached: ``MSE(P_ab(F_a), sg(F_b)) + MSE(P_ba(F_b), sg(F_a))``. The two
    projectors are ``"auto"`` projectors (1x1 conv for maps, tokens<->map reshapes, linear
    for tokens, pool + linear for map -> vector) built from the tapped shapes, and for
    vector -> map a linear map to the channels broadcast over the grid (our choice, cheap);
    they train with the peers.

    ``s``: ``[F_a, F_b]`` (a multi-tap term with no teacher).
    """

    def __init__(self, s_shapes, t_shapes=None, *, num_samples=None, projector: str = "auto"):
        super().__init__()
        if (
            not isinstance(s_shapes, (list, tuple))
            or len(s_shapes) != 2
            or not isinstance(s_shapes[0], (list, tuple))
        ):
            raise ConfigError("hfd.student", s_shapes, "a list of two taps, one per peer")
        sa, sb = (tuple(x[1:]) for x in s_shapes)
        self.ab = self._build(projector, sa, sb)
        self.ba = self._build(projector, sb, sa)

    @staticmethod
    def _build(name, s_shape, t_shape):
        if name == "auto" and len(t_shape) == 3 and len(s_shape) == 1:
            return _VectorToMap(s_shape, t_shape)  # "auto" has no vector -> map bridge
        return P.build(name, s_shape, t_shape, "hfd.projector")

    def forward(self, s, t=None, *, y=None, idx=None, **_) -> Tensor:
        fa, fb = s
        return F.mse_loss(self.ab(fa), fb.detach()) + F.mse_loss(self.ba(fb), fa.detach())
