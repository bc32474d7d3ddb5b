"""Two small detectors for digit canvases: a CenterNet-style heatmap detector and a tiny DETR.

Both return a dict (the formats of :mod:`crossdistill.boxes`, scored by the ``detection``
task): CenterNet ``{"logits": (B, K, h, w) class heatmap, "size", "offset": (B, 2, h, w)}``
at stride 4; DETR ``{"logits": (B, Q, K+1), "boxes": (B, Q, 4)}`` (sigmoid cxcywh, last class
= no object). Papers: Zhou, Wang & Krähenbühl, "Objects as Points", 2019; Carion et al.,
"End-to-End Object Detection with Transformers", 2020.

Tiny DETR keeps DETR's structure (CNN backbone at stride 4, learned 2-D positions, a
transformer encoder whose output is the *memory*, a decoder over learned object queries,
class and box heads) with post-norm PyTorch layers and positions added once at the input
rather than in every attention (our simplification, CPU-sized). It also takes optional
*target queries* (``forward(x, target_queries=...)``: per ground-truth object its box and
class, embedded by ``target_embed`` and decoded beside the learned queries under a block
attention mask so neither group sees the other, as DN-DETR does); their predictions come back
as ``target_logits`` / ``target_boxes``. CLoCKDistill runs both decoders on the same target
queries, so teacher and student outputs correspond one to one without matching.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import MODELS
from ..schema import Count, Depth, ImgSize, Width
from .mlp import check_common, check_positive, tag, to_hw


def _cbr(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class CenterNet(nn.Module):
    """stage1 (H) -> stage2 (H/2) -> stage3 (H/4) -> neck (H/4) -> heatmap / size / offset
    heads (3x3 conv, ReLU, 1x1 conv each)."""

    def __init__(self, in_channels: int, width: int, num_classes: int):
        super().__init__()
        w = width
        self.stage1 = _cbr(in_channels, w)
        self.stage2 = nn.Sequential(_cbr(w, 2 * w, 2), _cbr(2 * w, 2 * w))
        self.stage3 = nn.Sequential(_cbr(2 * w, 4 * w, 2), _cbr(4 * w, 4 * w))
        self.neck = _cbr(4 * w, 4 * w)

        def head(out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(4 * w, 4 * w, 3, padding=1), nn.ReLU(inplace=True),
                                 nn.Conv2d(4 * w, out, 1))

        self.heatmap, self.size, self.offset = head(num_classes), head(2), head(2)
        nn.init.constant_(self.heatmap[-1].bias, -2.19)  # prior 0.1 (CenterNet's init)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.neck(self.stage3(self.stage2(self.stage1(x))))
        return {"logits": self.heatmap(f), "size": self.size(f), "offset": self.offset(f)}


@MODELS.register(
    "centernet-tiny",
    family="det",
    description="CenterNet-style detector: CNN at stride 4, heatmap/size/offset heads",
    paper="Zhou et al., Objects as Points, 2019",
)
def centernet_tiny(
    *,
    num_classes: Count = 10,
    in_channels: Width = 1,
    img_size: ImgSize | tuple[ImgSize, ImgSize] = 56,
    width: Width = 16,
) -> nn.Module:
    """``width`` = channels of stage1 (x2, x4 deeper); any input size (grid = ceil(H/4))."""
    check_common(num_classes, in_channels)
    to_hw(img_size)
    check_positive("width", width)
    return tag(CenterNet(in_channels, width, num_classes), family="det",
               stages=["stage1", "stage2", "stage3", "neck"], feature_path="neck")


class TinyDETR(nn.Module):
    """backbone (stride 4) -> input_proj -> + pos -> encoder (memory) -> decoder(queries,
    memory) -> class / box heads."""

    def __init__(self, in_channels: int, width: int, num_classes: int, queries: int,
                 hw: tuple[int, int], enc_layers: int, dec_layers: int, heads: int):
        super().__init__()
        d = width
        self.num_classes, self.num_queries = num_classes, queries
        self.backbone = nn.Sequential(_cbr(in_channels, d // 2, 2), _cbr(d // 2, d, 2), _cbr(d, d))
        self.grid = ((hw[0] + 3) // 4, (hw[1] + 3) // 4)
        self.pos = nn.Parameter(torch.randn(1, self.grid[0] * self.grid[1], d) * 0.02)
        self.input_proj = nn.Linear(d, d)

        def enc_layer():
            return nn.TransformerEncoderLayer(d, heads, 2 * d, 0.0, batch_first=True)

        def dec_layer():
            return nn.TransformerDecoderLayer(d, heads, 2 * d, 0.0, batch_first=True)

        self.encoder = nn.TransformerEncoder(enc_layer(), enc_layers, enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(dec_layer(), dec_layers)
        self.query = nn.Parameter(torch.randn(queries, d) * 0.1)
        self.target_embed = nn.Linear(4 + num_classes, d)
        self.class_head = nn.Linear(d, num_classes + 1)
        self.box_head = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 4))

    def forward(self, x: Tensor, target_queries: Tensor | None = None) -> dict[str, Tensor]:
        f = self.backbone(x).flatten(2).transpose(1, 2)  # (B, N, d)
        if f.shape[1] != self.pos.shape[1]:
            raise ConfigError("img_size", tuple(x.shape[-2:]),
                              f"the size this DETR was built for ({self.grid[0] * 4} px grid)")
        memory = self.encoder(self.input_proj(f) + self.pos)
        b, q = len(x), self.num_queries
        tgt = self.query[None].expand(b, -1, -1)
        mask = None
        if target_queries is not None:
            extra = self.target_embed(target_queries.to(tgt.dtype))
            m = extra.shape[1]
            tgt = torch.cat([tgt, extra], 1)
            mask = torch.ones(q + m, q + m, dtype=torch.bool, device=x.device)
            mask[:q, :q] = False
            mask[q:, q:] = False  # True = may not attend: the two groups never see each other
        h = self.decoder(tgt, memory, tgt_mask=mask)
        logits, boxes = self.class_head(h), self.box_head(h).sigmoid()
        out = {"logits": logits[:, :q], "boxes": boxes[:, :q]}
        if target_queries is not None:
            out.update(target_logits=logits[:, q:], target_boxes=boxes[:, q:])
        return out


@MODELS.register(
    "detr-tiny",
    family="det",
    description="tiny DETR: CNN at stride 4, transformer encoder/decoder, set prediction",
    paper="Carion et al., End-to-End Object Detection with Transformers, 2020",
)
def detr_tiny(
    *,
    num_classes: Count = 10,
    in_channels: Width = 1,
    img_size: ImgSize | tuple[ImgSize, ImgSize] = 56,
    width: Width = 64,
    queries: Depth = 10,
    enc_layers: Depth = 2,
    dec_layers: Depth = 2,
    heads: Depth = 4,
) -> nn.Module:
    """``width`` = the transformer's model dimension (divisible by ``heads``); ``queries`` =
    object queries (at least the most objects on an image, checked by the set loss)."""
    check_common(num_classes, in_channels)
    hw = to_hw(img_size)
    for f, v in (("width", width), ("queries", queries), ("enc_layers", enc_layers),
                 ("dec_layers", dec_layers), ("heads", heads)):
        check_positive(f, v)
    if width % heads or width < 2:
        raise ConfigError("width", width, f"an even multiple of heads ({heads})")
    model = TinyDETR(in_channels, width, num_classes, queries, hw, enc_layers, dec_layers, heads)
    return tag(model, family="det", stages=["backbone", "encoder", "decoder"],
               feature_path="decoder")
