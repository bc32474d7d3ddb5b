"""Few-shot segmentation models: a prototype-matching teacher and the DistillFSS student.

``proto-fss`` (the teacher; PANet-style prototype matching, Wang et al., "PANet: Few-Shot
Image Semantic Segmentation with Prototype Alignment", ICCV 2019, in the role DCAMA plays in
DistillFSS): one encoder (``enc1`` H -> ``enc2`` H/2 -> ``enc3`` H/4, conv-BN-ReLU as
``seg-cnn``) embeds the query and the K support canvases; per feature group ``g`` (``enc2``
and ``enc3``) masked average pooling of the support features gives a foreground and a
background prototype (pooled over every shot), and the cosine similarity of each query pixel
to both is the group's *coarse map* ``(B, 2, h_g, w_g)`` (module ``coarse.<i>``: the tap the
distillation reads). A small class-agnostic decoder turns the coarse maps (plus the query's
``enc2`` / ``enc1`` features as skips) into 2-class logits (background, target)
``(B, 2, H, W)``. Called as ``model(x, support, support_mask)``: ``x`` (B, C, H, W),
``support`` (B, K, C, H, W), ``support_mask`` (B, K, H, W) in {0, 1}.

``distillfss-student`` (De Marinis et al., 2025, "DistillFSS: Synthesizing Few-Shot Knowledge
into a Lightweight Segmentation Model"): the teacher's encoder and decoder plus, per novel
class and feature group, a small conv block (3x3 conv, ReLU, 1x1 conv; the official
``ClassDistiller.build_conv_block``) mapping the query's features straight to that group's
coarse map (module ``coarse.<i>``, same path as the teacher's), so no support is needed at
test: ``model(x, cls) -> (B, 2, H, W)`` logits, ``cls`` (B,) the target digit of each query.
Given a support set (``model(x, cls, support, support_mask)``, DistillFSS's refinement) it
also runs the teacher's prototype path on its own encoder and decoder and returns
``{"logits", "support_logits"}``. Its encoder is frozen by default (weights and BatchNorm
statistics: kept in eval mode), as in the official recipes, whose trainable ("hot")
parameters are the decoder and the student blocks.

Inference (ours, not the paper's): the prototype teacher (the paper distils DCAMA and other
attention-based segmenters), two coarse channels per group (fg and bg cosine; DCAMA's coarse
maps have one channel per attention layer), the decoder's form, and selecting a query's
class block by its ``cls`` (the official student predicts every class and merges them by an
argmax over the foreground logits; our episodes are binary, one class per query).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import MODELS
from ..schema import ImgSize, Width
from .mlp import check_positive, tag, to_hw
from .seg import cbr

GROUPS = ("enc2", "enc3")  # feature groups matched (H/2, H/4)
COARSE = 2  # channels per coarse map: cosine to the foreground and background prototypes
ENCODER = ("enc1", "enc2", "enc3")


def _gcr(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(min(4, cout), cout),
            nn.ReLU(inplace=True)]


def masked_average_pool(feat: Tensor, mask: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Foreground and background prototypes ``(B, C)`` of support features ``feat``
    ``(B, K, C, h, w)`` under masks ``mask`` ``(B, K, H, W)`` in [0, 1], area-resized to
    ``(h, w)``: ``p_fg = sum_{k,x} f m / sum m``, ``p_bg`` with ``1 - m`` (pooled over every
    shot; a zero vector where a mask is empty)."""
    b, k, c, h, w = feat.shape
    m = F.interpolate(mask.reshape(b * k, 1, *mask.shape[-2:]).to(feat.dtype), size=(h, w),
                      mode="area").view(b, k, 1, h, w)
    fg = (feat * m).sum((1, 3, 4)) / m.sum((1, 3, 4)).clamp_min(eps)
    bg = (feat * (1 - m)).sum((1, 3, 4)) / (1 - m).sum((1, 3, 4)).clamp_min(eps)
    return fg, bg


