"""SgVA-CLIP: a semantic-guided visual adapter on a frozen CLIP-style teacher, few-shot.

Peng et al., "SgVA-CLIP: Semantic-guided Visual Adapting of Vision-Language Models for
Few-shot Image Classification" (2022). No official code was found: everything below the
three losses' names is our reading of the paper, and says so.

The teacher (image tower + class text embeddings ``w_c``) is frozen. A residual vision adapter
on its image features ``f`` (CLIP-Adapter's form, ratio ``r``):
``v = r * A(f) + (1 - r) * f``, ``A`` a two-layer bottleneck MLP (inference). With
``z_a = cos(v, w) / tau`` and the zero-shot ``z_0 = cos(f, w) / tau``, the adapter is trained
on the few labelled shots with

- the vision-specific supervised contrastive loss on ``v`` (``supcon``, Khosla et al. 2020),
- the cross-modal contrastive loss between ``v`` and the class texts (``cross_modal``: image ->
  text and text -> image, form inferred),
- implicit knowledge distillation ``KL(softmax(z_0) || softmax(z_a))`` (``kd`` at T = 1:
  keeps the adapted image-text distribution near zero-shot CLIP's; the direction is our
  inference).

Prediction mixes the adapted classifier with zero-shot CLIP: ``z = b z_a + (1 - b) z_0``,
``b`` in ``{0, 0.1, ..., 1}`` chosen on val before every validation (:class:`ChooseRatio`).
The "CE only" baseline trains the same adapter with ``CE(z_a, y)`` alone.

``tau`` defaults to 0.01 (CLIP's trained logit scale of 100, as CLIP's zero-shot, CoOp and
Tip-Adapter use); the supervised contrastive loss uses 0.07.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..losses import vl_classify as _vl_losses  # noqa: F401  (registers the losses)
from ..registry import METHODS
from ..schema import NonNeg, Pos
from .vlm_ood import TextClassifier

RATIOS = tuple(round(0.1 * i, 1) for i in range(11))


class ResidualAdapter(nn.Module):
    """``v = ratio * mlp(f) + (1 - ratio) * f``, ``mlp = Linear(D, D/r) - ReLU - Linear(D/r, D)``
    (CLIP-Adapter's bottleneck, reduction 4)."""

    def __init__(self, dim: int, ratio: float = 0.2, reduction: int = 4):
        super().__init__()
        if not 0.0 <= float(ratio) <= 1.0:
            raise ConfigError("method.adapter_ratio", ratio, "a number in [0, 1]")
        if dim < 1 or reduction < 1:
            raise ConfigError("method.adapter", (dim, reduction), "dim >= 1, reduction >= 1")
        hidden = max(1, dim // reduction)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.ratio = float(ratio)

    def forward(self, f: Tensor) -> Tensor:
        return self.ratio * self.mlp(f) + (1 - self.ratio) * f


class AdaptedClassifier(TextClassifier):
    """A frozen image tower + :class:`ResidualAdapter` + class texts. Training returns the
    adapted logits ``z_a``; eval returns the mix ``b z_a + (1 - b) z_0`` (buffer ``mix``)."""

    def __init__(self, image: nn.Module, texts: Tensor, temperature: float = 0.01,
                 ratio: float = 0.2, reduction: int = 4):
        dim = int(texts.shape[-1]) if torch.is_tensor(texts) and texts.dim() == 2 else 0
        if dim < 1:
            raise ConfigError("model.texts", tuple(getattr(texts, "shape", ())),
                              "(K, D) class text embeddings")
        super().__init__(image, texts, temperature, ResidualAdapter(dim, ratio, reduction),
                         freeze_image=True)
        self.register_buffer("mix", torch.tensor(1.0))

    def both(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(adapted logits z_a, zero-shot logits z_0)."""
        with torch.no_grad():
            f = self.embed(x)
        z0 = self.logits(f)
        za = self.logits(self.embed_out(self.adapter(f)))
        return za, z0

    def forward(self, x: Tensor) -> Tensor:
        za, z0 = self.both(x)
        if self.training:
            return za
        return self.mix * za + (1 - self.mix) * z0


class ChooseRatio:
    """Callback: before each validation set the student's ``mix`` to the ratio in
    :data:`RATIOS` with the best val accuracy (ties: the larger ratio, the adapter)."""

    def __init__(self, model: AdaptedClassifier, val, batch_size: int = 512):
        if not isinstance(model, AdaptedClassifier):
            raise ConfigError("method.student", type(model).__name__, "an AdaptedClassifier")
        self.model, self.val, self.batch_size = model, val, batch_size

    @torch.no_grad()
    def choose(self, device="cpu") -> tuple[float, float]:
        was = self.model.training
        self.model.eval()
        zas, z0s = [], []
        x, y = self.val["x"], self.val["y"]
        for i in range(0, len(x), self.batch_size):
            za, z0 = self.model.both(x[i:i + self.batch_size].to(device))
            zas.append(za)
            z0s.append(z0)
        self.model.train(was)
        za, z0, y = torch.cat(zas), torch.cat(z0s), y.to(device)
        best = (-1.0, 1.0)
        for b in sorted(RATIOS, reverse=True):
            acc = float(((b * za + (1 - b) * z0).argmax(-1) == y).float().mean())
            if acc > best[0]:
                best = (acc, b)
        self.model.mix.fill_(best[1])
        return best

    def on_val_start(self, trainer) -> None:
        self.choose(trainer.device)


@METHODS.register(
    "sgva-clip",
    paper="SgVA-CLIP: Semantic-guided Visual Adapting of Vision-Language Models for Few-shot "
    "Image Classification",
    year=2022,
    family="vision-language",
)
def sgva_clip(student, teacher, *, supcon_weight: NonNeg = 1.0, cross_modal_weight: NonNeg = 1.0,
              kd_weight: NonNeg = 1.0, ce_weight: NonNeg = 0.0, supcon_temperature: Pos = 0.07):
    """SgVA-CLIP's three losses (module docstring) for an :class:`AdaptedClassifier` student
    and its zero-shot teacher (a :class:`TextClassifier` of the same frozen tower and texts).
    ``ce_weight`` > 0 adds plain CE on the adapted logits; the CE-only baseline is
    ``ce_weight=1`` with the other three at 0. Add :class:`ChooseRatio` to the trainer's
    callbacks for the val-chosen mix."""
    from ..distiller import Term
    from . import Recipe
    from .vlm_ood import _check_pair, check_weights

    if not isinstance(student, AdaptedClassifier):
        raise ConfigError("method.student", type(student).__name__,
                          "an AdaptedClassifier (crossdistill.methods.sgva)")
    _check_pair(student, teacher, "sgva-clip")
    check_weights(supcon_weight=supcon_weight, cross_modal_weight=cross_modal_weight,
                  kd_weight=kd_weight, ce_weight=ce_weight)
    weights = {"supcon": supcon_weight, "cross_modal": cross_modal_weight, "kd": kd_weight,
               "ce": ce_weight}
    terms = []
    if supcon_weight:
        terms.append(Term("supcon", student="embed_out", teacher=None, weight=supcon_weight,
                          temperature=supcon_temperature))
    if cross_modal_weight:
        terms.append(Term("cross_modal", student=["embed_out", "text_out"], teacher=None,
                          weight=cross_modal_weight, temperature=student.temperature))
    if kd_weight:
        terms.append(Term("kd", name="implicit_kd", teacher="logits", weight=kd_weight,
                          temperature=1.0))
    if ce_weight:
        terms.append(Term("ce", weight=ce_weight))
    on = "+".join(k for k, w in weights.items() if w)
    return Recipe(terms, note=f"sgva-clip: {on}; mix with zero-shot chosen on val")
