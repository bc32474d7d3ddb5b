"""Any2Seg, classification form: language-guided correlation distillation (LSCD) and
modality-agnostic feature fusion (MFF) on paired image + audio digits.

Paper: Zheng, Wang & Wang, "Learning Modality-agnostic Representation for Semantic
Segmentation from Any Modalities", ECCV 2024 (no official code found). The paper distils
from LanguageBind, a frozen multimodal vision-language model; our small stand-in (ours, as
crossmodal.md prescribes): per modality a frozen teacher encoder trained CLIP-style to
*language anchors*, the all-MiniLM-L6-v2 embeddings of class prompts ("a handwritten seven",
"a spoken seven"; :func:`language_anchors`). Such a teacher is a zoo model whose classifier
is an :class:`AnchorHead` (embedding -> cosines to the fixed anchors / temperature), so
training it with plain CE *is* the CLIP image-to-text objective over the class prompts
(:func:`anchored`). The student is :class:`Any2SegFusion`: one encoder per modality with a
projection into the anchor space, MFF, and a linear head. The recipe ``any2seg`` adds LSCD
(``lscd`` in ``losses/correlation.py``), plain feature KD (``distill="feature"``) or nothing
(``"none"``, the fusion-without-LSCD baseline) to the CE of the fused logits.

Wiring: teacher = ``teacher_encoders({...})`` (a Members group of the anchored encoders),
``Distiller(student, teacher, recipe.terms, io=student.io(), teacher_io=teacher.io())``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distiller import Term
from ..errors import ConfigError
from ..models.mlp import replace_head
from ..registry import METHODS
from ..schema import NonNeg, Temperature, Width
from ..text.minilm import MINILM, encode
from . import Recipe
from .members import Members

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = {"image": "a handwritten {}", "audio": "a spoken {}"}
ANCHOR_FILE = Path(__file__).resolve().parents[1] / "data" / "assets" / "minilm_digits.safetensors"
SOURCES = ("auto", "cache", "minilm", "random")


def prompts(modality: str, classes=DIGITS) -> list[str]:
    """The class prompts of one modality: ``"a handwritten seven"``, ``"a spoken seven"``."""
    if modality not in TEMPLATES:
        raise ConfigError("any2seg.modality", modality, f"one of {', '.join(TEMPLATES)}")
    return [TEMPLATES[modality].format(c) for c in classes]


def write_anchor_cache(path: str | os.PathLike = ANCHOR_FILE) -> Path:
    """Encode every modality's digit prompts once and store them (10 x 384 each, with the
    prompts in the file's metadata): tests and benchmarks read this file, never the model."""
    from safetensors.torch import save_file

    tensors = {m: encode(prompts(m)).contiguous() for m in TEMPLATES}
    meta = {m: "|".join(prompts(m)) for m in TEMPLATES}
    save_file(tensors, str(path), metadata={"model": MINILM, **meta})
    return Path(path)


def random_anchors(k: int = 10, dim: int = 384, seed: int = 0) -> Tensor:
    """Fixed random orthonormal anchors (K, D): the fallback when no sentence encoder is."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, k, generator=g, dtype=torch.float64))
    return q.T.float().contiguous()


def language_anchors(modality: str, source: str = "auto") -> Tensor:
    """The (10, 384) unit anchors of ``modality``'s digit prompts. ``source``: ``"cache"`` the
    shipped file (made by :func:`write_anchor_cache`), ``"minilm"`` encode now, ``"random"``
    :func:`random_anchors` (seeded by the modality, so image and audio anchors differ),
    ``"auto"`` the cache, else MiniLM."""
    if source not in SOURCES:
        raise ConfigError("any2seg.anchors", source, f"one of {', '.join(SOURCES)}")
    texts = prompts(modality)
    if source == "random":
        return random_anchors(len(texts), seed=list(TEMPLATES).index(modality))
    if source in ("auto", "cache") and ANCHOR_FILE.exists():
        from safetensors import safe_open

        with safe_open(str(ANCHOR_FILE), "pt") as f:
            if f.metadata().get(modality) == "|".join(texts):
                return f.get_tensor(modality)
        if source == "cache":
            raise ConfigError("any2seg.anchors", str(ANCHOR_FILE), "holds other prompts")
    elif source == "cache":
        raise ConfigError("any2seg.anchors", str(ANCHOR_FILE), "missing: write_anchor_cache()")
    return encode(texts, field="any2seg.anchors")


# -- models ---------------------------------------------------------------------------------
class Normalize(nn.Module):
    """L2-normalise the last dim (a module, so the unit embedding can be tapped)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1)


def embed_head(in_dim: int, dim: int) -> nn.Sequential:
    """Linear projection to ``dim`` then L2 norm: a modality's embedding in the shared space."""
    return nn.Sequential(nn.Linear(in_dim, dim), Normalize())


