"""VLM-OOD: distilling a vision-language teacher so that a small student keeps its
open-vocabulary (unseen-class) recognition.

Li et al., "Distilling Large Vision-Language Model with Out-of-Distribution
Generalizability" (ICCV 2023). The student's image encoder maps into the teacher's joint
space; classes are the teacher's (frozen) text embeddings ``t_c`` of their prompts, optionally
enriched with attribute descriptions. With unit vectors ``s^`` (student image embedding),
``v^`` (teacher image embedding), ``t^_c`` and ``tau = 0.07``:

- L-cls     ``= CE(cos(s^, t^_c) / tau, y)``
- L-vlalign ``= KL(softmax(z_t[K]) || softmax(z_s[K]))`` over the teacher's top-k classes K,
  ``z = cos(., t^_c) / tau``, optionally only on images the teacher classifies correctly
- L-mse     ``= || s^ - v^ ||^2``
- L-im-cst  ``= 1/2 [CE(S, diag) + CE(S^T, diag)]``, ``S_ij = s^_i . v^_j / tau``

``L = L-cls + L-vlalign + L-mse + L-im-cst`` (all weights 1, as in the official
``main_experiments.py``). At test time the student classifies unseen classes by swapping in
their text embeddings (:meth:`TextClassifier.set_texts`).

Attribute texts (:func:`class_text_embeddings`): the official code appends one ChatGPT
description to each class name (``"a photo of {name} . {description}"``); ``mode="concat"``
does that, ``mode="mean"`` (the default here) averages the unit embeddings of the name
prompt and each description, as CLIP prompt ensembling does.

Differences from the official code: (1) its checkpoint is the best on the OOD evaluation
split itself (``is_best`` on ``val_loader`` = the unseen classes); here the checkpoint is
chosen on the seen classes' val split, and the unseen test split is read once; (2) with
``correct_only`` its mean over the kept images is NaN when the teacher gets no image of a
batch right; here that batch's L-vlalign is 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..losses import vl_classify as _vl_losses  # noqa: F401  (registers the losses)
from ..models.mlp import replace_head
from ..registry import METHODS
from ..schema import Count, NonNeg, Pos


class TextClassifier(nn.Module):
    """An image encoder classified against fixed class text embeddings:
    ``forward(x) = cos(embed_out(adapter(image(x))), text_out(texts)) / temperature``, (B, K).
    Taps: ``embed_out`` (the image embedding, (B, D)) and ``text_out`` (the class texts,
    (K, D)). ``freeze_image``: the image encoder is frozen and stays in eval mode (a frozen
    teacher's tower under an adapter)."""

    def __init__(self, image: nn.Module, texts: Tensor, temperature: float = 0.07,
                 adapter: nn.Module | None = None, freeze_image: bool = False):
        super().__init__()
        if not float(temperature) > 0:
            raise ConfigError("model.temperature", temperature, "a number > 0")
        self.image, self.adapter = image, adapter
        self.temperature, self.freeze_image = float(temperature), bool(freeze_image)
        if freeze_image:
            image.requires_grad_(False)
            image.eval()
        self.embed_out, self.text_out = nn.Identity(), nn.Identity()
        self.register_buffer("texts", torch.zeros(0), persistent=False)
        self.set_texts(texts)
        self.feature_path = "embed_out"
        self.stages = [f"image.{s}" for s in getattr(image, "stages", [])]

    def set_texts(self, texts: Tensor) -> TextClassifier:
        """Classify against ``texts`` (K, D) from now on (unseen classes at test time)."""
        if not torch.is_tensor(texts) or texts.dim() != 2 or len(texts) < 2:
            raise ConfigError("model.texts", tuple(getattr(texts, "shape", ())),
                              "(K, D) class text embeddings, K >= 2")
        self.texts = F.normalize(texts.detach().float(), dim=-1).to(self.texts.device)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_image:
            self.image.eval()
        return self

    def embed(self, x: Tensor) -> Tensor:
        f = self.image(x)
        if f.dim() != 2 or f.shape[-1] != self.texts.shape[-1]:
            raise ConfigError("model.image", tuple(f.shape),
                              f"(B, {self.texts.shape[-1]}) embeddings: the class texts' width")
        return f

    def logits(self, f: Tensor) -> Tensor:
        w = self.text_out(self.texts)
        return F.normalize(f, dim=-1) @ w.to(f.dtype).T / self.temperature

    def forward(self, x: Tensor) -> Tensor:
        f = self.embed(x)
        if self.adapter is not None:
            f = self.adapter(f)
        return self.logits(self.embed_out(f))


def embedder(model: nn.Module, dim: int) -> nn.Module:
    """A zoo classifier turned into an image encoder: its head replaced by ``Linear(in, dim)``."""
    replace_head(model, lambda head: nn.Linear(head.in_features, dim), "method.student")
    return model


@torch.no_grad()
def class_text_embeddings(dual, texts: list[list[str]], tokenizer, *, mode: str = "mean",
                          max_tokens: int = 48) -> Tensor:
    """(K, D) unit class embeddings from a dual encoder's text side (its tower, cached or
    not). ``texts[c]``: the class's name prompt first, then any attribute descriptions;
    ``mode``: ``"mean"`` (mean of the unit embeddings) or ``"concat"`` (one string, name
    ``" . "`` descriptions, as the official code writes it)."""
    from ..data.turns import _ids

    if mode not in ("mean", "concat"):
        raise ConfigError("method.attr_mode", mode, "mean or concat")
    if not texts or any(not t for t in texts):
        raise ConfigError("method.class_texts", texts, "one or more strings per class")
    was = dual.training
    dual.eval()
    try:
        if mode == "concat":
            flat = [" . ".join(t) for t in texts]
            ids, mask = _ids(tokenizer, flat, max_tokens)
            out = F.normalize(dual.text(ids, mask), dim=-1)
        else:
            out = []
            for t in texts:
                ids, mask = _ids(tokenizer, list(t), max_tokens)
                out.append(F.normalize(F.normalize(dual.text(ids, mask), dim=-1).mean(0), dim=-1))
            out = torch.stack(out)
    finally:
        dual.train(was)
    return out.float()


def check_weights(**weights) -> None:
    """Every term weight of a recipe is a number >= 0 (0: the term is left out), and one is
    > 0."""
    for k, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
            raise ConfigError(f"method.{k}", w, "a number >= 0 (0 leaves the term out)")
    if not any(weights.values()):
        first = next(iter(weights))
        raise ConfigError(f"method.{first}", 0.0, "at least one term with a weight > 0")


def _check_pair(student, teacher, name: str) -> None:
    if not isinstance(student, TextClassifier):
        raise ConfigError("method.student", type(student).__name__,
                          f"a TextClassifier (crossdistill.methods.vlm_ood) for {name}")
    if not isinstance(teacher, TextClassifier):
        raise ConfigError("method.teacher", type(teacher).__name__ if teacher is not None
                          else None, f"the teacher as a TextClassifier over the same class "
                          f"texts for {name}")
    if student.texts.shape != teacher.texts.shape or not torch.allclose(
            student.texts, teacher.texts.to(student.texts.device), atol=1e-6):
        raise ConfigError("method.teacher.texts", tuple(teacher.texts.shape),
                          f"the student's class texts {tuple(student.texts.shape)} (one "
                          "label space for both)")


@METHODS.register(
    "vlm-ood",
    paper="Distilling Large Vision-Language Model with Out-of-Distribution Generalizability",
    year=2023,
    family="vision-language",
)
def vlm_ood(student, teacher, *, cls_weight: NonNeg = 1.0, vlalign_weight: NonNeg = 1.0,
            mse_weight: NonNeg = 1.0, im_cst_weight: NonNeg = 1.0, k: Count = 256,
            correct_only: bool = True, temperature: Pos = 0.07):
    """VLM-OOD's terms (module docstring); a weight of 0 leaves its term out (L-cls alone:
    ``vlalign_weight=0, mse_weight=0, im_cst_weight=0``). ``temperature`` is L-im-cst's (the
    classifiers' own ``temperature`` scales the logits of L-cls and L-vlalign)."""
    from ..distiller import Term
    from . import Recipe

    _check_pair(student, teacher, "vlm-ood")
    check_weights(cls_weight=cls_weight, vlalign_weight=vlalign_weight, mse_weight=mse_weight,
                  im_cst_weight=im_cst_weight)
    weights = {"cls": cls_weight, "vlalign": vlalign_weight, "mse": mse_weight,
               "im_cst": im_cst_weight}
    terms = []
    if cls_weight:
        terms.append(Term("ce", name="cls", weight=cls_weight))
    if vlalign_weight:
        terms.append(Term("vlalign", teacher="logits", weight=vlalign_weight, k=k,
                          correct_only=correct_only))
    if mse_weight:
        terms.append(Term("unit_mse", name="mse", student="embed_out", teacher="embed_out",
                          weight=mse_weight))
    if im_cst_weight:
        terms.append(Term("info_nce", name="im_cst", student="embed_out", teacher="embed_out",
                          weight=im_cst_weight, temperature=temperature, symmetric=True))
    on = "+".join(k for k, w in weights.items() if w)
    return Recipe(terms, note=f"vlm-ood: {on}")
