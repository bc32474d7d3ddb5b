"""Light, batched, seeded augmentation: random shifts (pad + crop) and optional flips,
applied jointly to every spatial key of a batch (images, label maps, spatial masks).

Each batch draws its randomness from its own generator seeded by (seed, epoch, batch), so a
resumed run sees exactly the augmentations an uninterrupted one would. The random offsets
and flips are drawn once per batch and applied to every spatial key, so a label map stays
aligned with its image; shifted-in label pixels are ``-100`` (ignored), image pixels 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FILL = {"image": 0.0, "label_map": -100, "mask": 0}


def draw_shift(b: int, pad: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    return dx, dy


def apply_shift(x: torch.Tensor, pad: int, dx, dy, fill=0.0) -> torch.Tensor:
    """Shift each (C, H, W) or (H, W) sample by (dx - pad, dy - pad) pixels, filling with
    ``fill``."""
    squeeze = x.dim() == 3
    if squeeze:
        x = x[:, None]
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), value=fill)
    rows = (dy[:, None] + torch.arange(h)[None]).clamp_max(h + 2 * pad - 1)
    cols = dx[:, None] + torch.arange(w)[None]
    idx_r = rows[:, None, :, None].expand(b, c, h, w + 2 * pad)
    out = padded.gather(2, idx_r)
    idx_c = cols[:, None, None, :].expand(b, c, h, w)
    out = out.gather(3, idx_c)
    return out[:, 0] if squeeze else out


def random_shift(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``pad`` pixels (zero fill), like pad-and-random-crop."""
    if pad <= 0:
        return x
    dx, dy = draw_shift(x.shape[0], pad, gen)
    return apply_shift(x, pad, dx, dy)


def _flip(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    sel = flip.view(-1, *[1] * (x.dim() - 1))
    return torch.where(sel, x.flip(-1), x)


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return _flip(x, torch.rand(x.shape[0], generator=gen) < 0.5)


def augment(x: torch.Tensor, *, shift: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    x = random_shift(x, shift, gen)
    return random_flip(x, gen) if flip else x


def augment_batch(batch: dict, kinds: dict, *, shift: int, flip: bool, gen: torch.Generator):
    """Shift/flip every spatial key of ``batch`` (in place) with one draw per batch."""
    keys = [k for k in batch if kinds.get(k) in FILL and batch[k].dim() >= 3]
    if not keys:
        return batch
    boxes = [k for k in batch if kinds.get(k) == "boxes"]
    b = batch[keys[0]].shape[0]
    h, w = batch[keys[0]].shape[-2:]
    if shift > 0:
        dx, dy = draw_shift(b, shift, gen)
        for k in keys:
            batch[k] = apply_shift(batch[k], shift, dx, dy, FILL[kinds[k]])
        for k in boxes:
            batch[k] = shift_boxes(batch[k], dx - shift, dy - shift, (h, w))
    if flip:
        f = torch.rand(b, generator=gen) < 0.5
        for k in keys:
            batch[k] = _flip(batch[k], f)
        for k in boxes:
            x = batch[k]
            mirrored = torch.stack([w - x[..., 2], x[..., 1], w - x[..., 0], x[..., 3]], -1)
            batch[k] = torch.where(f.view(-1, 1, 1), mirrored, x)
    return batch


def shift_boxes(boxes: torch.Tensor, dx, dy, hw) -> torch.Tensor:
    """xyxy boxes ``(B, M, 4)`` moved with their image by ``(dx, dy)`` pixels (the content
    moves by minus the crop offset), clipped to the image; a box pushed fully out keeps zero
    area, which marks it as padding (:func:`crossdistill.boxes.valid_boxes`)."""
    off = torch.stack([-dx, -dy, -dx, -dy], -1).to(boxes.dtype)[:, None]
    x = boxes + off
    h, w = hw
    return torch.stack([x[..., 0].clamp(0, w), x[..., 1].clamp(0, h), x[..., 2].clamp(0, w),
                        x[..., 3].clamp(0, h)], -1)
