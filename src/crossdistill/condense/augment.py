"""Differentiable siamese augmentation (DSA) for dataset condensation.

Paper: Zhao & Bilen, "Dataset Condensation with Differentiable Siamese Augmentation",
ICML 2021. Eq. (4) of the paper: the matching loss compares ``A_w(S)`` and ``A_w(T)`` with
the *same* transformation parameters ``w`` for the synthetic and the real batch, and ``A`` is
differentiable so the loss gradient flows back to the synthetic pixels.

As in the official code (``DiffAugment`` with the strategy
``color_crop_cutout_flip_scale_rotate`` and ``aug_mode='S'``), one call picks one of the six
families at random (``color`` = brightness, saturation and contrast applied together) and
applies it. Default magnitudes are the official ``ParamDiffAug`` ones: scale 1.2, rotate 15
degrees, crop (translation) 0.125 of the size, cutout 0.5 of the size, brightness 1.0,
saturation 2.0, contrast 0.5.

``shared=True`` (the siamese mode used inside matching losses) draws one parameter set for the
whole batch -- exactly like the official ``batchmode``, where every image of both batches gets
the first sample's parameters -- so a real and a synthetic batch of different sizes get the
same transformation. ``shared=False`` (used when training evaluation models) draws
per-image parameters. Every draw takes a ``torch.Generator``; nothing reads the global RNG.
Deviation: crop and cutout positions are integer pixel offsets applied by indexing, which is
what the official code does; scale and rotate use ``affine_grid``/``grid_sample`` with
``align_corners=True`` like the official code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError

FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")


@dataclass
class DSAParams:
    scale: float = 1.2
    rotate: float = 15.0
    crop: float = 0.125
    cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5


class DSA:
    """``DSA(strategy)``: ``sample(x, gen)`` draws parameters, ``apply(x, p)`` applies them.
    ``__call__(x, gen)`` does both. Use ``apply`` with the same ``p`` on real and synthetic
    batches for the siamese property."""

    def __init__(
        self,
        strategy: str = "color_crop_cutout_flip_scale_rotate",
        *,
        shared: bool = True,
        params: DSAParams | None = None,
    ):
        fams = [s for s in strategy.split("_") if s] if strategy else []
        bad = [f for f in fams if f not in FAMILIES]
        if bad or not fams:
            raise ConfigError(
                "dsa_strategy", strategy, f"'_'-joined names from {', '.join(FAMILIES)}"
            )
        self.families, self.shared, self.p = fams, shared, params or DSAParams()

    def sample(self, x: torch.Tensor, gen: torch.Generator) -> dict:
        fam = self.families[int(torch.randint(len(self.families), (1,), generator=gen))]
        n = 1 if self.shared else x.shape[0]
        h, w = x.shape[-2:]

        def u(*shape):
            return torch.rand(n, *shape, generator=gen)

        out: dict = {"family": fam}
        if fam == "color":
            out.update(bright=u(), sat=u(), contrast=u())
        elif fam == "flip":
            out["flip"] = u() < 0.5
        elif fam == "scale":
            out["sx"], out["sy"] = u(), u()
        elif fam == "rotate":
            out["theta"] = u()
        elif fam == "crop":
            sh, sw = int(h * self.p.crop + 0.5), int(w * self.p.crop + 0.5)
            out["dy"] = torch.randint(-sh, sh + 1, (n,), generator=gen)
            out["dx"] = torch.randint(-sw, sw + 1, (n,), generator=gen)
        elif fam == "cutout":
            ch, cw = int(h * self.p.cutout + 0.5), int(w * self.p.cutout + 0.5)
            out["cy"] = torch.randint(0, h + (1 - ch % 2), (n,), generator=gen)
            out["cx"] = torch.randint(0, w + (1 - cw % 2), (n,), generator=gen)
            out["size"] = (ch, cw)
        return out

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return self.apply(x, self.sample(x, gen))

    def apply(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        b = x.shape[0]
        dev, dt = x.device, x.dtype

        def per(t):  # (n, ...) -> (b, 1, 1, 1) broadcastable
            t = t.to(dev, dt).reshape(-1, 1, 1, 1)
            return t.expand(b, 1, 1, 1) if t.shape[0] == 1 else t

        fam = p["family"]
        if fam == "color":
            x = x + (per(p["bright"]) - 0.5) * self.p.brightness
            m = x.mean(dim=1, keepdim=True)
            x = (x - m) * (per(p["sat"]) * self.p.saturation) + m
            m = x.mean(dim=(1, 2, 3), keepdim=True)
            return (x - m) * (per(p["contrast"]) + self.p.contrast) + m
        if fam == "flip":
            f = p["flip"].to(dev).reshape(-1, 1, 1, 1).expand(b, 1, 1, 1)
            return torch.where(f, x.flip(-1), x)
        if fam in ("scale", "rotate"):
            if fam == "scale":
                lo, hi = 1.0 / self.p.scale, self.p.scale
                sx = per(p["sx"]).flatten() * (hi - lo) + lo
                sy = per(p["sy"]).flatten() * (hi - lo) + lo
                z = torch.zeros_like(sx)
                theta = torch.stack([torch.stack([sx, z, z], 1), torch.stack([z, sy, z], 1)], 1)
            else:
                a = (per(p["theta"]).flatten() - 0.5) * 2 * self.p.rotate / 180 * math.pi
                z = torch.zeros_like(a)
                theta = torch.stack(
                    [torch.stack([a.cos(), a.sin(), z], 1), torch.stack([-a.sin(), a.cos(), z], 1)],
                    1,
                )
            grid = F.affine_grid(theta, list(x.shape), align_corners=True)
            return F.grid_sample(x, grid, align_corners=True)
        if fam == "crop":
            return _translate(x, p["dy"], p["dx"])
        if fam == "cutout":
            return x * _cutout_mask(x, p["cy"], p["cx"], p["size"])
        raise ConfigError("dsa family", fam, f"one of {', '.join(FAMILIES)}")


def _expand(t: torch.Tensor, b: int) -> torch.Tensor:
    return t.expand(b) if t.shape[0] == 1 else t


def _translate(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Shift each image by integer (dy, dx) with zero fill (official 'crop' = translation)."""
    b, c, h, w = x.shape
    dy, dx = _expand(dy, b).to(x.device), _expand(dx, b).to(x.device)
    pad_h, pad_w = int(dy.abs().max()), int(dx.abs().max())
    xp = F.pad(x, (pad_w, pad_w, pad_h, pad_h))
    rows = torch.arange(h, device=x.device)[None] + pad_h + dy[:, None]  # (b, h)
    cols = torch.arange(w, device=x.device)[None] + pad_w + dx[:, None]  # (b, w)
    out = xp.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * pad_w))
    return out.gather(3, cols[:, None, None, :].expand(b, c, h, w))


def _cutout_mask(x, cy, cx, size) -> torch.Tensor:
    b, _, h, w = x.shape
    cy, cx = _expand(cy, b).to(x.device), _expand(cx, b).to(x.device)
    ys = torch.arange(h, device=x.device)[None]
    xs = torch.arange(w, device=x.device)[None]
    in_y = (ys >= (cy - size[0] // 2)[:, None]) & (ys < (cy - size[0] // 2 + size[0])[:, None])
    in_x = (xs >= (cx - size[1] // 2)[:, None]) & (xs < (cx - size[1] // 2 + size[1])[:, None])
    hole = in_y[:, :, None] & in_x[:, None, :]
    return (~hole).to(x.dtype)[:, None]


def hflip_union(x: torch.Tensor) -> torch.Tensor:
    """FYI's batch operator: ``S ∪ hflip(S)`` (Son et al., ECCV 2024, 'FlipBatch')."""
    return torch.cat([x, x.flip(-1)])
