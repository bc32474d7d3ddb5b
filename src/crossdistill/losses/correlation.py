"""Language-guided semantic correlation distillation (LSCD) of Any2Seg, classification form.

Zheng, Wang & Wang, "Learning Modality-agnostic Representation for Semantic Segmentation
from Any Modalities", ECCV 2024 (no official code found). A frozen multimodal teacher
embeds every modality (``t_m``) and every class prompt (``l_c``) in one space; LSCD passes
two kinds of correlation to the student's projected embeddings ``e_m``:

* inter-modal: per sample the M x M cosine matrix across modalities, ``A_mn = cos(x_m, x_n)``;
* intra-modal: per modality the sample-to-class cosines against the language anchors,
  ``R_mc = cos(x_m, l_c)``.

Both are matched row by row as ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``
(``divergence="kl"``) or by MSE on the raw cosines (``"mse"``). The abstract says
"distil"; the divergence, the temperature and the row-softmax are our inference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import LOSSES
from ..schema import NonNeg, Temperature
from .divergences import kl
from .features import _no_autocast, _upcast

DIVERGENCES = ("kl", "mse")


def cosine_matrix(x: Tensor) -> Tensor:
    """(..., M, D) modality embeddings -> (..., M, M) cosines between modalities."""
    z = F.normalize(_upcast(x), dim=-1)
    with _no_autocast(z):
        return z @ z.transpose(-1, -2)


def class_cosines(x: Tensor, anchors: Tensor) -> Tensor:
    """(..., D) embeddings against (K, D) class anchors -> (..., K) cosines."""
    z = F.normalize(_upcast(x), dim=-1)
    with _no_autocast(z):
        return z @ F.normalize(anchors.to(z.dtype), dim=-1).T


def match_rows(s: Tensor, t: Tensor, temperature: float, divergence: str = "kl") -> Tensor:
    """Per row (last dim): ``T^2 KL(softmax(sg(t)/T) || softmax(s/T))`` (``"kl"``) or
    ``mean (s - sg(t))^2`` (``"mse"``)."""
    t = t.detach()
    if divergence == "mse":
        return (s - t).pow(2).mean(-1)
    T = temperature
    return kl(F.log_softmax(t / T, -1), F.log_softmax(s / T, -1)) * T * T


def inter_modal(s: Tensor, t: Tensor, *, temperature: float = 0.1, divergence: str = "kl"):
    """Inter-modal correlation distillation: ``s``, ``t`` (..., M, D_s), (..., M, D_t) stacked
    modality embeddings; returns (...) the mean over the M rows of each sample's matrix."""
    return match_rows(cosine_matrix(s), cosine_matrix(t), temperature, divergence).mean(-1)


def intra_modal(
    s: Tensor, t: Tensor, anchors_s: Tensor, anchors_t: Tensor | None = None, *,
    temperature: float = 0.1, divergence: str = "kl",
) -> Tensor:
    """Intra-modal correlation distillation for one modality: (..., D_s) student and
    (..., D_t) teacher embeddings against the class anchors in their own spaces (the same
    anchors when ``anchors_t`` is None); returns (...)."""
    at = anchors_s if anchors_t is None else anchors_t
    return match_rows(class_cosines(s, anchors_s), class_cosines(t, at), temperature, divergence)


