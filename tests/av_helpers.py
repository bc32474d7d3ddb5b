"""A tiny separable image + audio dataset for the cross-modal tests (4 classes, image 8x8,
log-mel-shaped audio 6x10): the image mean rises with the class, the audio mean falls."""

import torch

from crossdistill.data.dataset import Dataset


def tiny_av(n: int, seed: int) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    image = torch.randn(n, 1, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float()
    audio = torch.randn(n, 1, 6, 10, generator=g) - y.view(-1, 1, 1, 1).float()
    return Dataset({"image": image, "audio": audio, "y": y},
                   {"image": "image", "audio": "audio", "y": "label"}, num_classes=4)