class CoarseMap(nn.Module):
    """Parameter-free: cosine similarity of each query pixel ``q`` ``(B, C, h, w)`` to the
    prototypes ``fg``, ``bg`` ``(B, C)`` -> ``(B, 2, h, w)`` (channel 0: foreground)."""

    def forward(self, q: Tensor, fg: Tensor, bg: Tensor) -> Tensor:
        protos = torch.stack([fg, bg], 1)[..., None, None]  # (B, 2, C, 1, 1)
        return F.cosine_similarity(q[:, None], protos, dim=2, eps=1e-6)


class Decoder(nn.Module):
    """Class-agnostic: the deepest coarse map (H/4) -> conv -> up to H/2, concat the H/2
    coarse map and the query's ``enc2`` features -> conv -> up to H, concat ``enc1`` -> conv
    -> 1x1 conv to 2 logits. GroupNorm, so fine-tuning on a few shots has no batch
    statistics to spoil."""

    def __init__(self, width: int):
        w, d = width, 2 * width
        super().__init__()
        self.low = nn.Sequential(*_gcr(COARSE, d), *_gcr(d, d))
        self.mid = nn.Sequential(*_gcr(d + COARSE + 2 * w, d), *_gcr(d, d))
        self.top = nn.Sequential(*_gcr(d + w, w), *_gcr(w, w))
        self.head = nn.Conv2d(w, 2, 1)

    def forward(self, coarse: Sequence[Tensor], feats: Sequence[Tensor]) -> Tensor:
        c2, c3 = coarse
        f1, f2 = feats[0], feats[1]
        x = self.low(c3)
        x = F.interpolate(x, size=f2.shape[-2:], mode="bilinear", align_corners=False)
        x = self.mid(torch.cat([x, c2, f2], 1))
        x = F.interpolate(x, size=f1.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.top(torch.cat([x, f1], 1)))


class _Encoded(nn.Module):
    """The shared encoder (``enc1``, ``enc2``, ``enc3`` at the top level: tap paths)."""

    def __init__(self, in_channels: int, width: int):
        super().__init__()
        w = width
        self.in_channels, self.width = in_channels, width
        self.enc1 = nn.Sequential(*cbr(in_channels, w), *cbr(w, w))
        self.enc2 = nn.Sequential(*cbr(w, 2 * w, stride=2), *cbr(2 * w, 2 * w))
        self.enc3 = nn.Sequential(*cbr(2 * w, 4 * w, stride=2), *cbr(4 * w, 4 * w))
        self.decoder = Decoder(width)

    def encode(self, x: Tensor) -> list[Tensor]:
        f1 = self.enc1(x)
        f2 = self.enc2(f1)
        return [f1, f2, self.enc3(f2)]

    def support_coarse_maps(self, q: list[Tensor], support: Tensor, support_mask: Tensor,
                            mods: nn.ModuleList) -> list[Tensor]:
        """The prototype coarse maps of queries with features ``q`` given their supports."""
        b, k = support.shape[:2]
        s = self.encode(support.flatten(0, 1))
        out = []
        for i, g in enumerate((1, 2)):
            sf = s[g].view(b, k, *s[g].shape[1:])
            out.append(mods[i](q[g], *masked_average_pool(sf, support_mask)))
        return out


def check_support(x: Tensor, support: Tensor, support_mask: Tensor, field: str) -> None:
    b, c, h, w = x.shape
    if support.dim() != 5 or tuple(support.shape[2:]) != (c, h, w) or len(support) != b:
        raise ConfigError(f"{field}.support", tuple(support.shape),
                          f"support canvases (B, K, {c}, {h}, {w}) for queries {tuple(x.shape)}")
    if tuple(support_mask.shape) != (*support.shape[:2], h, w):
        raise ConfigError(f"{field}.support_mask", tuple(support_mask.shape),
                          f"one mask per support canvas, {(*support.shape[:2], h, w)}")


