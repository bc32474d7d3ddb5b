"""Light, batched, seeded augmentation: random shifts (pad + crop) and optional flips.

Each batch draws its randomness from its own generator seeded by (seed, epoch, batch), so a
resumed run sees exactly the augmentations an uninterrupted one would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_shift(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``pad`` pixels (zero fill), like pad-and-random-crop."""
    if pad <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None]).clamp_max(h + 2 * pad - 1)
    cols = dx[:, None] + torch.arange(w)[None]
    idx_r = rows[:, None, :, None].expand(b, x.shape[1], h, w + 2 * pad)
    out = padded.gather(2, idx_r)
    idx_c = cols[:, None, None, :].expand(b, x.shape[1], h, w)
    return out.gather(3, idx_c)


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def augment(x: torch.Tensor, *, shift: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    x = random_shift(x, shift, gen)
    return random_flip(x, gen) if flip else x
