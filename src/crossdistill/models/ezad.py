"""EZAD's two models: the CLIP stand-in (a digit-crop encoder aligned to text embeddings of
class names) and the detector whose class head is an embedding head.

Paper: Liu, Hu & Nevatia, "Efficient Feature Distillation for Zero-shot Annotation Object
Detection" (EZAD), WACV 2024. EZAD distils CLIP (ViT-B/32) into a Mask R-CNN whose RoI head
embeds each region and classifies it by cosine to CLIP's text embeddings of the class
names (temperature 100 in the official ``ConvFCEmbeddingBBoxHead``, i.e. T = 0.01).

* :class:`CropEncoder` (``ezad-clip``): the web-scale CLIP stand-in, ours: a tiny ViT (it has
  LayerNorms, as CLIP's ViT, so EZAD's LayerNorm-only adaptation applies) whose classifier is
  an :class:`~crossdistill.methods.any2seg.AnchorHead` against the frozen all-MiniLM-L6-v2
  embeddings of the digit prompts, trained here with CE over the prompts on whole MNIST
  digits (CLIP's image-to-text objective over the class texts; every digit, as CLIP saw
  every class). It reads raw [0, 1] crops (:func:`crop_boxes`) and standardises them itself.
* :class:`EmbeddingCenterNet` (``ezad-centernet``): the integrator's CenterNet backbone with a
  class-agnostic objectness heatmap, size / offset heads, and a per-cell embedding head in
  the text space; ``class_logits = cos(embed, text_c) / T`` for every class. Its ``logits``
  (what the detection task decodes) are the log-odds of ``sigmoid(objectness) *
  softmax_c(class_logits)`` over the ``active`` classes (all by default: base + novel).
  Box regression is class-agnostic (CenterNet's), not conditioned on the class embedding as
  EZAD's head is (our simplification: digit boxes are one shape family).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import MODELS
from ..schema import Count, ImgSize, Width
from .detect import CenterNet
from .mlp import check_common, check_positive, tag, to_hw

NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)
SOURCES = ("auto", "cache", "minilm", "random")


def text_table(texts="auto", num_classes: int = 10, dim: int = 384) -> Tensor:
    """``(K, D)`` unit text embeddings of the digit class names: a tensor as given, or a
    source of :func:`crossdistill.methods.any2seg.language_anchors` (the all-MiniLM-L6-v2
    embeddings of "a handwritten zero" ... shipped as a cache; ``"random"``: seeded
    orthonormal rows of width ``dim``, the stand-in when no sentence encoder is at hand)."""
    if isinstance(texts, Tensor):
        t = texts.detach().float()
        if t.dim() != 2 or len(t) != num_classes:
            raise ConfigError("model.texts", tuple(t.shape), f"({num_classes}, D) embeddings")
        return F.normalize(t, dim=-1)
    if texts not in SOURCES:
        raise ConfigError("model.texts", texts, f"a (K, D) tensor or one of {', '.join(SOURCES)}")
    from ..methods.any2seg import language_anchors, random_anchors

    if texts == "random":
        return random_anchors(num_classes, dim)
    if num_classes != 10:
        raise ConfigError("model.num_classes", num_classes, "10 digit names (or texts=random)")
    return language_anchors("image", texts)


# -- crops -----------------------------------------------------------------------------------------
def crop_boxes(images: Tensor, boxes: Tensor, size: int = 28, fill: float = 0.0,
               enlarge: float = 1.0) -> Tensor:
    """``(N, R, C, size, size)`` crops of ``images (N, C, H, W)`` at xyxy ``boxes (N, R, 4)``:
    each box first scaled by ``enlarge`` about its centre (the official code's
    ``crop_size_modi``: more context), then centred in a square of its longer side, resized
    bilinearly (pixel centres, no half-pixel shift), everything outside the (enlarged) box
    and the image set to ``fill`` (EZAD pads a crop to a square with zeros, keeping its
    aspect, before CLIP's resize)."""
    n, c, h, w = images.shape
    r = boxes.shape[1]
    if isinstance(enlarge, bool) or not isinstance(enlarge, (int, float)) or not enlarge > 0:
        raise ConfigError("ezad.enlarge", enlarge, "a positive number (1 = the box itself)")
    if r == 0:
        return images.new_zeros(n, 0, c, size, size)
    b = boxes.to(images.dtype)
    if enlarge != 1:
        mid, half = (b[..., :2] + b[..., 2:]) / 2, (b[..., 2:] - b[..., :2]) * (enlarge / 2)
        b = torch.cat([mid - half, mid + half], -1)
    cx, cy = (b[..., 0] + b[..., 2]) / 2, (b[..., 1] + b[..., 3]) / 2
    side = (b[..., 2:] - b[..., :2]).amax(-1).clamp_min(1e-3)
    u = (torch.arange(size, dtype=images.dtype, device=images.device) + 0.5) / size - 0.5
    xs = cx[..., None] + side[..., None] * u  # (N, R, S) pixel coordinates
    ys = cy[..., None] + side[..., None] * u
    gx = (2 * xs / w - 1)[..., None, :].expand(n, r, size, size)
    gy = (2 * ys / h - 1)[..., :, None].expand(n, r, size, size)
    grid = torch.stack([gx, gy], -1).reshape(n, r * size, size, 2)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = out.reshape(n, c, r, size, size).transpose(1, 2)
    inside_x = (xs >= b[..., 0, None]) & (xs <= b[..., 2, None])  # (N, R, S)
    inside_y = (ys >= b[..., 1, None]) & (ys <= b[..., 3, None])
    inside = inside_y[..., :, None] & inside_x[..., None, :]  # (N, R, S, S)
    return torch.where(inside[:, :, None], out, torch.full_like(out, fill))


# -- the CLIP stand-in ---------------------------------------------------------------------------
class CropEncoder(nn.Module):
    """``standardise -> encoder (a zoo model with an AnchorHead)``: ``forward(crops) ->
    logits = cos(embedding, text) / T`` over the K class texts, :meth:`embed` the unit
    embeddings (the head's ``embed``), :meth:`norm_parameters` what EZAD tunes."""

    def __init__(self, encoder: nn.Module, mean: float = 0.0, std: float = 1.0):
        super().__init__()
        from ..methods.any2seg import AnchorHead

        head = encoder.get_submodule(getattr(encoder, "feature_path", "") or "head")
        if not isinstance(head, AnchorHead):
            raise ConfigError("model.encoder", type(head).__name__,
                              "a zoo model made by any2seg.anchored (an AnchorHead classifier)")
        if not std > 0:
            raise ConfigError("model.std", std, "a positive number")
        self.encoder = encoder
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))
        self.feature_path = "encoder." + encoder.feature_path
        self.family, self.stages = "vit", [f"encoder.{s}" for s in getattr(encoder, "stages", [])]

    @property
    def head(self):
        return self.get_submodule(self.feature_path)

    @property
    def texts(self) -> Tensor:
        return self.head.anchors

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder((x - self.mean) / self.std)

    def embed(self, x: Tensor) -> Tensor:
        """``(B, D)`` unit embeddings of raw crops ``x (B, C, h, w)``."""
        out = {}
        hook = self.head.embed.register_forward_hook(lambda m, i, o: out.__setitem__("e", o))
        try:
            self(x)
        finally:
            hook.remove()
        return out["e"]

    def norm_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The normalisation layers' affine parameters (EZAD's ``open_ln``)."""
        return [(f"{name}.{p}", q) for name, m in self.named_modules() if isinstance(m, NORMS)
                for p, q in m.named_parameters(recurse=False)]


@MODELS.register(
    "ezad-clip",
    family="vit",
    description="EZAD's CLIP stand-in: tiny ViT crop encoder aligned to MiniLM digit prompts",
    paper="Liu et al., Efficient Feature Distillation for Zero-shot Annotation Object "
    "Detection, 2024",
)
def ezad_clip(
    *,
    num_classes: Count = 10,
    in_channels: Width = 1,
    img_size: ImgSize = 28,
    patch: ImgSize = 7,
    dim: Width = 64,
    depth: Width = 2,
    heads: Width = 4,
    texts: Any = "auto",
    text_dim: Width = 384,
    temperature: float = 0.07,
    mean: float = 0.1307,
    std: float = 0.3081,
) -> CropEncoder:
    """A ViT (``patch``, ``dim``, ``depth``, ``heads``) on ``img_size`` crops whose head is an
    AnchorHead over :func:`text_table` ``(texts)`` at ``temperature`` (CLIP's initial 0.07);
    raw crops are standardised by ``mean`` / ``std`` (MNIST's by default)."""
    from ..methods.any2seg import anchored
    from . import create

    check_common(num_classes, in_channels)
    vit = create("vit", num_classes=num_classes, in_channels=in_channels, img_size=img_size,
                 patch=patch, dim=dim, depth=depth, heads=heads)
    table = text_table(texts, num_classes, text_dim)
    return CropEncoder(anchored(vit, table, temperature), mean, std)


# -- the detector ---------------------------------------------------------------------------------
class EmbeddingCenterNet(CenterNet):
    """CenterNet (stride 4) whose class heatmap is replaced by objectness (1 channel, the
    ``heatmap`` head) + a per-cell embedding head ``embed`` (3x3 conv, ReLU, 1x1 conv to the
    text width) classified by cosine to the fixed ``texts`` buffer / ``temperature``."""

    def __init__(self, in_channels: int, width: int, texts: Tensor, temperature: float):
        super().__init__(in_channels, width, 1)
        w = 4 * width
        self.embed = nn.Sequential(nn.Conv2d(w, w, 3, padding=1), nn.ReLU(inplace=True),
                                   nn.Conv2d(w, texts.shape[1], 1))
        self.register_buffer("texts", F.normalize(texts.float(), dim=-1).clone())
        self.temperature = float(temperature)
        self.active: list[int] | None = None  # classes scored by ``logits`` (None: all)

    def set_active(self, classes: list[int] | None) -> None:
        """Score only ``classes`` in ``logits`` (e.g. the novel ones alone); None: all."""
        k = len(self.texts)
        if classes is not None and (not classes or any(not 0 <= int(c) < k for c in classes)):
            raise ConfigError("model.active", classes, f"class ids in 0..{k - 1}")
        self.active = None if classes is None else [int(c) for c in classes]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.neck(self.stage3(self.stage2(self.stage1(x))))
        obj, emb = self.heatmap(f), self.embed(f)
        unit = F.normalize(emb, dim=1)
        cls = torch.einsum("bdhw,kd->bkhw", unit, self.texts.to(unit.dtype)) / self.temperature
        return {"logits": combined_logits(obj, cls, self.active), "objectness": obj,
                "class_logits": cls, "embed": emb, "size": self.size(f),
                "offset": self.offset(f)}


def combined_logits(obj: Tensor, cls: Tensor, active: list[int] | None = None) -> Tensor:
    """Log-odds of ``sigmoid(obj) * softmax_c(cls)`` (softmax over ``active`` classes; the
    others get a large negative logit): per class the detection score the task decodes."""
    if active is not None:
        keep = torch.zeros(cls.shape[1], dtype=torch.bool, device=cls.device)
        keep[active] = True
        cls = cls.masked_fill(~keep.view(1, -1, 1, 1), float("-inf"))
    log_score = (F.logsigmoid(obj) + F.log_softmax(cls, dim=1)).clamp(-1e4, -1e-6)
    return log_score - torch.log(-torch.expm1(log_score))


@MODELS.register(
    "ezad-centernet",
    family="det",
    description="EZAD's embedding detector: CenterNet with objectness + cosine-to-text classes",
    paper="Liu et al., Efficient Feature Distillation for Zero-shot Annotation Object "
    "Detection, 2024; Zhou et al., Objects as Points, 2019",
)
def ezad_centernet(
    *,
    num_classes: Count = 10,
    in_channels: Width = 1,
    img_size: ImgSize | tuple[ImgSize, ImgSize] = 56,
    width: Width = 16,
    texts: Any = "auto",
    text_dim: Width = 384,
    temperature: float = 0.01,
) -> EmbeddingCenterNet:
    """``texts``: the class-name embeddings (:func:`text_table`: a (K, D) tensor or a
    source); ``temperature``: of the cosine classifier (EZAD: 1/100)."""
    check_common(num_classes, in_channels)
    to_hw(img_size)
    check_positive("width", width)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            0 < temperature <= 10):
        raise ConfigError("model.temperature", temperature, "a number in (0, 10]")
    model = EmbeddingCenterNet(in_channels, width, text_table(texts, num_classes, text_dim),
                               temperature)
    return tag(model, family="det", stages=["stage1", "stage2", "stage3", "neck"],
               feature_path="neck")


__all__ = ["CropEncoder", "EmbeddingCenterNet", "combined_logits", "crop_boxes", "text_table"]
