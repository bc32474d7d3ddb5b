"""CIFAR-style ResNet with BasicBlocks: three stages of ``n`` blocks, depth ``6n + 2``.

The standard teacher/student zoo of the distillation literature (resnet8x4 -> resnet32x4,
resnet20 -> resnet56) is built from this one definition: ``depth`` sets blocks per stage
and ``width`` multiplies the base channels (16, 32, 64). Paper: He, Zhang, Ren & Sun,
"Deep Residual Learning for Image Recognition" (2016).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import MODELS
from ..schema import Count, Depth, ImgSize, Width
from .mlp import check_common, check_positive, tag, to_hw, variant


class BasicBlock(nn.Module):
    """Two 3x3 convs plus a shortcut (identity, or 1x1 conv + BN when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        else:
            self.shortcut = nn.Identity()
        # Not in-place: the pre-activation sum is what feature-distillation hooks may read.
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """conv1/bn1/relu stem -> layer1..layer3 -> pool -> flatten -> fc."""

    def __init__(self, n: int, width: int, in_channels: int, num_classes: int, hw: tuple[int, int]):
        super().__init__()
        widths = [16 * width, 32 * width, 64 * width]
        side = max(hw)
        if side <= 32:  # CIFAR stem: keep full resolution
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        elif side <= 64:  # e.g. Tiny-ImageNet: one halving
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=2, padding=1, bias=False)
        else:  # ImageNet-sized inputs: 7x7/2 stem followed by a 3x3/2 max pool
            self.conv1 = nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if side > 64 else nn.Identity()
        prev = widths[0]
        for i, c in enumerate(widths, start=1):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(prev, c, stride=2 if (i > 1 and j == 0) else 1))
                prev = c
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(prev, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


_PAPER = "He et al., Deep Residual Learning for Image Recognition, 2016"


@MODELS.register(
    "resnet", family="cnn", description="CIFAR ResNet, depth 6n+2 (depth=20, width=1)", paper=_PAPER
)
def resnet(
    *,
    num_classes: Count = 10,
    in_channels: Width = 3,
    img_size: ImgSize | tuple[ImgSize, ImgSize] = 32,
    depth: Depth = 20,
    width: Width = 1,
) -> nn.Module:
    """CIFAR ResNet; ``depth`` must be ``6n + 2`` and ``width`` multiplies (16, 32, 64)."""
    check_common(num_classes, in_channels)
    hw = to_hw(img_size)
    allowed = "resnet depth must be 6n+2, e.g. 8, 14, 20, 32, 56"
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ConfigError("depth", depth, allowed)
    check_positive("width", width, "a positive int channel multiplier, e.g. 1, 2, 4")
    model = ResNet((depth - 2) // 6, width, in_channels, num_classes, hw)
    return tag(model, family="cnn", stages=["layer1", "layer2", "layer3"], feature_path="fc")


resnet8x4 = variant("resnet8x4", resnet, "CIFAR ResNet-8, 4x wide (student)", depth=8, width=4)
resnet20 = variant("resnet20", resnet, "CIFAR ResNet-20", depth=20, width=1)
resnet32x4 = variant("resnet32x4", resnet, "CIFAR ResNet-32, 4x wide (teacher)", depth=32, width=4)
resnet56 = variant("resnet56", resnet, "CIFAR ResNet-56 (teacher)", depth=56, width=1)
