"""Sentence-pair distillation between bi-encoders and cross-encoders (Trans-Encoder).

Liu et al., "Trans-Encoder: Unsupervised sentence-pair modelling through self- and
mutual-distillations" (ICLR 2022), Sec. 2. A pair's score comes from one of two model
kinds: a bi-encoder's ``cos(u, v)`` of its two sentence embeddings, or a cross-encoder's
logit ``z`` over the joint input. Each tap list below is read as a sequence of teachers
(or the student): a ``(B,)`` / ``(B, 1)`` tensor is one model's pair score; two ``(B, D)``
tensors in a row are one bi-encoder's ``u`` and ``v`` and give ``cos(u, v)``.

- ``pair_bce`` (bi -> cross, Eq. 1): the cross-encoder student's logit ``z`` learns the
  bi-encoders' pseudo-label ``y = clamp(mean_k cos(u_k, v_k), 0, 1)`` by binary cross-entropy,
  ``L = -[y log sigmoid(z) + (1 - y) log(1 - sigmoid(z))]`` per pair. The mean over ``k`` is the
  mutual variant's averaged label (one teacher: the plain cosine). The official code feeds
  raw cosines, which can be negative, as BCE targets; here they are clamped to ``[0, 1]``
  (``clamp=False`` restores the official targets).
- ``pair_cosine_mse`` (cross -> bi, Eq. 2, sentence-transformers' ``CosineSimilarityLoss``):
  the bi-encoder student's ``cos(u, v)`` regresses on the cross-encoders' mean sigmoid score,
  ``L = (cos(u, v) - mean_k sigmoid(z_k))^2`` per pair (``teacher_scores="prob"``: the teacher
  scores are probabilities already, averaged as they are).

Both return one value per pair; the Term averages them. Teachers are detached.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..registry import LOSSES

PAPER = "Trans-Encoder: Unsupervised sentence-pair modelling through self- and " \
    "mutual-distillations"
TEACHER_SCORES = ("logit", "prob")


def _is_score(x: Tensor) -> bool:
    return x.dim() == 1 or (x.dim() >= 2 and x.shape[-1] == 1)


def pair_scores(xs: Tensor | Sequence[Tensor], field: str) -> list[Tensor]:
    """One ``(B,)`` score per model in ``xs`` (module docstring): scores pass through (a last
    dim of 1 squeezed), consecutive embedding pairs become their cosine."""
    items = [xs] if torch.is_tensor(xs) else list(xs or [])
    if not items:
        raise ConfigError(field, [], "one or more taps: pair scores, or [u, v] embedding pairs")
    out, i = [], 0
    while i < len(items):
        x = items[i]
        if not torch.is_tensor(x):
            raise ConfigError(field, type(x).__name__, "tensors (taps)")
        if _is_score(x):
            out.append(x.reshape(x.shape[:-1]) if x.dim() >= 2 else x)
            i += 1
            continue
        y = items[i + 1] if i + 1 < len(items) else None
        if y is None or not torch.is_tensor(y) or y.shape != x.shape:
            raise ConfigError(field, [tuple(t.shape) for t in items if torch.is_tensor(t)],
                              "embeddings in pairs [u, v] of equal shape (B, D) per bi-encoder, "
                              "or (B,) / (B, 1) pair scores")
        dt = torch.promote_types(x.dtype, torch.float32)
        out.append(F.cosine_similarity(x.to(dt), y.to(dt), dim=-1))
        i += 2
    shape = out[0].shape
    if any(o.shape != shape for o in out):
        raise ConfigError(field, [tuple(o.shape) for o in out], "one score per pair, same rows")
    return out


def _one(xs, field: str) -> Tensor:
    s = pair_scores(xs, field)
    if len(s) != 1:
        raise ConfigError(field, len(s), "the student's one pair score (a cross-encoder's "
                          "logit, or a bi-encoder's [u, v])")
    x = s[0]
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _same_rows(s: Tensor, t: Tensor, name: str) -> None:
    if s.shape != t.shape:
        raise ConfigError(f"{name}.inputs", f"student {tuple(s.shape)} vs teacher "
                          f"{tuple(t.shape)}", "one score per pair on both sides")


def bi_labels(t, clamp: bool = True, field: str = "pair_bce.teacher") -> Tensor:
    """The bi-encoders' pseudo-labels: ``clamp(mean_k cos_k, 0, 1)`` (detached)."""
    y = torch.stack([x.detach() for x in pair_scores(t, field)]).mean(0)
    return y.clamp(0.0, 1.0) if clamp else y


def cross_labels(t, teacher_scores: str = "logit",
                 field: str = "pair_cosine_mse.teacher") -> Tensor:
    """The cross-encoders' pseudo-labels: ``mean_k sigmoid(z_k)`` (detached)."""
    if teacher_scores not in TEACHER_SCORES:
        raise ConfigError("pair_cosine_mse.teacher_scores", teacher_scores,
                          f"one of {', '.join(TEACHER_SCORES)}")
    zs = [x.detach() for x in pair_scores(t, field)]
    if teacher_scores == "logit":
        zs = [torch.sigmoid(z.float() if z.dtype not in (torch.float32, torch.float64) else z)
              for z in zs]
    return torch.stack(zs).mean(0)


@LOSSES.register("pair_bce", paper=PAPER, year=2022, inputs="logits", default_weight=1.0)
def pair_bce(s, t, *, clamp: bool = True) -> Tensor:
    """Bi -> cross: BCE of the student's pair logit on the bi-encoder teachers' clamped mean
    cosine (module docstring). ``student=["logits"]``; ``teacher=[u, v]`` embedding taps
    (``[u1, v1, u2, v2]`` for two bi-encoders) or their ``logits`` (the cosine)."""
    z = _one(s, "pair_bce.student")
    y = bi_labels(t, clamp).to(z.dtype)
    _same_rows(z, y, "pair_bce")
    return F.binary_cross_entropy_with_logits(z, y, reduction="none")


@LOSSES.register("pair_cosine_mse", paper=PAPER, year=2022, inputs="embeddings",
                 default_weight=1.0)
def pair_cosine_mse(s, t, *, teacher_scores: str = "logit") -> Tensor:
    """Cross -> bi: ``(cos(u, v) - mean_k sigmoid(z_k))^2`` per pair (module docstring).
    ``student=[u, v]`` embedding taps (or the bi-encoder's ``logits``); ``teacher``: each
    cross-encoder's logit tap."""
    c = _one(s, "pair_cosine_mse.student")
    y = cross_labels(t, teacher_scores).to(c.dtype)
    _same_rows(c, y, "pair_cosine_mse")
    return (c - y) ** 2