class ProtoFSS(_Encoded):
    """Prototype-matching few-shot segmenter (module doc)."""

    def __init__(self, in_channels: int = 1, width: int = 16):
        super().__init__(in_channels, width)
        self.coarse = nn.ModuleList([CoarseMap() for _ in GROUPS])

    def forward(self, x: Tensor, support: Tensor, support_mask: Tensor) -> Tensor:
        check_support(x, support, support_mask, "proto-fss")
        b, k = support.shape[:2]
        f = self.encode(torch.cat([x, support.flatten(0, 1)]))  # one pass: BN sees both
        q = [t[:b] for t in f]
        coarse = []
        for i, g in enumerate((1, 2)):
            sf = f[g][b:].view(b, k, *f[g].shape[1:])
            coarse.append(self.coarse[i](q[g], *masked_average_pool(sf, support_mask)))
        return self.decoder(coarse, q)


def conv_block(channels: int) -> nn.Sequential:
    """DistillFSS's per-class, per-group block: 3x3 conv, ReLU, 1x1 conv to the coarse map."""
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(channels, COARSE, 1))


def check_classes(classes, field: str = "classes") -> tuple[int, ...]:
    if isinstance(classes, (str, bytes)) or not hasattr(classes, "__iter__"):
        raise ConfigError(field, classes, "a non-empty list of distinct digits 0..9")
    classes = list(classes)
    ok = all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 9 for c in classes)
    if not classes or not ok or len(set(classes)) != len(classes):
        raise ConfigError(field, classes, "a non-empty list of distinct digits 0..9")
    return tuple(classes)


class DistillFSSNet(_Encoded):
    """DistillFSS student (module doc): ``blocks.<j>.<i>`` is class ``classes[j]``'s block of
    feature group ``i``; ``coarse.<i>`` (identity) marks the distilled coarse map."""

    def __init__(self, classes: Sequence[int], in_channels: int = 1, width: int = 16,
                 freeze_encoder: bool = True):
        super().__init__(in_channels, width)
        self.classes = check_classes(classes)
        chans = (2 * width, 4 * width)
        self.blocks = nn.ModuleList(
            [nn.ModuleList([conv_block(c) for c in chans]) for _ in self.classes])
        self.coarse = nn.ModuleList([nn.Identity() for _ in GROUPS])
        self.support_coarse = nn.ModuleList([CoarseMap() for _ in GROUPS])
        lookup = torch.full((10,), -1, dtype=torch.long)
        lookup[list(self.classes)] = torch.arange(len(self.classes))
        self.register_buffer("lookup", lookup, persistent=False)
        if not isinstance(freeze_encoder, bool):
            raise ConfigError("freeze_encoder", freeze_encoder, "true or false")
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            for n in ENCODER:
                getattr(self, n).requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_encoder:  # frozen BatchNorm statistics too
            for n in ENCODER:
                getattr(self, n).eval()
        return self

    def class_index(self, cls: Tensor) -> Tensor:
        """Block index of each query's class; a class without a block is an error."""
        cls = torch.as_tensor(cls, device=self.lookup.device).long().view(-1)
        j = self.lookup[cls.clamp(0, 9)]
        bad = (cls < 0) | (cls > 9) | (j < 0)
        if bool(bad.any()):
            raise ConfigError("distillfss-student.cls", sorted(set(cls[bad].tolist())),
                              f"classes with a student block: {list(self.classes)}")
        return j

    def distilled_maps(self, feats: list[Tensor], j: Tensor) -> list[Tensor]:
        """Per group, each query's class block applied to its features."""
        out = []
        for i, g in enumerate((1, 2)):
            f = feats[g]
            m = f.new_zeros(f.shape[0], COARSE, *f.shape[-2:])
            for k in j.unique().tolist():
                rows = (j == k).nonzero()[:, 0]
                m = m.index_copy(0, rows, self.blocks[k][i](f[rows]))
            out.append(self.coarse[i](m))
        return out

    def forward(self, x: Tensor, cls: Tensor, support: Tensor | None = None,
                support_mask: Tensor | None = None):
        if len(torch.as_tensor(cls).view(-1)) != len(x):
            raise ConfigError("distillfss-student.cls", tuple(torch.as_tensor(cls).shape),
                              f"one class per query ({len(x)})")
        feats = self.encode(x)
        logits = self.decoder(self.distilled_maps(feats, self.class_index(cls)), feats)
        if support is None:
            return logits
        if support_mask is None:
            raise ConfigError("distillfss-student.support_mask", None,
                              "masks with the support canvases")
        check_support(x, support, support_mask, "distillfss-student")
        coarse = self.support_coarse_maps(feats, support, support_mask, self.support_coarse)
        return {"logits": logits, "support_logits": self.decoder(coarse, feats)}

    def load_teacher(self, teacher: ProtoFSS) -> DistillFSSNet:
        """Copy the teacher's encoder and decoder (weights and BN statistics)."""
        if not isinstance(teacher, ProtoFSS):
            raise ConfigError("method.teacher", type(teacher).__name__,
                              "a proto-fss teacher (models.fewshot.ProtoFSS)")
        if (teacher.in_channels, teacher.width) != (self.in_channels, self.width):
            raise ConfigError("student.width", self.width,
                              f"the teacher's width {teacher.width} and in_channels "
                              f"{teacher.in_channels} (the student reuses its encoder)")
        for n in (*ENCODER, "decoder"):
            getattr(self, n).load_state_dict(copy.deepcopy(getattr(teacher, n).state_dict()))
        return self