@LOSSES.register(
    "lscd",
    paper="Learning Modality-agnostic Representation for Semantic Segmentation from Any "
    "Modalities (LSCD)",
    year=2024,
    inputs="embeddings",
    default_weight=1.0,
    stateful=True,
)
class LSCDLoss(nn.Module):
    """LSCD for a multi-tap term: ``student=[e_1, ..., e_M]`` (the student's per-modality
    embeddings), ``teacher=[t_1, ..., t_M]`` (the frozen teacher's, in the language space):

    ``L = inter_weight * inter_modal([e], [t]) + intra_weight * 1/M sum_m intra_modal(e_m, t_m)``

    (see the module docstring). ``anchors``: the (K, D_t) class anchors, or (M, K, D_t) one
    set per modality ("a handwritten seven", "a spoken seven"). A student embedding whose size
    is not D_t goes through a trainable ``Linear(D_s, D_t)`` here (the "projected"
    embedding; identity when the sizes agree). ``keys``: the modalities' batch keys; where
    the batch holds ``present_<key>`` (the ``modality_dropout`` stage), absent modalities are
    left out: the inter-modal term uses the samples with every modality present, the
    intra-modal term of modality m those with m present.
    """

    takes_batch = True

    def __init__(
        self,
        s_shapes,
        t_shapes,
        *,
        num_samples=None,
        anchors=None,
        temperature: Temperature = 0.1,
        inter_weight: NonNeg = 1.0,
        intra_weight: NonNeg = 1.0,
        divergence: str = "kl",
        keys: Sequence[str] | None = None,
    ):
        super().__init__()
        multi = lambda x: isinstance(x, (list, tuple)) and all(  # noqa: E731
            isinstance(v, (list, tuple)) for v in x
        )
        if not multi(s_shapes) or not multi(t_shapes) or len(s_shapes) != len(t_shapes):
            raise ConfigError(
                "lscd.inputs", (s_shapes, t_shapes),
                "one student and one teacher embedding tap per modality, in the same order",
            )
        m = len(s_shapes)
        if m < 2:
            raise ConfigError("lscd.inputs", m, "two or more modalities")
        if divergence not in DIVERGENCES:
            raise ConfigError("lscd.divergence", divergence, f"one of {', '.join(DIVERGENCES)}")
        if anchors is None:
            raise ConfigError("lscd.anchors", None, "the (K, D) or (M, K, D) class anchors")
        a = torch.as_tensor(anchors, dtype=torch.float32)
        d_t = [int(t[-1]) for t in t_shapes]
        if a.dim() == 2:
            a = a.expand(m, *a.shape)
        if a.dim() != 3 or a.shape[0] != m or any(a.shape[-1] != d for d in d_t):
            raise ConfigError(
                "lscd.anchors", tuple(a.shape), f"(K, {d_t[0]}) or ({m}, K, {d_t[0]})"
            )
        if keys is not None and len(keys) != m:
            raise ConfigError("lscd.keys", keys, f"{m} batch keys, one per modality")
        self.keys = list(keys) if keys is not None else None
        self.register_buffer("anchors", a.clone(), persistent=False)
        self.proj = nn.ModuleList(
            [nn.Identity() if int(s[-1]) == d else nn.Linear(int(s[-1]), d)
             for s, d in zip(s_shapes, d_t)]
        )
        self.temperature, self.divergence = float(temperature), divergence
        self.inter_weight, self.intra_weight = float(inter_weight), float(intra_weight)

    def present(self, batch, n: int, device) -> Tensor:
        """(B, M) bool: which modalities each sample has."""
        cols = []
        for k in self.keys or []:
            p = (batch or {}).get(f"present_{k}")
            cols.append(torch.ones(n, dtype=torch.bool, device=device) if p is None
                        else p.to(device).bool().reshape(n))
        return torch.stack(cols, 1) if cols else torch.ones(n, len(self.proj), dtype=torch.bool,
                                                              device=device)

    def forward(self, s, t, *, batch=None, **_) -> Tensor:
        e = [p(x.reshape(x.shape[0], -1)) for p, x in zip(self.proj, s)]
        tt = [x.reshape(x.shape[0], -1).detach() for x in t]
        here = self.present(batch, e[0].shape[0], e[0].device)
        kw = {"temperature": self.temperature, "divergence": self.divergence}
        both = here.all(1).to(e[0].dtype)
        inter = inter_modal(torch.stack(e, 1), torch.stack(tt, 1), **kw)
        inter = (inter * both).sum() / both.sum().clamp_min(1)
        intra = 0.0
        for m, (em, tm) in enumerate(zip(e, tt)):
            w = here[:, m].to(em.dtype)
            v = intra_modal(em, tm, self.anchors[m], **kw)
            intra = intra + (v * w).sum() / w.sum().clamp_min(1)
        return self.inter_weight * inter + self.intra_weight * intra / len(e)
