"""MLP-Mixer: patch tokens mixed alternately across tokens and across channels by MLPs.

An all-MLP vision model with no attention and no convolution beyond the patch embedding,
useful as a third inductive bias next to CNNs and ViTs. Paper: Tolstikhin et al.,
"MLP-Mixer: An all-MLP Architecture for Vision" (2021).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import MODELS
from ..schema import Count, Depth, ImgSize, Prob, Width
from .mlp import check_common, check_positive, spaced_indices, tag, to_hw, variant
from .vit import FeedForward, PatchEmbed, check_patch


class MixerBlock(nn.Module):
    """``x + token_mlp`` over the token axis, then ``x + channel_mlp`` over channels."""

    def __init__(
        self,
        num_tokens: int,
        dim: int,
        token_hidden: int,
        channel_hidden: int,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = FeedForward(num_tokens, token_hidden, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = FeedForward(dim, channel_hidden, dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class TokenMeanPool(nn.Module):
    """Average over tokens: ``(B, N, D) -> (B, D)``."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=1)


class Mixer(nn.Module):
    """patch_embed -> blocks -> norm -> pool (token mean) -> head."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_patches: int,
        patch: int,
        dim: int,
        depth: int,
        token_hidden: int,
        channel_hidden: int,
        dropout: float,
    ):
        super().__init__()
        self.patch_embed = PatchEmbed(in_channels, dim, patch)
        self.blocks = nn.Sequential(
            *[
                MixerBlock(num_patches, dim, token_hidden, channel_hidden, dropout)
                for _ in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(dim)
        self.pool = TokenMeanPool()
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.norm(self.blocks(self.patch_embed(x)))))


@MODELS.register(
    "mlp-mixer",
    family="mixer",
    description="tiny MLP-Mixer (patch=4, dim=64, depth=4, token_hidden=64, channel_hidden=128)",
    paper="Tolstikhin et al., MLP-Mixer: An all-MLP Architecture for Vision, 2021",
)
def mlp_mixer(
    *,
    num_classes: Count = 10,
    in_channels: Width = 3,
    img_size: ImgSize | tuple[ImgSize, ImgSize] = 32,
    patch: ImgSize = 4,
    dim: Width = 64,
    depth: Depth = 4,
    token_hidden: Width = 64,
    channel_hidden: Width = 128,
    dropout: Prob = 0.0,
) -> nn.Module:
    """A small MLP-Mixer; ``img_size`` must be divisible by ``patch``."""
    check_common(num_classes, in_channels)
    num_patches = check_patch(to_hw(img_size), patch)
    for field, value in (
        ("dim", dim),
        ("depth", depth),
        ("token_hidden", token_hidden),
        ("channel_hidden", channel_hidden),
    ):
        check_positive(field, value)
    if (
        isinstance(dropout, bool)
        or not isinstance(dropout, (int, float))
        or not 0.0 <= dropout < 1.0
    ):
        raise ConfigError("dropout", dropout, "a float in [0, 1)")
    model = Mixer(
        in_channels,
        num_classes,
        num_patches,
        patch,
        dim,
        depth,
        token_hidden,
        channel_hidden,
        float(dropout),
    )
    stages = [f"blocks.{i}" for i in spaced_indices(depth)]
    return tag(model, family="mixer", stages=stages, feature_path="head")


mixer = variant("mixer", mlp_mixer, "alias of mlp-mixer")
