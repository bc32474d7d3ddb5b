"""The VAEs of MRDD (Ke et al., "Rethinking Multi-view Representation Learning via Distilled
Disentangling", CVPR 2024) and its views: MNIST and a deterministic edge map.

* :class:`ConsistencyVAE`: masked cross-view VAE. Every view (patch-masked) goes through the
  encoder (one shared encoder when the views have one shape, as the official
  ``ConsistencyAE``; one per view otherwise), the flattened codes are concatenated and one
  linear layer gives ``(mu, logvar)`` of the fused latent ``c``; one decoder per view
  reconstructs that (unmasked) view from ``c``.
* :class:`SpecificVAE`: a view's own latent ``v``; its decoder reads ``[v, c]`` (``c`` from
  the frozen consistency encoder), so ``v`` only needs what ``c`` lacks.

Small CNNs (two stride-2 convs, width ``width`` / ``2 width``) replace the official
residual encoder: our size choice for CPU runs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.dataset import Dataset
from ..errors import ConfigError
from ..losses.disentangle import vae_kl


# -- views ----------------------------------------------------------------------------------
def sobel_edges(x: Tensor) -> Tensor:
    """Sobel gradient magnitude ``sqrt(G_x^2 + G_y^2)`` per channel of (B, C, H, W) images
    (zero padding), each image scaled to max 1. Deterministic. (The official EdgeMNIST view
    is a morphological gradient, ``dilate(img, 3x3) - img``; crossmodal.md asks for Sobel.)"""
    if x.dim() != 4:
        raise ConfigError("mrdd.views", tuple(x.shape), "(B, C, H, W) images")
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=x.dtype)
    k = torch.stack([kx, kx.T])[:, None].to(x.device)  # (2, 1, 3, 3)
    b, c, h, w = x.shape
    g = F.conv2d(x.reshape(b * c, 1, h, w), k, padding=1)
    mag = g.pow(2).sum(1).clamp_min(1e-12).sqrt().reshape(b, c, h, w)
    return mag / mag.flatten(1).amax(1).clamp_min(1e-12).view(b, 1, 1, 1)


def edge_views(data: Dataset, key: str = "x", out: str = "edge") -> Dataset:
    """``data`` with a second view ``out`` = :func:`sobel_edges` of ``data[key]`` (EdgeMNIST)."""
    if key not in data:
        raise ConfigError("mrdd.key", key, f"dataset keys: {', '.join(data.keys())}")
    x = data[key]
    edges = torch.cat([sobel_edges(x[i : i + 1024]) for i in range(0, len(x), 1024)])
    tensors = {**data.tensors, out: edges}
    return Dataset(tensors, {**data.kinds, out: "image"}, name=f"{data.name}+edges",
                   split=data.split, num_classes=data.num_classes, info=data.info)


def mask_patches(x: Tensor, patch: int, ratio: float, generator=None) -> Tensor:
    """Zero ``int(ratio * P)`` of the P ``patch x patch`` patches of each image, chosen at
    random per sample (MAE-style masking, as the official ``mask_image``)."""
    b, c, h, w = x.shape
    if patch < 1 or h % patch or w % patch:
        raise ConfigError("mrdd.patch", patch, f"a positive divisor of the image size {h}x{w}")
    if not 0.0 <= ratio < 1.0:
        raise ConfigError("mrdd.mask_ratio", ratio, "a fraction in [0, 1)")
    gh, gw = h // patch, w // patch
    n_mask = int(ratio * gh * gw)
    if n_mask == 0:
        return x
    dev = generator.device if generator is not None else x.device
    order = torch.rand(b, gh * gw, generator=generator, device=dev).argsort(1).to(x.device)
    keep = torch.ones(b, gh * gw, device=x.device, dtype=x.dtype)
    keep.scatter_(1, order[:, :n_mask], 0.0)
    keep = keep.view(b, 1, gh, 1, gw, 1).expand(b, 1, gh, patch, gw, patch)
    return x * keep.reshape(b, 1, h, w)


# -- networks -------------------------------------------------------------------------------
def _shape(shape) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError("mrdd.views", shape, "each view's per-sample shape (C, H, W)")
    return shape


class ConvEncoder(nn.Module):
    """(C, H, W) -> two stride-2 conv-BN-ReLU -> flatten -> Linear(hidden) -> ReLU."""

    def __init__(self, shape, width: int = 16, hidden: int = 256):
        super().__init__()
        c, h, w = _shape(shape)
        self.net = nn.Sequential(
            nn.Conv2d(c, width, 4, 2, 1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            n = self.net(torch.zeros(2, c, h, w)).shape[1]
        self.fc = nn.Sequential(nn.Linear(n, hidden), nn.ReLU())
        self.out_dim = hidden

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.net(x))


class ConvDecoder(nn.Module):
    """latent -> Linear -> (2 width, ceil(H/4), ceil(W/4)) -> two stride-2 transposed convs
    -> (C, H, W) (cropped), linear output (the views are standardised, not in [0, 1])."""

    def __init__(self, latent: int, shape, width: int = 16):
        super().__init__()
        self.shape = _shape(shape)
        c, h, w = self.shape
        self.grid = (math.ceil(h / 4), math.ceil(w / 4))
        self.width = width
        self.fc = nn.Sequential(nn.Linear(latent, 2 * width * self.grid[0] * self.grid[1]),
                                nn.ReLU())
        self.net = nn.Sequential(
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.ConvTranspose2d(width, c, 4, 2, 1),
        )

    def forward(self, z: Tensor) -> Tensor:
        x = self.fc(z).view(z.shape[0], 2 * self.width, *self.grid)
        _, h, w = self.shape
        return self.net(x)[..., :h, :w]


def reparameterize(mu: Tensor, logvar: Tensor, sample: bool) -> Tensor:
    """``mu + exp(logvar / 2) * eps`` when ``sample`` (training), else ``mu``."""
    return mu + (0.5 * logvar).exp() * torch.randn_like(mu) if sample else mu


def recon_error(x_hat: Tensor, x: Tensor) -> Tensor:
    """Per sample sum of squared errors (B,). The official code sums over the batch too
    (``MSELoss(reduction='sum')``), which ties the recon/KL balance to the batch size; the
    per-sample sum keeps the paper's ``recon + beta * KL`` per sample."""
    return (x_hat - x).pow(2).flatten(1).sum(1)


