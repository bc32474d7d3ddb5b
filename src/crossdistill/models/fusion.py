"""Late-fusion audio-visual classifier: ``forward(image, audio) -> logits (B, K)``.

Each modality has its own small CNN branch ending in a linear projection; the projections
of the *present* branches are averaged per sample and one shared linear head ``fc`` maps
the result to logits. Because the head is linear, this equals averaging per-branch logits
(``fc(mean(e)) == mean(fc(e))``) and, with the per-branch projections, it is as expressive
as separate heads -- while giving the model one penultimate embedding (the input of
``fc``) for feature distillation, like every other model in the zoo.

A branch whose input is all zeros for a sample (or ``None`` for the batch) is *missing* for
that sample, so "image only" evaluation is ``model(image, torch.zeros_like(audio))``. The
datasets standardise every modality, so real inputs are never all zeros. Benchmark:
Vielzeuf et al., "CentralNet: a Multilayer Approach for Multimodal Fusion" (2018), AV-MNIST.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import MODELS
from ..schema import Count, ImgSize, Width
from .cnn import conv_bn_relu
from .mlp import check_common, check_positive, tag, to_hw


class Branch(nn.Module):
    """stage1, stage2 (conv-BN-ReLU + 2x2 max pool while the map allows), stage3 -> pool ->
    flatten -> proj (linear, no activation: fusion must stay linear up to the head)."""

    def __init__(self, in_channels: int, width: int, hw: tuple[int, int], dim: int):
        super().__init__()
        h, w = hw
        chans = (width, 2 * width, 4 * width)
        prev = in_channels
        for i, c in enumerate(chans, start=1):
            layers = conv_bn_relu(prev, c)
            if i < len(chans) and min(h, w) >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            self.add_module(f"stage{i}", nn.Sequential(*layers))
            prev = c
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.proj = nn.Linear(prev, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.proj(self.flatten(self.pool(x)))


class Fuse(nn.Module):
    """Mean of the present branches' embeddings per sample (zeros where none is present)."""

    def forward(self, embs: Tensor, present: Tensor) -> Tensor:
        # embs (B, M, D), present (B, M) bool
        p = present.to(embs.dtype)
        return (embs * p[..., None]).sum(1) / p.sum(1, keepdim=True).clamp_min(1.0)


def present_mask(x: Tensor) -> Tensor:
    """Per sample: does ``x`` hold any nonzero value (False = modality missing)."""
    return x.flatten(1).ne(0).any(1)


class LateFusion(nn.Module):
    def __init__(self, num_classes, in_channels, image_hw, audio_hw, width, dim):
        super().__init__()
        self.image_hw, self.audio_hw = image_hw, audio_hw
        self.image_branch = Branch(in_channels, width, image_hw, dim)
        self.audio_branch = Branch(1, width, audio_hw, dim)
        self.fuse = Fuse()
        self.fc = nn.Linear(dim, num_classes)

    def _embed(self, image: Tensor | None, audio: Tensor | None):
        if image is None and audio is None:
            raise ConfigError("inputs", None, "give an image, an audio input or both")
        embs, present = [], []
        for x, branch in ((image, self.image_branch), (audio, self.audio_branch)):
            if x is None:
                continue
            embs.append(branch(x))
            present.append(present_mask(x))
        return torch.stack(embs, 1), torch.stack(present, 1)

    def forward(self, image: Tensor | None = None, audio: Tensor | None = None) -> Tensor:
        embs, present = self._embed(image, audio)
        return self.fc(self.fuse(embs, present))

    def branch_logits(self, image: Tensor, audio: Tensor) -> dict[str, Tensor]:
        """Each branch's own logits (``fc`` of its embedding), for per-modality diagnostics."""
        return {
            "image": self.fc(self.image_branch(image)),
            "audio": self.fc(self.audio_branch(audio)),
        }


@MODELS.register(
    "fusion",
    family="fusion",
    description="late-fusion image+audio CNNs, logits averaged over present branches "
    "(width=16, image 28x28, audio (40, 48))",
    paper="Vielzeuf et al., CentralNet: a Multilayer Approach for Multimodal Fusion, 2018",
)
def fusion(
    *,
    num_classes: Count = 10,
    in_channels: Width = 1,
    img_size: ImgSize | tuple[ImgSize, ImgSize] | None = None,
    image_size: ImgSize | tuple[ImgSize, ImgSize] | None = None,
    audio_size: ImgSize | tuple[ImgSize, ImgSize] = (40, 48),
    width: Width = 16,
    dim: Width = 64,
) -> nn.Module:
    """Late fusion of an image CNN on ``(B, in_channels, *image_size)`` and an audio CNN on
    log-mels ``(B, 1, n_mels, frames)``. ``img_size`` is the zoo-wide alias of
    ``image_size`` (default 28; the builder passes it from the dataset's image key); ``dim`` is the
    fused embedding size."""
    check_common(num_classes, in_channels)
    if img_size is not None and image_size is not None and to_hw(img_size) != to_hw(image_size):
        raise ConfigError("img_size", img_size, f"disagrees with image_size={image_size!r}")
    image_size = next((s for s in (image_size, img_size) if s is not None), 28)
    image_hw = to_hw(image_size, "image_size")
    audio_hw = to_hw(audio_size, "audio_size")
    check_positive("width", width)
    check_positive("dim", dim)
    model = LateFusion(num_classes, in_channels, image_hw, audio_hw, width, dim)
    stages = [f"{b}_branch.stage{i}" for b in ("image", "audio") for i in (1, 2, 3)]
    return tag(model, family="fusion", stages=stages, feature_path="fc")