class AnchorHead(nn.Module):
    """Classifier against fixed language anchors: ``logits = embed(x) @ anchors^T / T`` with
    unit rows on both sides (CLIP's scaled cosine; T fixed at 0.07, CLIP's initial value).
    ``embed`` (tap ``<head>.embed``) is the teacher embedding LSCD reads."""

    def __init__(self, in_dim: int, anchors: Tensor, temperature: float = 0.07):
        super().__init__()
        a = torch.as_tensor(anchors, dtype=torch.float32)
        if a.dim() != 2:
            raise ConfigError("any2seg.anchors", tuple(a.shape), "a (classes, dim) tensor")
        self.embed = embed_head(in_dim, a.shape[1])
        self.register_buffer("anchors", F.normalize(a, dim=-1))
        self.temperature = float(temperature)

    def forward(self, x: Tensor) -> Tensor:
        return self.embed(x) @ self.anchors.T / self.temperature


def _swap_head(model: nn.Module, make, field: str) -> nn.Module:
    """``model`` with its classifier replaced by ``make(in_features)``."""
    replace_head(model, lambda head: make(head.in_features), field)
    return model


def anchored(model: nn.Module, anchors: Tensor, temperature: Temperature = 0.07) -> nn.Module:
    """``model`` (a zoo classifier) with its classifier replaced by an :class:`AnchorHead`:
    trained with CE it is a CLIP-style encoder aligned to the language anchors."""
    return _swap_head(model, lambda d: AnchorHead(d, anchors, temperature), "any2seg.teacher")


def teacher_encoders(
    encoders: Mapping[str, nn.Module], anchors: Mapping[str, Tensor] | None = None,
    source: str = "auto",
) -> Members:
    """A :class:`Members` group of anchored encoders, one per modality (member name = batch
    key); ``anchors[m]`` defaults to :func:`language_anchors` ``(m, source)``. Train it with
    one CE term per member (each alone), then freeze it as the ``any2seg`` teacher."""
    anchors = dict(anchors or {})
    group = {
        m: anchored(enc, anchors[m] if m in anchors else language_anchors(m, source))
        for m, enc in encoders.items()
    }
    return Members(group, reads={m: m for m in group}, field="any2seg.teacher")


class MFF(nn.Module):
    """Modality-agnostic feature fusion (Any2Seg, Sec. MFF; our classification reading):
    the present modalities' unit embeddings ``e_m`` are re-weighted by their inter-modal
    correlation -- ``w = softmax_m(mean_{n != m} cos(e_m, e_n) / T)`` over the present ones,
    so a modality that agrees with the others counts more -- and a fine-grained selection
    keeps, per channel, the strongest present response: ``f = 1/2 (sum_m w_m e_m + max_m e_m)``.
    One present modality gives ``f = e_m``; none gives zeros."""

    def __init__(self, temperature: Temperature = 0.1):
        super().__init__()
        self.temperature = float(temperature)

    def forward(self, embs: Tensor, present: Tensor) -> Tensor:
        p = present.to(embs.dtype)  # (B, M)
        cos = embs @ embs.transpose(1, 2)  # (B, M, M), unit rows
        others = p[:, None, :] * (1 - torch.eye(p.shape[1], dtype=p.dtype, device=p.device))
        agree = (cos * others).sum(-1) / others.sum(-1).clamp_min(1)
        score = (agree / self.temperature).masked_fill(~present, -1e4)
        w = torch.softmax(score, -1) * p  # (B, M); absent -> 0 (all absent: all 0)
        weighted = (w[..., None] * embs).sum(1)
        top = embs.masked_fill(~present[..., None], float("-inf")).max(1).values
        top = torch.where(present.any(1, keepdim=True), top, torch.zeros_like(top))
        return 0.5 * (weighted + top)


class MeanFuse(nn.Module):
    """Mean of the present modalities' embeddings (late fusion; zeros where none)."""

    def forward(self, embs: Tensor, present: Tensor) -> Tensor:
        p = present.to(embs.dtype)
        return (embs * p[..., None]).sum(1) / p.sum(1, keepdim=True).clamp_min(1.0)


FUSIONS = ("mff", "mean")


