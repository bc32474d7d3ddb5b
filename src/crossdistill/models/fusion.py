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


def add_stages(module: nn.Module, in_channels: int, chans, hw: tuple[int, int]) -> int:
    """``stage1..stageN`` on ``module``: conv-BN-ReLU, then a 2x2 max pool after every stage
    but the last while the map allows; returns the last stage's channels."""
    h, w = hw
    prev = in_channels
    for i, c in enumerate(chans, start=1):
        layers = conv_bn_relu(prev, c)
        if i < len(chans) and min(h, w) >= 2:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        module.add_module(f"stage{i}", nn.Sequential(*layers))
        prev = c
    return prev


class Branch(nn.Module):
    """stage1, stage2 (conv-BN-ReLU + 2x2 max pool while the map allows), stage3 -> pool ->
    flatten -> proj (linear, no activation: fusion must stay linear up to the head)."""

    def __init__(self, in_channels: int, width: int, hw: tuple[int, int], dim: int):
        super().__init__()
        prev = add_stages(self, in_channels, (width, 2 * width, 4 * width), hw)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.proj = nn.Linear(prev, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Runs on the present samples only and returns zeros for the missing ones, so that
        BatchNorm's batch and running statistics never see a dropped (all-zero) input: with
        modality dropout they would otherwise mix real and zeroed inputs and the complete-
        input validation accuracy would swing with the last batches' masks. Taps inside the
        branch hold the present samples' rows only; the branch output has all ``B`` rows."""
        keep = present_mask(x)
        if bool(keep.all()):
            return self._encode(x)
        out = x.new_zeros(x.shape[0], self.proj.out_features)
        if bool(keep.any()):
            out = out.index_put((keep,), self._encode(x[keep]))
        return out

    def _encode(self, x: Tensor) -> Tensor:
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


# -- early fusion ---------------------------------------------------------------------------


class Stem(nn.Module):
    """One modality onto the shared grid: conv-BN-ReLU at the input's own resolution, then
    adaptive average pooling to ``grid`` (so a 28x28 image and a 40x48 log-mel become maps
    of one size), then zeroed for samples whose input is all zeros (missing)."""

    def __init__(self, in_channels: int, width: int, grid: tuple[int, int]):
        super().__init__()
        self.conv = nn.Sequential(*conv_bn_relu(in_channels, width))
        self.pool = nn.AdaptiveAvgPool2d(grid)

    def forward(self, x: Tensor) -> Tensor:
        keep = present_mask(x).to(x.dtype).view(-1, 1, 1, 1)
        return self.pool(self.conv(x)) * keep


class EarlyFusion(nn.Module):
    """image_stem, audio_stem -> concatenated on channels -> stage1..3 (conv-BN-ReLU, 2x2
    max pool after the first two) -> pool -> flatten -> fc."""

    def __init__(self, num_classes, in_channels, width, grid):
        super().__init__()
        self.grid = grid
        self.width = width
        self.image_stem = Stem(in_channels, width, grid)
        self.audio_stem = Stem(1, width, grid)
        prev = add_stages(self, 2 * width, (2 * width, 4 * width, 4 * width), grid)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(prev, num_classes)

    def forward(self, image: Tensor | None = None, audio: Tensor | None = None) -> Tensor:
        if image is None and audio is None:
            raise ConfigError("inputs", None, "give an image, an audio input or both")
        ref = image if image is not None else audio
        empty = ref.new_zeros(ref.shape[0], self.width, *self.grid)
        a = self.image_stem(image) if image is not None else empty
        b = self.audio_stem(audio) if audio is not None else empty
        x = self.stage3(self.stage2(self.stage1(torch.cat([a, b], 1))))
        return self.fc(self.flatten(self.pool(x)))


@MODELS.register(
    "fusion-early",
    family="fusion",
    description="early fusion: per-modality conv stems pooled to one grid, concatenated on "
    "channels, one CNN (width=16, grid=(14, 14))",
    paper="Vielzeuf et al., CentralNet: a Multilayer Approach for Multimodal Fusion, 2018",
)
def fusion_early(
    *,
    num_classes: Count = 10,
    in_channels: Width = 1,
    img_size: ImgSize | tuple[ImgSize, ImgSize] | None = None,
    width: Width = 16,
    grid: ImgSize | tuple[ImgSize, ImgSize] = (14, 14),
) -> nn.Module:
    """Early fusion of an image ``(B, in_channels, H, W)`` and a log-mel
    ``(B, 1, n_mels, frames)``, both of any size: each modality's stem (conv-BN-ReLU,
    ``width`` channels) is average-pooled to ``grid``, the two maps are concatenated on
    channels (``2 * width``) and one CNN (``2w, 4w, 4w`` channels) classifies them. A missing
    modality (all-zero input, or ``None``) contributes exactly zero channels, as under
    ``modality_dropout`` in training. ``img_size`` is accepted (and only checked) for the
    builder, which passes the image key's size."""
    check_common(num_classes, in_channels)
    if img_size is not None:
        to_hw(img_size)
    check_positive("width", width)
    hw = to_hw(grid, "grid")
    model = EarlyFusion(num_classes, in_channels, width, hw)
    return tag(model, family="fusion", stages=["stage1", "stage2", "stage3"], feature_path="fc")


@MODELS.register(
    "audio-cnn2d",
    family="audio",
    description="2-D CNN over log-mels as one-channel images, the fusion audio branch alone "
    "(channels=(16, 32, 32), img_size=(40, 48))",
    paper="LeCun et al., Gradient-based learning applied to document recognition, 1998",
)
def audio_cnn2d(
    *,
    num_classes: Count = 10,
    in_channels: Width = 1,
    img_size: ImgSize | tuple[ImgSize, ImgSize] = (40, 48),
    channels: Width | tuple[Width, ...] = (16, 32, 32),
) -> nn.Module:
    """The zoo ``cnn`` on ``(B, 1, n_mels, frames)`` (conv-BN-ReLU stages, 2x2 pooling over
    mel bins and frames, global average pool: any frame count works), tagged as an audio
    model; ``audio-cnn`` is the 1-D (temporal) alternative."""
    from .audio import check_audio
    from .cnn import cnn

    n_mels, frames = check_audio(num_classes, in_channels, img_size)
    model = cnn(num_classes=num_classes, in_channels=1, img_size=(n_mels, frames),
                channels=channels)
    model.family = "audio"
    return model
