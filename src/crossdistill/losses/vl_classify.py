"""Losses of the classification methods that distil a CLIP-style teacher (issue 14):
VLM-OOD, SgVA-CLIP and MaKD.

Logits here are cosine logits ``cos(image, class text) / tau`` made by the model (the
``tau`` lives in :class:`crossdistill.methods.vlm_ood.TextClassifier`), so the losses take
them as they are (temperature 1).

- ``vlalign`` (VLM-OOD, Li et al., "Distilling Large Vision-Language Model with
  Out-of-Distribution Generalizability", ICCV 2023, L-vlalign): on the teacher's top-k
  classes ``K_i`` of sample i, ``L_i = KL(softmax(t_i[K_i]) || softmax(s_i[K_i]))``;
  ``correct_only`` keeps only samples whose teacher argmax (over all classes) is the label.
- ``unit_mse`` (VLM-OOD, L-mse): ``L_i = || s_i/|s_i| - t_i/|t_i| ||^2`` (summed over the
  embedding, as the official code does; = 2 (1 - cos)).
- ``supcon`` (SgVA-CLIP's vision-specific contrastive loss, in the form of Khosla et al.,
  "Supervised Contrastive Learning", NeurIPS 2020, Eq. 2, L_out): with unit rows ``z`` and
  ``P(i)`` the other samples of i's class, ``L_i = -1/|P(i)| sum_{p in P(i)} log
  exp(z_i.z_p/tau) / sum_{a != i} exp(z_i.z_a/tau)``; samples alone in their class in the
  batch contribute nothing.
- ``cross_modal`` (SgVA-CLIP's cross-modal contrastive loss; its form is our inference: no
  official code): adapted image features ``v`` (B, D) against the class text embeddings
  ``w`` (K, D), ``S = v^ w^T / tau``. Image -> text: ``CE(S_i, y_i)``; text -> image: for
  each class c of the batch, ``-1/|P_c| sum_{i in P_c} log softmax_i(S_{:, c})`` (the images
  of c are its positives, every other image a negative). ``L = 1/2 (mean_i + mean_c)``.
- ``aspect_bce`` (MaKD, Lee et al., 2025): ``L_i = mean_k BCE_with_logits(s_ik, a_ik)`` with
  soft targets ``a = sigmoid(teacher aspect logits)`` (MaKD's ``softmax([z_Yes, z_No])_Yes``
  is ``sigmoid(z_Yes - z_No)``: a two-way softmax is a sigmoid of the logit difference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..registry import LOSSES
from ..schema import Count, Pos


def _f32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _same(name: str, s: Tensor, t: Tensor) -> None:
    if not torch.is_tensor(s) or not torch.is_tensor(t) or s.dim() < 2 or s.shape != t.shape:
        shapes = (tuple(getattr(s, "shape", ())), tuple(getattr(t, "shape", ())))
        raise ConfigError(f"{name}.inputs", f"student {shapes[0]} vs teacher {shapes[1]}",
                          "two (..., K) tensors of the same shape")


@LOSSES.register(
    "vlalign",
    paper="Distilling Large Vision-Language Model with Out-of-Distribution Generalizability "
    "(L-vlalign)",
    year=2023,
    inputs="logits",
    default_weight=1.0,
)
def vlalign(s: Tensor, t: Tensor, *, k: Count = 256, correct_only: bool = False,
            y: Tensor | None = None) -> Tensor:
    """VLM-OOD's L-vlalign (module docstring). ``s``, ``t``: (B, K) cosine logits over the
    same class texts; ``k`` is clipped to K (the official scripts use 256: every class).
    Returns one value per sample, or with ``correct_only`` the mean over the kept samples
    (0 when the teacher gets none right: the official code's mean over an empty selection
    is NaN)."""
    _same("vlalign", s, t)
    if s.dim() != 2:
        raise ConfigError("vlalign.inputs", tuple(s.shape), "(B, K) logits")
    s, t = _f32(s), _f32(t.detach())
    kk = min(int(k), s.shape[-1])
    t_top, ids = t.topk(kk, dim=-1)
    s_top = s.gather(-1, ids)
    log_p = F.log_softmax(t_top, -1)
    per = (log_p.exp() * (log_p - F.log_softmax(s_top, -1))).sum(-1)
    if not correct_only:
        return per
    if y is None:
        raise ConfigError("vlalign.correct_only", True, "labels in the batch (y)")
    keep = (t.argmax(-1) == y) & (y >= 0)
    return (per * keep).sum() / keep.sum().clamp_min(1)


@LOSSES.register(
    "unit_mse",
    paper="Distilling Large Vision-Language Model with Out-of-Distribution Generalizability "
    "(L-mse)",
    year=2023,
    inputs="embeddings",
    default_weight=1.0,
)
def unit_mse(s: Tensor, t: Tensor) -> Tensor:
    """``|| s^ - t^ ||^2`` of the L2-normalised embeddings, one value per position."""
    _same("unit_mse", s, t)
    s, t = _f32(s), _f32(t.detach())
    return (F.normalize(s, dim=-1) - F.normalize(t, dim=-1)).pow(2).sum(-1)


def _labels(name: str, y: Tensor | None, n: int) -> Tensor:
    if y is None or not torch.is_tensor(y) or y.shape != (n,):
        raise ConfigError(f"{name}.y", None if y is None else tuple(y.shape),
                          f"one class label per sample ({n})")
    return y


@LOSSES.register(
    "supcon",
    paper="Supervised Contrastive Learning (L_out; SgVA-CLIP's vision-specific contrastive "
    "loss)",
    year=2020,
    inputs="embeddings",
    default_weight=1.0,
)
def supcon(s: Tensor, t: Tensor | None = None, *, temperature: Pos = 0.07,
           y: Tensor | None = None) -> Tensor:
    """Supervised contrastive loss over the batch's rows ``s`` (B, D) with labels ``y``
    (-100: unlabelled, neither anchor nor positive). Returns the mean over anchors that have a
    positive (0 if none)."""
    if not torch.is_tensor(s) or s.dim() != 2 or s.shape[0] < 2:
        raise ConfigError("supcon.inputs", tuple(getattr(s, "shape", ())),
                          "(B, D) embeddings, B >= 2")
    y = _labels("supcon", y, s.shape[0])
    z = F.normalize(_f32(s), dim=-1)
    sim = z @ z.T / temperature
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    valid = y >= 0
    others = ~eye & valid[None, :]
    pos = (y[:, None] == y[None, :]) & others & valid[:, None]
    log_prob = sim - torch.logsumexp(sim.masked_fill(~others, float("-inf")), -1, keepdim=True)
    n_pos = pos.sum(-1)
    anchor = n_pos > 0
    per = -(log_prob.masked_fill(~pos, 0.0)).sum(-1) / n_pos.clamp_min(1)
    return (per * anchor).sum() / anchor.sum().clamp_min(1)


@LOSSES.register(
    "cross_modal",
    paper="SgVA-CLIP: Semantic-guided Visual Adapting of Vision-Language Models for Few-shot "
    "Image Classification (cross-modal contrastive loss; form inferred)",
    year=2022,
    inputs="embeddings",
    default_weight=1.0,
)
def cross_modal(s, t=None, *, temperature: Pos = 0.07, y: Tensor | None = None) -> Tensor:
    """``s = [image features (B, D), class text embeddings (K, D)]`` (two student taps; the
    texts are constants of the model), labels ``y`` in [0, K): the symmetric image-text
    contrastive loss of the module docstring. Returns a scalar."""
    if not isinstance(s, (list, tuple)) or len(s) != 2:
        raise ConfigError("cross_modal.student", type(s).__name__,
                          "two taps: image features (B, D) and class texts (K, D)")
    v, w = s
    if v.dim() != 2 or w.dim() != 2 or v.shape[-1] != w.shape[-1]:
        raise ConfigError("cross_modal.inputs", f"{tuple(v.shape)} vs {tuple(w.shape)}",
                          "(B, D) image features and (K, D) class texts of one width D")
    y = _labels("cross_modal", y, v.shape[0])
    keep = y >= 0
    if bool((y[keep] >= w.shape[0]).any()):
        raise ConfigError("cross_modal.y", int(y.max()), f"labels in [0, {w.shape[0]})")
    v, w, y = v[keep], w, y[keep]
    if len(y) == 0:
        return s[0].sum() * 0.0
    logits = F.normalize(_f32(v), dim=-1) @ F.normalize(_f32(w.detach()), dim=-1).T / temperature
    i2t = F.cross_entropy(logits, y)
    col = F.log_softmax(logits, dim=0)  # over images, per class text
    present = torch.unique(y)
    onehot = (y[:, None] == present[None, :]).to(col.dtype)  # (B', C_present)
    t2i = -((col[:, present] * onehot).sum(0) / onehot.sum(0)).mean()
    return 0.5 * (i2t + t2i)


@LOSSES.register(
    "aspect_bce",
    paper="Multi-aspect Knowledge Distillation with Large Language Model (MaKD aspect loss)",
    year=2025,
    inputs="logits",
    default_weight=4.0,
)
def aspect_bce(s: Tensor, t: Tensor) -> Tensor:
    """``mean_k BCE_with_logits(s_k, sigmoid(t_k))`` per sample: ``s`` the student's aspect
    logits, ``t`` the teacher's aspect logits (or use ``t`` = targets' logits), (..., A)."""
    _same("aspect_bce", s, t)
    s, t = _f32(s), _f32(t.detach())
    return F.binary_cross_entropy_with_logits(s, torch.sigmoid(t), reduction="none").mean(-1)
