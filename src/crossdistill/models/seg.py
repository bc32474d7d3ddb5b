"""A small U-Net style encoder-decoder for dense prediction, ``(B, C, H, W) -> (B, K, H, W)``.

Two stride-2 downsamplings keep it CPU-cheap on 64x64 digit canvases; transposed-conv
upsampling plus skip connections restore full-resolution detail. Any input size works (the
upsampled map is cropped to its skip's size), so the model is fully convolutional.
Paper: Ronneberger, Fischer & Brox, "U-Net: Convolutional Networks for Biomedical Image
Segmentation" (2015).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..registry import MODELS
from ..schema import Count, ImgSize, Width
from .mlp import check_common, check_positive, tag, to_hw


def cbr(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class Up(nn.Module):
    """2x transposed-conv upsampling, concatenation with the skip, two conv-BN-ReLU."""

    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, 2, stride=2)
        self.conv = nn.Sequential(*cbr(cout + cskip, cout), *cbr(cout, cout))

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = self.up(x)[..., : skip.shape[-2], : skip.shape[-1]]  # odd sizes: 2*ceil(h/2) >= h
        return self.conv(torch.cat([x, skip], 1))


class SegCNN(nn.Module):
    """enc1 (H) -> enc2 (H/2) -> enc3 (H/4) -> dec1 (H/2, + enc2) -> dec2 (H, + enc1) -> head
    (1x1 conv to class logits per pixel)."""

    def __init__(self, in_channels: int, width: int, num_classes: int):
        super().__init__()
        w = width
        self.enc1 = nn.Sequential(*cbr(in_channels, w), *cbr(w, w))
        self.enc2 = nn.Sequential(*cbr(w, 2 * w, stride=2), *cbr(2 * w, 2 * w))
        self.enc3 = nn.Sequential(*cbr(2 * w, 4 * w, stride=2), *cbr(4 * w, 4 * w))
        self.dec1 = Up(4 * w, 2 * w, 2 * w)
        self.dec2 = Up(2 * w, w, w)
        self.head = nn.Conv2d(w, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        s1 = self.enc1(x)
        s2 = self.enc2(s1)
        x = self.enc3(s2)
        x = self.dec1(x, s2)
        x = self.dec2(x, s1)
        return self.head(x)


@MODELS.register(
    "seg-cnn",
    family="seg",
    description="U-Net style encoder-decoder, 2 downsamplings, skips (width=16, 11 classes)",
    paper="Ronneberger et al., U-Net: Convolutional Networks for Biomedical Image "
    "Segmentation, 2015",
)
def seg_cnn(
    *,
    num_classes: Count = 11,
    in_channels: Width = 1,
    img_size: ImgSize | tuple[ImgSize, ImgSize] = 64,
    width: Width = 16,
) -> nn.Module:
    """Per-pixel classifier; ``width`` is the channel count of the first stage (x2, x4
    deeper). ``img_size`` is only validated: the network takes any size."""
    check_common(num_classes, in_channels)
    to_hw(img_size)
    check_positive("width", width)
    model = SegCNN(in_channels, width, num_classes)
    return tag(
        model,
        family="seg",
        stages=["enc1", "enc2", "enc3", "dec1", "dec2"],
        feature_path="head",
    )
