"""DM: dataset condensation with distribution matching.

Paper: Zhao & Bilen, "Dataset Condensation with Distribution Matching", WACV 2023. Eq. (3)-(4):

    min_S  E_{theta ~ P_theta, w ~ Omega}  sum_c || 1/|T_c| sum_{x in T_c} psi_theta(A_w(x))
                                              - 1/|S_c| sum_{s in S_c} psi_theta(A_w(s)) ||^2

with ``psi_theta`` the embedding (flattened features before the classifier) of a *freshly
initialised* ConvNet every iteration (its parameters are not trained), ``A_w`` the siamese
DSA augmentation with the same ``w`` for the real and the synthetic batch of a class.
Defaults follow the official code (VICO-UoE/DatasetCondensation, main_DM.py): SGD on the
pixels with lr 1.0 and momentum 0.5, 256 real images per class per iteration, one optimiser
step per iteration after summing the per-class losses' gradients, 20k iterations (the
benchmark states the number it can afford). ``fyi=True`` gives DM+FYI (see fyi.py).
"""

from __future__ import annotations

import torch

from ..registry import CONDENSERS
from .base import MatchingCondenser, RealSampler


def dm_loss(f_real: torch.Tensor, f_syn: torch.Tensor) -> torch.Tensor:
    """``|| mean(f_real) - mean(f_syn) ||^2`` over the feature dimension (Eq. 4)."""
    return ((f_real.mean(0) - f_syn.mean(0)) ** 2).sum()


@CONDENSERS.register("dm", paper="Dataset Condensation with Distribution Matching", year=2023)
class DM(MatchingCondenser):
    name = "dm"

    def class_loss(self, net, f_real: torch.Tensor, f_syn: torch.Tensor) -> torch.Tensor:
        return dm_loss(f_real, f_syn)

    def begin_step(self, net: torch.nn.Module) -> None:
        """Hook for subclasses (NCFM draws its frequencies here)."""

    def backward(self, loss: torch.Tensor) -> None:
        """Gradient of the summed loss w.r.t. the pixels (NCFM adds its sampler's ascent)."""
        loss.backward()

    def step(self, real: RealSampler, it: int) -> dict[str, float]:
        net = self.new_net().train()
        net.requires_grad_(False)
        self.begin_step(net)
        self.opt_img.zero_grad(set_to_none=True)
        total = 0.0
        losses = []
        for c in range(self.num_classes):
            xr, xs = self.siamese(real.class_batch(c, self.batch_real), self.class_syn(c))
            with torch.no_grad():
                fr = net.embed(xr)
            loss = self.class_loss(net, fr, net.embed(xs))
            losses.append(loss)
            total += loss.item()
        loss = torch.stack(losses).sum()
        self.backward(loss)
        self.opt_img.step()
        return {"loss": total / self.num_classes}