class Any2SegFusion(nn.Module):
    """Student: one zoo encoder per modality (member name = batch key) whose classifier is
    replaced by a projection into the ``dim``-wide shared space (unit rows, tap
    ``<modality>.fc``), a fusion (``"mff"``: :class:`MFF`; ``"mean"``) and a linear ``head``.
    ``forward(**inputs)`` takes the batch keys by name; an all-zero input (or a left-out
    key) is a missing modality, as in the ``fusion`` model."""

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        num_classes: int,
        dim: Width = 384,
        fusion: str = "mff",
        temperature: Temperature = 0.1,
    ):
        super().__init__()
        if len(encoders) < 2:
            raise ConfigError("any2seg.student", list(encoders), "two or more modality encoders")
        if fusion not in FUSIONS:
            raise ConfigError("any2seg.fusion", fusion, f"one of {', '.join(FUSIONS)}")
        self.names = list(encoders)
        for m, enc in encoders.items():
            self.add_module(m, _swap_head(enc, lambda d: embed_head(d, dim), "any2seg.student"))
        self.fuse = MFF(temperature) if fusion == "mff" else MeanFuse()
        self.head = nn.Linear(dim, num_classes)
        self.dim = dim
        self.stages = [f"{m}.{s}" for m in self.names for s in getattr(encoders[m], "stages", [])]
        self.feature_path = "head"
        self.family = "fusion"

    def io(self) -> dict:
        return {"inputs": {m: m for m in self.names}}

    def embed(self, **inputs) -> tuple[Tensor, Tensor]:
        """(B, M, dim) embeddings and (B, M) presence of the given modalities."""
        given = [m for m in self.names if inputs.get(m) is not None]
        if not given:
            raise ConfigError("any2seg.inputs", list(inputs), f"one or more of {self.names}")
        ref = inputs[given[0]]
        embs, present = [], []
        for m in self.names:
            x = inputs.get(m)
            if x is None:
                embs.append(torch.zeros(ref.shape[0], self.dim, device=ref.device))
                present.append(torch.zeros(ref.shape[0], dtype=torch.bool, device=ref.device))
                continue
            embs.append(self.get_submodule(m)(x))
            present.append(x.flatten(1).ne(0).any(1))
        return torch.stack(embs, 1), torch.stack(present, 1)

    def forward(self, **inputs) -> Tensor:
        return self.head(self.fuse(*self.embed(**inputs)))


# -- the recipe -----------------------------------------------------------------------------
DISTILL = ("lscd", "feature", "none")


@METHODS.register(
    "any2seg",
    paper="Learning Modality-agnostic Representation for Semantic Segmentation from Any "
    "Modalities",
    year=2024,
    family="cross-modal",
)
def any2seg(
    student,
    teacher=None,
    *,
    distill: str = "lscd",
    inter_weight: NonNeg = 1.0,
    intra_weight: NonNeg = 1.0,
    temperature: Temperature = 0.1,
    divergence: str = "kl",
    feature_weight: NonNeg = 100.0,
) -> Recipe:
    """CE on the fused logits plus, per ``distill``: ``"lscd"`` inter- and intra-modal
    correlation distillation from the frozen anchored teacher encoders (weights
    ``inter_weight``, ``intra_weight``, ``temperature``, ``divergence`` kl/mse), ``"feature"``
    plain feature KD (MSE between each modality's student and teacher embedding, weight
    ``feature_weight``, default 100 as the library's FitNet recipe: the plain-KD baseline),
    ``"none"`` (fusion without LSCD). Weights 1 and temperature 0.1 for LSCD are ours: tune
    them on val."""
    if not isinstance(student, Any2SegFusion):
        raise ConfigError(
            "method.student", type(student).__name__,
            "any2seg trains crossdistill.methods.any2seg.Any2SegFusion",
        )
    if distill not in DISTILL:
        raise ConfigError("any2seg.distill", distill, f"one of {', '.join(DISTILL)}")
    terms = [Term("ce")]
    if distill == "none":
        return Recipe(terms, note="any2seg: fusion without LSCD")
    if not isinstance(teacher, Members) or list(teacher.names) != student.names:
        raise ConfigError(
            "method.teacher", type(teacher).__name__,
            f"teacher_encoders({{...}}) with members {student.names} (the student's modalities)",
        )
    heads = [teacher[m].get_submodule(teacher[m].feature_path) for m in student.names]
    if not all(isinstance(h, AnchorHead) for h in heads):
        raise ConfigError("method.teacher", "head", "anchored encoders (teacher_encoders)")
    s_taps = [f"{m}.{student.get_submodule(m).feature_path}" for m in student.names]
    t_taps = [f"{m}.{teacher[m].feature_path}.embed" for m in student.names]
    if distill == "feature":
        terms += [
            Term("mse", student=s, teacher=t, weight=feature_weight, name=f"feature_{m}",
                 projector="auto" if student.dim != h.anchors.shape[1] else None)
            for m, s, t, h in zip(student.names, s_taps, t_taps, heads)
        ]
        return Recipe(terms, note="any2seg: plain feature KD per modality")
    anchors = torch.stack([h.anchors for h in heads])
    terms.append(
        Term(
            "lscd", student=s_taps, teacher=t_taps, anchors=anchors, temperature=temperature,
            inter_weight=inter_weight, intra_weight=intra_weight, divergence=divergence,
            keys=student.names,
        )
    )
    return Recipe(terms, note=f"any2seg: LSCD {s_taps} <- {t_taps}")
