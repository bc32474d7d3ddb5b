"""Tiny audio classifiers over log-mel spectrograms shaped like images, ``(B, 1, n_mels, T)``.

They let the same distillation code run on speech/sound tasks: ``img_size`` is
``(n_mels, frames)``. ``audio-cnn`` convolves over time with the mel bins as channels,
following Choi et al., "Temporal Convolution for Real-time Keyword Spotting on Mobile
Devices" (2019). ``gru`` reads the frames in order and classifies from the last hidden
state; GRU from Cho et al., "Learning Phrase Representations using RNN Encoder-Decoder for
Statistical Machine Translation" (2014).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import MODELS
from ..schema import Count, Depth, Width
from .mlp import check_common, check_positive, spaced_indices, tag, to_hw

AUDIO_DEFAULT_SIZE = (40, 101)  # 40 mel bins x ~1 s at a 10 ms hop (keyword spotting)


def check_audio(num_classes, in_channels, img_size) -> tuple[int, int]:
    check_common(num_classes, in_channels)
    if in_channels != 1:
        raise ConfigError(
            "in_channels", in_channels, "audio models take one log-mel spectrogram channel: use 1"
        )
    return to_hw(img_size)


class Transpose(nn.Module):
    """Swap two dimensions, as a module so the reshaped tensor can be tapped."""

    def __init__(self, dim0: int, dim1: int):
        super().__init__()
        self.dim0, self.dim1 = dim0, dim1

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(self.dim0, self.dim1)


class AudioCNN(nn.Module):
    """frontend ``(B,1,M,T) -> (B,M,T)`` -> block1..blockN (conv1d) -> pool -> fc."""

    def __init__(self, n_mels: int, channels: tuple[int, ...], num_classes: int):
        super().__init__()
        self.frontend = nn.Flatten(1, 2)
        prev = n_mels
        for i, c in enumerate(channels, start=1):
            layers = [
                nn.Conv1d(prev, c, 3, padding=1, bias=False),
                nn.BatchNorm1d(c),
                nn.ReLU(inplace=True),
            ]
            if i < len(channels):
                layers.append(nn.MaxPool1d(2, ceil_mode=True))
            self.add_module(f"block{i}", nn.Sequential(*layers))
            prev = c
        self.num_blocks = len(channels)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(prev, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.frontend(x)
        for i in range(1, self.num_blocks + 1):
            x = getattr(self, f"block{i}")(x)
        return self.fc(self.flatten(self.pool(x)))


class GRULayer(nn.Module):
    """One unidirectional GRU layer returning the whole output sequence ``(B, T, H)``."""

    def __init__(self, input_size: int, hidden: int):
        super().__init__()
        self.rnn = nn.GRU(input_size, hidden, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.rnn(x)[0]


class LastStep(nn.Module):
    """The last time step ``(B, T, H) -> (B, H)``, i.e. the final hidden state."""

    def forward(self, x: Tensor) -> Tensor:
        return x[:, -1]


class GRUClassifier(nn.Module):
    """frontend ``(B,1,M,T) -> (B,T,M)`` -> layers (GRU) -> last -> fc."""

    def __init__(self, n_mels: int, hidden: int, num_layers: int, num_classes: int):
        super().__init__()
        self.frontend = nn.Sequential(nn.Flatten(1, 2), Transpose(1, 2))
        self.layers = nn.Sequential(
            *[GRULayer(n_mels if i == 0 else hidden, hidden) for i in range(num_layers)]
        )
        self.last = LastStep()
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.last(self.layers(self.frontend(x))))


@MODELS.register(
    "audio-cnn",
    family="audio",
    description="1-D temporal CNN over log-mel frames (channels=(32, 64, 64), img_size=(40, 101))",
    paper="Choi et al., Temporal Convolution for Real-time Keyword Spotting "
    "on Mobile Devices, 2019",
)
def audio_cnn(
    *,
    num_classes: Count = 10,
    in_channels: Width = 1,
    img_size=AUDIO_DEFAULT_SIZE,
    channels: Width | tuple[Width, ...] = (32, 64, 64),
) -> nn.Module:
    """Temporal CNN; ``img_size`` is ``(n_mels, frames)`` and any frame count works."""
    n_mels, _ = check_audio(num_classes, in_channels, img_size)
    if isinstance(channels, int):
        channels = (channels,)
    if not isinstance(channels, (tuple, list)) or not channels:
        raise ConfigError("channels", channels, "a non-empty list of positive ints")
    for c in channels:
        check_positive("channels", c, "a non-empty list of positive ints")
    model = AudioCNN(n_mels, tuple(channels), num_classes)
    stages = [f"block{i + 1}" for i in spaced_indices(len(channels))]
    return tag(model, family="audio", stages=stages, feature_path="fc")


@MODELS.register(
    "gru",
    family="audio",
    description="unidirectional GRU over log-mel frames "
    "(hidden=64, num_layers=2, img_size=(40, 101))",
    paper="Cho et al., Learning Phrase Representations using RNN "
    "Encoder-Decoder for Statistical Machine Translation, 2014",
)
def gru(
    *,
    num_classes: Count = 10,
    in_channels: Width = 1,
    img_size=AUDIO_DEFAULT_SIZE,
    hidden: Width = 64,
    num_layers: Depth = 2,
) -> nn.Module:
    """GRU classifier; the last hidden state of the top layer feeds ``fc``."""
    n_mels, _ = check_audio(num_classes, in_channels, img_size)
    check_positive("hidden", hidden)
    check_positive("num_layers", num_layers)
    model = GRUClassifier(n_mels, hidden, num_layers, num_classes)
    stages = [f"layers.{i}" for i in spaced_indices(num_layers)]
    return tag(model, family="audio", stages=stages, feature_path="fc")
