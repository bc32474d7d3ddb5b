"""Losses of the cross-modal / incomplete-multimodal methods: MMANet's margin-aware
distillation (``mad``) and modality-aware regularisation (``mar``, with its auxiliary heads),
and MST-Distill's routed distillation from a mixture of masked experts (``mst``, with its
GateNet and load-balancing term).

Pure maths are plain functions (:func:`mad_loss`, :func:`load_balance`, :func:`route`,
:func:`mar_ce`); the registered losses that own trainable parts (the MAR heads, the MST gate)
are ``nn.Module`` classes registered with ``stateful=True``, so those parts train with the
distiller and are never part of an exported student. Recipes live in
``methods/mmanet.py`` and ``methods/mst.py``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import LOSSES
from ..schema import NonNeg, Temperature
from .divergences import kl
from .features import _no_autocast
from .logits import _check_temperature
from .relations import _flat, _sp_gram

WEIGHTINGS = ("row", "column")
ROUTINGS = ("mixture", "top1_st", "top1")


# --------------------------------------------------------------------------------------
# MMANet: margin-aware distillation (MAD)
# --------------------------------------------------------------------------------------
def entropy_weights(z_t: Tensor) -> Tensor:
    """Each sample's share of the batch's teacher entropy, ``w_i = H_i / sum_j H_j`` with
    ``H_i = H(softmax(z_t,i))`` (uniform when every H is 0: a one-hot-confident teacher)."""
    log_p = F.log_softmax(z_t.detach().reshape(z_t.shape[0], -1), dim=-1)
    h = -(log_p.exp() * log_p).sum(-1)  # exp(-inf) * -inf cannot occur: log_softmax is finite
    total = h.sum()
    if total <= 0:
        return torch.full_like(h, 1.0 / h.shape[0])
    return h / total


def mad_loss(f_s: Tensor, f_t: Tensor, z_t: Tensor, *, weighting: str = "row") -> Tensor:
    """Margin-aware distillation (Wei, Luo & Luo, "MMANet: Margin-aware Distillation and
    Modality-aware Regularization for Incomplete Multimodal Learning", CVPR 2023, Eq. 5-7).

    ``G = normalise_rows(F F^T)`` (B x B) on the flattened features of student and teacher,
    ``w_i = H(softmax(z_t,i)) / sum_j H(softmax(z_t,j))`` (teacher uncertainty: samples near
    the decision boundary count more) and, as the paper weights *samples*,

    ``L = sum_i w_i * (1/B) sum_j (G_s - G_t)_ij^2``   (``weighting="row"``, ours).

    With uniform weights this is exactly SP's ``1/B^2 ||G_s - G_t||_F^2``, so MAD and ``sp``
    share a scale and a term weight. The official code (shicaiwei123/MMANet-CVPR2023,
    ``loss/kd/mad.py``) broadcasts ``w`` over the last axis, i.e. weights *columns* j, and
    sums: ``sum_ij (G_s - G_t)_ij^2 w_j`` (``weighting="column"``, kept for comparison; about
    B times larger, and a row's weight no longer follows its own sample's margin).

    Shapes: ``f_s`` (B, ...), ``f_t`` (B, ...) (sizes may differ), ``z_t`` (B, K) teacher
    logits. The teacher side is constant. Returns a scalar.
    """
    if weighting not in WEIGHTINGS:
        raise ConfigError("mad.weighting", weighting, f"one of {', '.join(WEIGHTINGS)}")
    if z_t.shape[0] != f_s.shape[0] or f_t.shape[0] != f_s.shape[0]:
        raise ConfigError(
            "mad.inputs",
            f"{tuple(f_s.shape)}, {tuple(f_t.shape)}, {tuple(z_t.shape)}",
            "student features, teacher features and teacher logits of one batch (same B)",
        )
    s, t = _flat(f_s, f_t)
    with _no_autocast(s):
        d2 = (_sp_gram(s) - _sp_gram(t)).pow(2)
        w = entropy_weights(z_t).to(d2.dtype)
        if weighting == "row":
            return (w * d2.mean(1)).sum()
        return (d2 * w).sum()  # w (B,) broadcasts over the last axis: columns j


@LOSSES.register(
    "mad",
    paper="MMANet: Margin-aware Distillation and Modality-aware Regularization for "
    "Incomplete Multimodal Learning",
    year=2023,
    inputs="features",
    default_weight=1.0,
)
def mad(s, t, *, weighting: Literal["row", "column"] = "row") -> Tensor:
    """MAD as a term (see :func:`mad_loss` for the maths and the official code's column
    weighting): ``student=[features]``, ``teacher=[features, "logits"]`` (the teacher's
    logits give the entropy weights). Weight 1 (the paper's lambda); ``sp`` on the same taps
    is the unweighted baseline at the same scale."""
    s_list = s if isinstance(s, (list, tuple)) else [s]
    if not isinstance(t, (list, tuple)) or len(t) != 2 or len(s_list) != 1:
        raise ConfigError(
            "mad.teacher",
            "a single tap" if not isinstance(t, (list, tuple)) else f"{len(t)} taps",
            'student: [features]; teacher: [features, "logits"] (the teacher logits weight '
            "the samples)",
        )
    return mad_loss(s_list[0], t[0], t[1], weighting=weighting)


# --------------------------------------------------------------------------------------
# MMANet: modality-aware regularisation (MAR)
# --------------------------------------------------------------------------------------
def weak_patterns(weak, modalities, field: str = "mar.weak") -> Tensor:
    """``weak`` (a list of combinations, each a list of present modalities) as a
    ``(W, M)`` bool tensor over ``modalities``; unknown or empty combinations are errors."""
    if not weak:
        raise ConfigError(field, weak, "one or more combinations, e.g. [[audio]]")
    rows = []
    for combo in weak:
        combo = [combo] if isinstance(combo, str) else list(combo)
        bad = [m for m in combo if m not in modalities]
        if bad or not combo:
            raise ConfigError(
                field, combo, f"a non-empty list of modalities from {', '.join(modalities)}"
            )
        rows.append([m in combo for m in modalities])
    return torch.tensor(rows, dtype=torch.bool)


def mar_ce(logits: list[Tensor], y: Tensor, present: Tensor, weak: Tensor) -> Tensor:
    """MMANet's modality-aware regularisation (Eq. 14), given the auxiliary heads' logits.

    A sample counts only when its presence pattern ``present_i`` (B, M) equals one of the
    ``weak`` combinations (W, M); for it, every *present* modality's head adds its CE:
    ``L = 1/B sum_i 1[present_i in weak] sum_{m present} CE(head_m(e_m,i), y_i)``.
    Divided by the labelled batch size, not by the matching count (as the official code,
    which divides by the batch size), so the term shrinks when few samples are weak.

    ``logits``: M tensors (B, K), one per modality, in ``present``'s column order.
    """
    present = present.bool()
    match = (present[:, None, :] == weak[None].to(present.device)).all(-1).any(-1)  # (B,)
    labelled = y != -100
    keep = (match & labelled).to(logits[0].dtype)
    total = logits[0].new_zeros(())
    for m, z in enumerate(logits):
        ce = F.cross_entropy(z.float(), y.long().clamp_min(0), reduction="none")
        total = total + (ce * keep * present[:, m].to(ce.dtype)).sum()
    return total / labelled.sum().clamp_min(1)


def _presence(batch, modalities, field: str) -> Tensor:
    """(B, M) bool: ``present_<m>`` from the ``modality_dropout`` stage, else whether the
    input ``m`` holds any nonzero value (the zoo's missing-modality convention)."""
    cols = []
    for m in modalities:
        if f"present_{m}" in batch:
            cols.append(batch[f"present_{m}"].bool().reshape(-1))
        elif m in batch:
            cols.append(batch[m].flatten(1).ne(0).any(1))
        else:
            keys = ", ".join(sorted(batch)) if batch is not None else "none"
            raise ConfigError(field, m, f"no present_{m} or {m} in the batch (keys: {keys})")
    return torch.stack(cols, 1)


@LOSSES.register(
    "mar",
    paper="MMANet: Margin-aware Distillation and Modality-aware Regularization for "
    "Incomplete Multimodal Learning",
    year=2023,
    inputs="features",
    default_weight=1.0,
    stateful=True,
)
class MARLoss(nn.Module):
    """MAR with its auxiliary heads (the paper's "regularization network"), for a multi-tap
    term ``student=[e_1, ..., e_M, "logits"]``: ``e_m`` is modality m's branch embedding
    (e.g. ``image_branch``, ``audio_branch`` of the zoo ``fusion`` model), the logits only fix
    K. Each head is a linear classifier on its (pooled) embedding; :func:`mar_ce` scores them
    on the samples whose dropout pattern is a weak combination. The pattern is read from the
    batch (``present_<m>`` written by the ``modality_dropout`` stage, else the input being
    all zero). The heads are trained with the student and never exported.

    ``weak``: the weak combinations, each the list of present modalities (``[["audio"]]``:
    the samples where only the audio survived). MMANet mines them; see
    :func:`crossdistill.methods.mmanet.mine_weak`.

    The official classification code computes its auxiliary outputs with one shared network
    on the fused (dropped) features, the same output for every weak combination; here each
    modality has its own head on its own branch embedding (unimodal heads).
    """

    takes_batch = True

    def __init__(
        self,
        s_shapes,
        t_shapes=None,
        *,
        num_samples=None,
        modalities: list[str] = ("image", "audio"),
        weak: list[list[str]] = (("audio",),),
    ):
        super().__init__()
        self.modalities = list(modalities)
        m = len(self.modalities)
        if (
            not isinstance(s_shapes, (list, tuple))
            or len(s_shapes) != m + 1
            or not isinstance(s_shapes[0], (list, tuple))
        ):
            raise ConfigError(
                "mar.student",
                s_shapes,
                f"{m + 1} taps: one embedding per modality ({', '.join(self.modalities)}) "
                'then "logits"',
            )
        k = tuple(s_shapes[-1][1:])
        if len(k) != 1:
            raise ConfigError("mar.student", s_shapes[-1], 'the last tap: "logits" (B, K)')
        self.register_buffer("weak", weak_patterns(weak, self.modalities), persistent=False)
        self.heads = nn.ModuleList(nn.Linear(int(sh[1]), k[0]) for sh in s_shapes[:m])

    def forward(self, s, t=None, *, y=None, idx=None, batch=None, **_) -> Tensor:
        if y is None:
            raise ConfigError("mar.y", None, "labels: MAR is a cross-entropy")
        present = _presence(batch or {}, self.modalities, "mar.modalities").to(y.device)
        feats = [e.flatten(2).mean(-1) if e.dim() > 2 else e for e in s[: len(self.heads)]]
        return mar_ce([h(e) for h, e in zip(self.heads, feats)], y, present, self.weak)


# --------------------------------------------------------------------------------------
# MST-Distill: routing over masked experts
# --------------------------------------------------------------------------------------
def load_balance(log_g: Tensor) -> Tensor:
    """``KL(uniform || mean_i g_i)`` over the E experts, from the gate's log-probabilities
    ``log_g`` (B, E): zero when the batch uses every expert equally. The batch mean is formed
    in log space (``logsumexp``), so an unused expert gives a large, finite value.

    MST-Distill's ``load_balancing_loss`` (mode KL) divides this by E: ``KLDivLoss
    (reduction="batchmean")`` on a 1-D vector divides by its length; we return the KL itself.
    """
    e = log_g.shape[-1]
    log_mean = torch.logsumexp(log_g, 0) - math.log(log_g.shape[0])
    return (math.log(1.0 / e) - log_mean).mean()  # sum_e (1/E) (log(1/E) - log gbar_e)


def route(experts: Tensor, log_g: Tensor, routing: str = "mixture") -> Tensor:
    """The distillation target from E experts' logits ``experts`` (B, E, K) and the gate's
    log-probabilities (B, E).

    * ``"mixture"`` (default): ``sum_e g_e z_e``, the g-weighted mixture of expert logits;
      the gate gets the KD gradient.
    * ``"top1_st"``: the top-1 expert's logits in the forward, the mixture's gradient in the
      backward (straight-through: ``(onehot - sg(g) + g)``-weighted).
    * ``"top1"``: the official code's top-1 pick by index: the gate gets **no** KD gradient
      (it learns only from load balancing). Kept to reproduce the bug.
    """
    if routing not in ROUTINGS:
        raise ConfigError("mst.routing", routing, f"one of {', '.join(ROUTINGS)}")
    g = log_g.exp()
    if routing == "mixture":
        w = g
    else:
        hard = F.one_hot(g.argmax(-1), g.shape[-1]).to(g.dtype)
        w = hard if routing == "top1" else hard + g - g.detach()
    return (w.unsqueeze(-1) * experts).sum(1)


class GateNet(nn.Module):
    """MST-Distill's router: two linear layers on the student's logits, ``K -> 2K -> E``
    (no activation between them, as in the official ``GateNet``)."""

    def __init__(self, classes: int, experts: int):
        super().__init__()
        self.fc1 = nn.Linear(classes, 2 * classes)
        self.fc2 = nn.Linear(2 * classes, experts)

    def forward(self, z: Tensor) -> Tensor:
        return self.fc2(self.fc1(z))


@LOSSES.register(
    "mst",
    paper="MST-Distill: Mixture of Specialized Teachers for Cross-Modal Knowledge "
    "Distillation",
    year=2025,
    inputs="logits",
    default_weight=1.0,
    stateful=True,
)
class MSTLoss(nn.Module):
    """MST-Distill's stage-3 objective without the CE (MST-Distill, 2025, stage 3), for a
    multi-tap term ``student=["logits"]``, ``teacher=[z_1, ..., z_E]`` (the E masked
    experts' logits, constant):

    ``g = softmax(GateNet(z_s))``, ``e = route(z_1..z_E; g)`` and
    ``L = T^2 * 1/B sum_i KL(softmax(e_i/T) || softmax(z_s,i/T)) + lb_weight * KL(u || mean g)``

    (T = 4, so the KD factor is the paper's 16; weights 1). The official code picks the top-1
    expert by index, so its gate gets no KD gradient and drifts to uniform under the load
    balance; we use the g-weighted mixture of expert logits (``routing="mixture"``, default;
    ``"top1_st"`` straight-through top-1, ``"top1"`` the official behaviour). The gate reads
    the student's logits undetached, as in the official code. ``routes`` counts each
    expert's top-1 picks over training (a buffer; diagnostics).
    """

    def __init__(
        self,
        s_shapes,
        t_shapes,
        *,
        num_samples=None,
        temperature: Temperature = 4.0,
        routing: Literal["mixture", "top1_st", "top1"] = "mixture",
        lb_weight: NonNeg = 1.0,
    ):
        super().__init__()
        ok = (
            isinstance(s_shapes, (list, tuple))
            and len(s_shapes) == 1
            and isinstance(t_shapes, (list, tuple))
            and len(t_shapes) >= 2
        )
        if not ok:
            raise ConfigError(
                "mst.teacher",
                t_shapes,
                'student: ["logits"]; teacher: two or more expert logit taps',
            )
        k = tuple(s_shapes[0][1:])
        if len(k) != 1 or any(tuple(sh[1:]) != k for sh in t_shapes):
            raise ConfigError(
                "mst.teacher", [tuple(sh) for sh in t_shapes], f"expert logits (B, {k[0]})"
            )
        _check_temperature("mst", temperature)
        if routing not in ROUTINGS:
            raise ConfigError("mst.routing", routing, f"one of {', '.join(ROUTINGS)}")
        self.temperature, self.routing, self.lb_weight = float(temperature), routing, lb_weight
        self.gate = GateNet(k[0], len(t_shapes))
        self.register_buffer("routes", torch.zeros(len(t_shapes), dtype=torch.long))
        self.last: dict[str, Tensor] = {}

    def parts(self, z_s: Tensor, experts: list[Tensor]) -> dict[str, Tensor]:
        """The KD and load-balance terms and the gate's probabilities, separately."""
        e = torch.stack([z.detach() for z in experts], 1).to(z_s.dtype)  # (B, E, K)
        log_g = F.log_softmax(self.gate(z_s), -1)
        target = route(e, log_g, self.routing)
        T = self.temperature
        kd = kl(F.log_softmax(target / T, -1), F.log_softmax(z_s / T, -1)).mean() * T * T
        return {"kd": kd, "lb": load_balance(log_g), "g": log_g.exp()}

    def forward(self, s, t, *, y=None, idx=None, **_) -> Tensor:
        p = self.parts(s[0], list(t))
        if self.training:
            with torch.no_grad():
                self.routes += torch.bincount(p["g"].argmax(-1), minlength=len(self.routes))
        self.last = {k: v.detach() for k, v in p.items()}
        return p["kd"] + self.lb_weight * p["lb"]
