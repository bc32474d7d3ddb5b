"""Small VGG with batch norm: stacks of 3x3 conv-BN-ReLU separated by 2x2 max pooling.

A deep, skip-free teacher/student family that complements the ResNets in cross-architecture
distillation (vgg8 and vgg13 are common CIFAR students). Five stages; a stage's pool is
skipped when the feature map would shrink below 1x1, so 28x28 inputs work too. Paper:
Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition"
(2015); batch norm from Ioffe & Szegedy (2015).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import MODELS
from ..schema import Count, ImgSize, Width
from .cnn import conv_bn_relu
from .mlp import check_common, check_positive, tag, to_hw, variant

VGG8 = ((64,), (128,), (256,), (512,), (512,))
VGG11 = ((64,), (128,), (256, 256), (512, 512), (512, 512))


class VGG(nn.Module):
    """``stage1..stageN`` (convs, then max pool except the last) -> pool -> flatten -> fc."""

    def __init__(
        self,
        cfg: tuple[tuple[int, ...], ...],
        in_channels: int,
        num_classes: int,
        hw: tuple[int, int],
    ):
        super().__init__()
        h, w = hw
        prev = in_channels
        for i, stage in enumerate(cfg, start=1):
            layers: list[nn.Module] = []
            for c in stage:
                layers += conv_bn_relu(prev, c)
                prev = c
            if i < len(cfg) and min(h, w) >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            self.add_module(f"stage{i}", nn.Sequential(*layers))
        self.num_stages = len(cfg)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(prev, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"stage{i}")(x)
        return self.fc(self.flatten(self.pool(x)))


def _parse_cfg(cfg) -> tuple[tuple[int, ...], ...]:
    allowed = (
        "a non-empty list of stages, each a non-empty list of positive ints, e.g. "
        "[[64], [128], [256], [512], [512]]"
    )
    if not isinstance(cfg, (tuple, list)) or not cfg:
        raise ConfigError("cfg", cfg, allowed)
    out = []
    for stage in cfg:
        if isinstance(stage, int):
            stage = (stage,)
        if not isinstance(stage, (tuple, list)) or not stage:
            raise ConfigError("cfg", cfg, allowed)
        out.append(tuple(check_positive("cfg", c, allowed) for c in stage))
    return tuple(out)


@MODELS.register(
    "vgg",
    family="cnn",
    description="VGG with BN (cfg=[[64],[128],[256],[512],[512]], i.e. vgg8)",
    paper="Simonyan & Zisserman, Very Deep Convolutional Networks for "
    "Large-Scale Image Recognition, 2015",
)
def vgg(
    *,
    num_classes: Count = 10,
    in_channels: Width = 3,
    img_size: ImgSize | tuple[ImgSize, ImgSize] = 32,
    cfg: tuple[tuple[int, ...], ...] = VGG8,
) -> nn.Module:
    """VGG with batch norm; ``cfg`` lists the conv widths of each stage."""
    check_common(num_classes, in_channels)
    hw = to_hw(img_size)
    stages_cfg = _parse_cfg(cfg)
    model = VGG(stages_cfg, in_channels, num_classes, hw)
    stages = [f"stage{i}" for i in range(1, len(stages_cfg) + 1)]
    return tag(model, family="cnn", stages=stages, feature_path="fc")


vgg8 = variant("vgg8", vgg, "VGG-8 with BN (one conv per stage)", cfg=VGG8)
vgg11 = variant("vgg11", vgg, "VGG-11 with BN", cfg=VGG11)
