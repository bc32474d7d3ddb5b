"""A small plain CNN (conv-BN-ReLU stages with max pooling, no skip connections).

It is the cheap convolutional baseline between the MLP and the ResNets: strong enough to
learn MNIST/CIFAR-style tasks in minutes on a CPU, simple enough that its features are easy
to reason about. Paper: LeCun, Bottou, Bengio & Haffner, "Gradient-based learning applied
to document recognition" (1998); batch norm from Ioffe & Szegedy, "Batch Normalization:
Accelerating Deep Network Training by Reducing Internal Covariate Shift" (2015).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import MODELS
from ..schema import Count, ImgSize, Width
from .mlp import check_common, check_positive, tag, to_hw


def conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class PlainCNN(nn.Module):
    """``stage1..stageN`` (conv-BN-ReLU, max pool except the last) -> pool -> flatten -> fc."""

    def __init__(
        self, in_channels: int, channels: tuple[int, ...], num_classes: int, hw: tuple[int, int]
    ):
        super().__init__()
        h, w = hw
        prev = in_channels
        for i, c in enumerate(channels, start=1):
            layers = conv_bn_relu(prev, c)
            # Pool between stages only while the map stays at least 1x1.
            if i < len(channels) and min(h, w) >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            self.add_module(f"stage{i}", nn.Sequential(*layers))
            prev = c
        self.num_stages = len(channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(prev, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"stage{i}")(x)
        return self.fc(self.flatten(self.pool(x)))


@MODELS.register(
    "cnn",
    family="cnn",
    description="plain 3-stage CNN (channels=(32, 64, 128))",
    paper="LeCun et al., Gradient-based learning applied to document recognition, 1998",
)
def cnn(
    *,
    num_classes: Count = 10,
    in_channels: Width = 3,
    img_size: ImgSize | tuple[ImgSize, ImgSize] = 32,
    channels: Width | tuple[Width, ...] = (32, 64, 128),
) -> nn.Module:
    """A plain CNN; ``channels`` gives one conv-BN-ReLU stage per entry."""
    check_common(num_classes, in_channels)
    hw = to_hw(img_size)
    if isinstance(channels, int):
        channels = (channels,)
    if not isinstance(channels, (tuple, list)) or not channels:
        raise ConfigError("channels", channels, "a non-empty list of positive ints")
    for c in channels:
        check_positive("channels", c, "a non-empty list of positive ints")
    model = PlainCNN(in_channels, tuple(channels), num_classes, hw)
    stages = [f"stage{i}" for i in range(1, len(channels) + 1)]
    return tag(model, family="cnn", stages=stages, feature_path="fc")