class ConsistencyVAE(nn.Module):
    """Masked cross-view VAE: views -> fused ``c`` (``c_dim``) -> every view."""

    def __init__(self, shapes, c_dim: int = 20, width: int = 16, hidden: int = 256):
        super().__init__()
        shapes = [_shape(s) for s in shapes]
        if len(shapes) < 2:
            raise ConfigError("mrdd.views", len(shapes), "two or more views")
        if c_dim < 1:
            raise ConfigError("mrdd.c_dim", c_dim, "a positive integer")
        self.shared = len(set(shapes)) == 1
        n_enc = 1 if self.shared else len(shapes)
        self.encoders = nn.ModuleList([ConvEncoder(s, width, hidden) for s in shapes[:n_enc]])
        self.to_latent = nn.Linear(hidden * len(shapes), 2 * c_dim)
        self.decoders = nn.ModuleList([ConvDecoder(c_dim, s, width) for s in shapes])
        self.c_dim = c_dim

    def encode(self, views) -> tuple[Tensor, Tensor]:
        codes = [self.encoders[0 if self.shared else i](x) for i, x in enumerate(views)]
        mu, logvar = self.to_latent(torch.cat(codes, -1)).chunk(2, -1)
        return mu, logvar

    def loss(self, views, *, mask_ratio: float, patch: int, kl_weight: float = 1.0,
             generator=None) -> tuple[Tensor, dict]:
        """``sum_m ||x_m - dec_m(c)||^2 + kl_weight * KL(q(c | masked views) || N(0, I))``,
        mean over the batch, with ``c`` sampled from the masked views' posterior."""
        masked = [mask_patches(x, patch, mask_ratio, generator) for x in views]
        mu, logvar = self.encode(masked)
        c = reparameterize(mu, logvar, self.training)
        recon = sum(recon_error(dec(c), x) for dec, x in zip(self.decoders, views)).mean()
        kl = vae_kl(mu, logvar).mean()
        return recon + kl_weight * kl, {"recon": float(recon.detach()), "kl": float(kl.detach())}


class SpecificVAE(nn.Module):
    """One view's VAE: ``v`` (``v_dim``) from the view; the decoder reads ``[v, c]``."""

    def __init__(self, shape, v_dim: int = 10, c_dim: int = 20, width: int = 16,
                 hidden: int = 256):
        super().__init__()
        if v_dim < 1:
            raise ConfigError("mrdd.v_dim", v_dim, "a positive integer")
        self.encoder = ConvEncoder(shape, width, hidden)
        self.to_latent = nn.Linear(hidden, 2 * v_dim)
        self.decoder = ConvDecoder(v_dim + c_dim, shape, width)
        self.v_dim = v_dim

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.to_latent(self.encoder(x)).chunk(2, -1)

    def forward(self, x: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(reconstruction, mu, logvar, v)."""
        mu, logvar = self.encode(x)
        v = reparameterize(mu, logvar, self.training)
        return self.decoder(torch.cat([v, c], -1)), mu, logvar, v
