"""A tiny ViT segmenter, ``(B, C, H, W) -> (B, K, H, W)``: the transformer member of CNN-
Transformer collaborative learning on digit canvases.

``patch_embed`` (non-overlapping ``patch x patch`` conv, tokens ``(B, N, dim)``) + learned
positions -> ``blocks.<i>`` (pre-norm transformer blocks, tokens) -> ``norm`` -> ``decoder``
(each token's ``patch x patch`` pixels predicted linearly from it: 1x1 conv + pixel shuffle
back to the input size, then one 3x3 conv-BN-ReLU: the full-resolution decoder feature map)
-> ``head`` (1x1 conv to class logits per pixel). The encoder is plain ViT (the zoo's
:class:`~crossdistill.models.vit.PatchEmbed` and :class:`~crossdistill.models.vit.Block`, no
class token); the decoder is a light linear head in the spirit of SETR-naive (Zheng et al.,
"Rethinking Semantic Segmentation from a Sequence-to-Sequence Perspective with Transformers",
CVPR 2021) that upsamples by a learned pixel shuffle instead of bilinearly (digit strokes are
1-3 pixels wide: bilinear upsampling of 4x4 patches blurred them away in our trials), plus one
3x3 conv (our choice: cheap, and it smooths the patch grid).
Positions are learned for ``img_size``'s grid and bilinearly resized for other sizes.
Papers: Dosovitskiy et al., "An Image is Worth 16x16 Words" (2021); Zheng et al. (2021).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import MODELS
from ..schema import Count, Depth, ImgSize, Pos, Width
from .mlp import check_common, check_positive, tag, to_hw
from .vit import Block, PatchEmbed, check_patch


class SegDecoder(nn.Module):
    """Tokens ``(B, N, dim)`` on an ``h x w`` grid -> decoder map ``(B, decoder_dim, H, W)``
    with ``H = patch h``: each token linearly predicts the ``decoder_dim`` features of the
    ``patch x patch`` pixels it covers (a 1x1 conv to ``decoder_dim patch^2`` channels and a
    pixel shuffle: the inverse of the patch embedding, so detail inside a patch survives), BN,
    ReLU, then one 3x3 conv-BN-ReLU across patch borders."""

    def __init__(self, dim: int, decoder_dim: int, patch: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(dim, decoder_dim * patch * patch, 1, bias=False),
            nn.PixelShuffle(patch),
            nn.BatchNorm2d(decoder_dim),
            nn.ReLU(),
        )
        self.refine = nn.Sequential(
            nn.Conv2d(decoder_dim, decoder_dim, 3, padding=1, bias=False),
            nn.BatchNorm2d(decoder_dim),
            nn.ReLU(),
        )

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        b, _, d = tokens.shape
        return self.refine(self.proj(tokens.transpose(1, 2).reshape(b, d, *grid)))


class ViTSeg(nn.Module):
    """patch_embed -> + pos -> blocks -> norm -> decoder -> head (see the module doc)."""

    def __init__(self, in_channels: int, num_classes: int, hw: tuple[int, int], patch: int,
                 dim: int, depth: int, heads: int, mlp_ratio: float, decoder_dim: int):
        super().__init__()
        self.patch = patch
        self.grid = (hw[0] // patch, hw[1] // patch)
        self.patch_embed = PatchEmbed(in_channels, dim, patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.decoder = SegDecoder(dim, decoder_dim, patch)
        self.head = nn.Conv2d(decoder_dim, num_classes, 1)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def _pos(self, grid: tuple[int, int]) -> Tensor:
        if grid == self.grid:
            return self.pos_embed
        d = self.pos_embed.shape[-1]
        pos = self.pos_embed.transpose(1, 2).reshape(1, d, *self.grid)
        pos = F.interpolate(pos, size=grid, mode="bilinear", align_corners=False)
        return pos.flatten(2).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if h % self.patch or w % self.patch:
            raise ConfigError("vit-seg.input", (h, w), f"sides divisible by patch={self.patch}")
        grid = (h // self.patch, w // self.patch)
        tokens = self.norm(self.blocks(self.patch_embed(x) + self._pos(grid)))
        return self.head(self.decoder(tokens, grid))


@MODELS.register(
    "vit-seg",
    family="seg",
    description="tiny ViT segmenter (patch=4, dim=32, depth=3, heads=2, light conv decoder "
    "upsampling to the input size)",
    paper="Dosovitskiy et al., An Image is Worth 16x16 Words, 2021; Zheng et al., Rethinking "
    "Semantic Segmentation from a Sequence-to-Sequence Perspective with Transformers, 2021",
)
def vit_seg(
    *,
    num_classes: Count = 11,
    in_channels: Width = 1,
    img_size: ImgSize | tuple[ImgSize, ImgSize] = 56,
    patch: ImgSize = 4,
    dim: Width = 32,
    depth: Depth = 3,
    heads: Depth = 2,
    mlp_ratio: Pos = 2.0,
    decoder_dim: Width = 16,
) -> nn.Module:
    """Per-pixel classifier; ``img_size`` (divisible by ``patch``) fixes the learned position
    grid, other sizes divisible by ``patch`` work too (positions resized). ``dim`` must divide
    by ``heads``. Taps: ``patch_embed`` (tokens), ``blocks.<i>`` (tokens), ``decoder`` (the
    full-resolution decoder map), ``head`` (logits); ``stages``: every block, then the
    decoder."""
    check_common(num_classes, in_channels)
    hw = to_hw(img_size)
    check_patch(hw, patch)
    for field, v in (("dim", dim), ("depth", depth), ("heads", heads),
                     ("decoder_dim", decoder_dim)):
        check_positive(field, v)
    if dim % heads:
        raise ConfigError("heads", heads, f"must divide dim={dim}")
    if (isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float))
            or not int(dim * mlp_ratio) >= 1):
        raise ConfigError("mlp_ratio", mlp_ratio, "a positive number, e.g. 2 or 4")
    model = ViTSeg(in_channels, num_classes, hw, patch, dim, depth, heads, float(mlp_ratio),
                   decoder_dim)
    return tag(model, family="seg", stages=[*(f"blocks.{i}" for i in range(depth)), "decoder"],
               feature_path="head")