def student_from_teacher(teacher: ProtoFSS, classes: Sequence[int],
                         freeze_encoder: bool = True) -> DistillFSSNet:
    """A DistillFSS student for ``classes`` carrying ``teacher``'s encoder and decoder (new
    class blocks, seeded by the caller's torch seed)."""
    if not isinstance(teacher, ProtoFSS):
        raise ConfigError("method.teacher", type(teacher).__name__,
                          "a proto-fss teacher (models.fewshot.ProtoFSS)")
    s = DistillFSSNet(classes, teacher.in_channels, teacher.width, freeze_encoder)
    s.to(next(teacher.parameters()).device)
    return _tag(s.load_teacher(teacher))


def _tag(model: nn.Module) -> nn.Module:
    return tag(model, family="seg", stages=[*ENCODER, "coarse.0", "coarse.1"],
               feature_path="decoder.head")


PAPER = "DistillFSS: Synthesizing Few-Shot Knowledge into a Lightweight Segmentation Model"


@MODELS.register(
    "proto-fss", family="seg",
    description="prototype-matching few-shot segmenter: masked average pooling + cosine "
    "coarse maps + small decoder (query, support, support_mask -> 2-class logits)",
    paper="Wang et al., PANet: Few-Shot Image Semantic Segmentation with Prototype "
    "Alignment, 2019",
)
def proto_fss(*, in_channels: Width = 1, width: Width = 16,
              img_size: ImgSize | tuple[ImgSize, ImgSize] = 56) -> nn.Module:
    """``width``: channels of ``enc1`` (x2, x4 deeper); ``img_size`` is only validated."""
    check_positive("in_channels", in_channels)
    check_positive("width", width)
    to_hw(img_size)
    return _tag(ProtoFSS(in_channels, width))


@MODELS.register(
    "distillfss-student", family="seg",
    description="DistillFSS student: proto-fss encoder + decoder, per-class conv blocks "
    "predicting the coarse maps (query, cls -> 2-class logits, no support)",
    paper=PAPER,
)
def distillfss_student(*, classes: list[int] = (5, 6, 7, 8, 9), in_channels: Width = 1,
                       width: Width = 16, freeze_encoder: bool = True,
                       img_size: ImgSize | tuple[ImgSize, ImgSize] = 56) -> nn.Module:
    """A fresh student (load a teacher with ``.load_teacher``, or use
    :func:`student_from_teacher`)."""
    check_positive("in_channels", in_channels)
    check_positive("width", width)
    to_hw(img_size)
    return _tag(DistillFSSNet(classes, in_channels, width, freeze_encoder))
