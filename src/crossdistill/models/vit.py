"""Vision Transformer (ViT): patch embedding, class token, pre-norm transformer blocks.

The attention-based member of the zoo, so CNN <-> transformer distillation can be studied
at CIFAR scale on a CPU. Defaults are deliberately tiny (patch 4, dim 64, depth 4). Paper:
Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at
Scale" (2021).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import ConfigError
from ..registry import MODELS
from ..schema import Count, Depth, ImgSize, Pos, Prob, Width
from .mlp import check_common, check_positive, spaced_indices, tag, to_hw


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` conv; returns tokens ``(B, N, dim)``."""

    def __init__(self, in_channels: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def check_patch(hw: tuple[int, int], patch) -> int:
    """Both sides of the image must be multiples of ``patch`` (no silent cropping)."""
    check_positive("patch", patch)
    if hw[0] % patch or hw[1] % patch:
        raise ConfigError(
            "img_size",
            hw if hw[0] != hw[1] else hw[0],
            f"must be divisible by patch={patch} (or pick a patch size that divides it)",
        )
    return (hw[0] // patch) * (hw[1] // patch)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection and an output ``proj``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class FeedForward(nn.Module):
    """Token-wise two-layer MLP with GELU (``fc1`` -> ``act`` -> ``fc2``)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ClsPool(nn.Module):
    """Select the class token (position 0) as the image embedding."""

    def forward(self, x: Tensor) -> Tensor:
        return x[:, 0]


class ViT(nn.Module):
    """patch_embed -> [cls] + pos -> blocks -> norm -> pool (cls token) -> head."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_patches: int,
        patch: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        dropout: float,
    ):
        super().__init__()
        self.patch_embed = PatchEmbed(in_channels, dim, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.pool = ClsPool()
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def tokens(self, x: Tensor) -> Tensor:
        """Final-norm tokens ``(B, N + 1, dim)``, class token first."""
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.tokens(x)))


@MODELS.register(
    "vit",
    family="vit",
    description="tiny ViT (patch=4, dim=64, depth=4, heads=4, mlp_ratio=2)",
    paper="Dosovitskiy et al., An Image is Worth 16x16 Words: Transformers for "
    "Image Recognition at Scale, 2021",
)
def vit(
    *,
    num_classes: Count = 10,
    in_channels: Width = 3,
    img_size: ImgSize | tuple[ImgSize, ImgSize] = 32,
    patch: ImgSize = 4,
    dim: Width = 64,
    depth: Depth = 4,
    heads: Depth = 4,
    mlp_ratio: Pos = 2.0,
    dropout: Prob = 0.0,
) -> nn.Module:
    """A small ViT; ``img_size`` must be divisible by ``patch`` and ``dim`` by ``heads``."""
    check_common(num_classes, in_channels)
    num_patches = check_patch(to_hw(img_size), patch)
    check_positive("dim", dim)
    check_positive("depth", depth)
    check_positive("heads", heads)
    if dim % heads:
        raise ConfigError("heads", heads, f"must divide dim={dim}")
    if (
        isinstance(mlp_ratio, bool)
        or not isinstance(mlp_ratio, (int, float))
        or int(dim * mlp_ratio) < 1
    ):
        raise ConfigError("mlp_ratio", mlp_ratio, "a positive number, e.g. 2 or 4")
    if (
        isinstance(dropout, bool)
        or not isinstance(dropout, (int, float))
        or not 0.0 <= dropout < 1.0
    ):
        raise ConfigError("dropout", dropout, "a float in [0, 1)")
    model = ViT(
        in_channels,
        num_classes,
        num_patches,
        patch,
        dim,
        depth,
        heads,
        float(mlp_ratio),
        float(dropout),
    )
    stages = [f"blocks.{i}" for i in spaced_indices(depth)]
    return tag(model, family="vit", stages=stages, feature_path="head")
