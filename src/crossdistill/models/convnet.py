"""ConvNet of the dataset-condensation literature: ``depth`` x (conv3x3 -> norm -> ReLU -> avgpool).

Dataset distillation methods (gradient matching, distribution matching, trajectory
matching) all evaluate on this network, so synthetic sets are only comparable when it is
reproduced exactly: width 128, instance norm (a GroupNorm with one group per channel),
average pooling, and a single linear classifier on the flattened map. ``embed`` exposes
the flattened features that distribution matching compares. Paper: Zhao, Mopuri & Bilen,
"Dataset Condensation with Gradient Matching" (2021); the architecture follows Gidaris &
Komodakis, "Dynamic Few-Shot Visual Learning without Forgetting" (2018).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import MODELS
from ..schema import Count, Depth, ImgSize, Width
from .mlp import check_common, check_positive, spaced_indices, tag, to_hw, variant

NORMS = ("instancenorm", "batchnorm", "none")


def make_norm(norm: str, width: int) -> nn.Module:
    if norm == "instancenorm":
        return nn.GroupNorm(width, width, affine=True)
    if norm == "batchnorm":
        return nn.BatchNorm2d(width)
    return nn.Identity()


class ConvNet(nn.Module):
    """features (blocks of conv/norm/act/pool) -> flatten -> classifier."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        hw: tuple[int, int],
        width: int,
        depth: int,
        norm: str,
    ):
        super().__init__()
        h, w = hw
        blocks, prev = [], in_channels
        for _ in range(depth):
            block = nn.Sequential()
            block.add_module("conv", nn.Conv2d(prev, width, 3, padding=1))
            block.add_module("norm", make_norm(norm, width))
            block.add_module("act", nn.ReLU(inplace=True))
            block.add_module("pool", nn.AvgPool2d(2))
            blocks.append(block)
            prev, h, w = width, h // 2, w // 2
        self.features = nn.Sequential(*blocks)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(width * h * w, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        """Flattened features before the classifier, ``(B, width * h * w)``."""
        return self.flatten(self.features(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(x))


@MODELS.register(
    "convnet",
    family="cnn",
    description="dataset-condensation ConvNet (depth=3, width=128, norm=instancenorm)",
    paper="Zhao et al., Dataset Condensation with Gradient Matching, 2021",
)
def convnet(
    *,
    num_classes: Count = 10,
    in_channels: Width = 3,
    img_size: ImgSize | tuple[ImgSize, ImgSize] = 32,
    depth: Depth = 3,
    width: Width = 128,
    norm: str = "instancenorm",
) -> nn.Module:
    """The condensation ConvNet; each of ``depth`` blocks halves the spatial size."""
    check_common(num_classes, in_channels)
    hw = to_hw(img_size)
    check_positive("depth", depth)
    check_positive("width", width)
    if norm not in NORMS:
        raise ConfigError("norm", norm, f"one of {', '.join(NORMS)}")
    if min(hw) >> depth < 1:
        raise ConfigError(
            "depth",
            depth,
            f"each block halves the image, so img_size={hw} "
            f"allows depth <= {min(hw).bit_length() - 1}",
        )
    model = ConvNet(in_channels, num_classes, hw, width, depth, norm)
    stages = [f"features.{i}" for i in spaced_indices(depth)]
    return tag(model, family="cnn", stages=stages, feature_path="classifier")


convnet3 = variant("convnet3", convnet, "dataset-condensation ConvNet, depth 3", depth=3)
convnet4 = variant("convnet4", convnet, "dataset-condensation ConvNet, depth 4", depth=4)
