"""DC (gradient matching) and DSA (gradient matching with siamese augmentation).

Papers: Zhao, Mopuri & Bilen, "Dataset Condensation with Gradient Matching", ICLR 2021 (DC);
Zhao & Bilen, "Dataset Condensation with Differentiable Siamese Augmentation", ICML 2021 (DSA).

DC, Eq. (9)-(10) of the ICLR paper: for a freshly initialised network theta_0 (one per outer
iteration), repeat ``outer_loop`` times

    L = sum_c D( grad_theta CE(f_theta(A_w(S_c)), c), grad_theta CE(f_theta(A_w(T_c)), c) )
    S <- S - lr_img * grad_S L                       (SGD, momentum 0.5)
    theta <- ``inner_loop`` epochs of SGD (lr_net) on the current S   (not after the last)

with the layer-wise distance (Eq. 10) ``D = sum_layers sum_i (1 - cos(G^S_i, G^T_i))`` over the
output units ``i`` of each layer (conv kernels flattened to (out, in*k*k)); 1-D parameters
(biases, normalisation affine) are skipped, as in the official ``distance_wb``. DSA (Eq. 4 of
the ICML paper) is the same with ``A_w`` the siamese augmentation (same ``w`` for S_c and T_c)
and augmented inner-loop training; ``dc`` is the same class with ``dsa=False``.

Defaults follow the official code (VICO-UoE/DatasetCondensation, main.py / utils.get_loops):
lr_img 0.1, lr_net 0.01 (SGD, no momentum), 256 real images per class, ``(outer_loop,
inner_loop)`` = (1, 1) at IPC 1, (10, 50) at IPC 10, (50, 10) at IPC 50 (interpolated as in
``get_loops`` otherwise), 1000 outer iterations. The benchmark states the reduced loops it
can afford on a CPU. ``fyi=True`` matches the gradient of S_c ∪ hflip(S_c) (FYI, fyi.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import CONDENSERS
from .augment import DSA
from .base import MatchingCondenser, RealSampler


def official_loops(ipc: int) -> tuple[int, int]:
    """(outer_loop, inner_loop) of the official ``get_loops``."""
    table = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
    if ipc in table:
        return table[ipc]
    return (ipc, 10) if ipc > 50 else (max(1, ipc), 50 if ipc < 10 else 10)


def gradient_distance(g_syn, g_real) -> torch.Tensor:
    """Eq. (10): sum over layers of sum over output units of (1 - cosine)."""
    total = 0.0
    for gs, gr in zip(g_syn, g_real):
        if gs.dim() == 1:  # biases / norm parameters: skipped, as in the official distance_wb
            continue
        gs, gr = gs.reshape(gs.shape[0], -1), gr.reshape(gr.shape[0], -1)
        cos = (gs * gr).sum(-1) / (gs.norm(dim=-1) * gr.norm(dim=-1) + 1e-6)
        total = total + (1 - cos).sum()
    return torch.as_tensor(total)


@CONDENSERS.register("dc", paper="Dataset Condensation with Gradient Matching", year=2021)
class DC(MatchingCondenser):
    name = "dc"

    def __init__(
        self,
        *,
        dsa: bool = False,
        lr_img: float = 0.1,
        lr_net: float = 0.01,
        outer_loop: int | None = None,
        inner_loop: int | None = None,
        batch_train: int = 256,
        **kw,
    ):
        super().__init__(dsa=dsa, lr_img=lr_img, **kw)
        o, i = official_loops(self.ipc)
        self.outer_loop = outer_loop or o
        self.inner_loop = inner_loop if inner_loop is not None else i
        self.lr_net, self.batch_train = lr_net, batch_train
        self.train_aug = DSA(self.dsa_strategy, shared=False) if dsa else None

    def match(self, net, real: RealSampler) -> torch.Tensor:
        params = [p for p in net.parameters()]
        loss = 0.0
        for c in range(self.num_classes):
            xr, xs = self.siamese(real.class_batch(c, self.batch_real), self.class_syn(c))
            yr = torch.full((len(xr),), c, device=xr.device)
            ys = torch.full((len(xs),), c, device=xs.device)
            g_real = torch.autograd.grad(F.cross_entropy(net(xr), yr), params)
            g_real = [g.detach() for g in g_real]
            g_syn = torch.autograd.grad(F.cross_entropy(net(xs), ys), params, create_graph=True)
            loss = loss + gradient_distance(g_syn, g_real)
        return loss

    def train_net(self, net, opt) -> None:
        x, y = self.x_syn.detach(), self.y_syn
        for _ in range(self.inner_loop):  # one inner step = one epoch over S (official)
            order = torch.randperm(len(y), generator=self.gen).to(y.device)
            for b in range(0, len(y), self.batch_train):
                ids = order[b : b + self.batch_train]
                xb = x[ids] if self.train_aug is None else self.train_aug(x[ids], self.gen)
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(net(xb), y[ids]).backward()
                opt.step()

    def step(self, real: RealSampler, it: int) -> dict[str, float]:
        net = self.new_net().train()
        opt = torch.optim.SGD(net.parameters(), lr=self.lr_net)
        total = 0.0
        for ol in range(self.outer_loop):
            loss = self.match(net, real)
            self.opt_img.zero_grad(set_to_none=True)
            loss.backward(inputs=[self.x_syn])
            self.opt_img.step()
            total += loss.item()
            if ol == self.outer_loop - 1:
                break
            self.train_net(net, opt)
        return {"loss": total / (self.outer_loop * self.num_classes)}


@CONDENSERS.register(
    "dsa", paper="Dataset Condensation with Differentiable Siamese Augmentation", year=2021
)
class DSACondenser(DC):
    name = "dsa"

    def __init__(self, *, dsa: bool = True, **kw):
        super().__init__(dsa=dsa, **kw)
