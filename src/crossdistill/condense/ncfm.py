"""NCFM: neural characteristic function matching, with its min-max sampling network.

Paper: Wang, Yang, Hu, et al., "Dataset Distillation with Neural Characteristic Function: A
Minmax Perspective", CVPR 2025. The discrepancy (their NCFD, Eq. 7-9) between the real and
synthetic feature distributions of a class, for frequencies ``t ~ p_psi``:

    phi_X(t) = mean_x exp(i <t, f(x)>)                          (empirical CF)
    d(t)     = sqrt( alpha * (|phi_R| - |phi_S|)^2
                     + (1 - alpha) * 2 * (|phi_R||phi_S| - Re phi_R Re phi_S - Im phi_R Im phi_S) )
    NCFD     = scale * mean_t d(t)

features ``f`` L2-normalised per sample, ``alpha = 0.5``, ``scale = 300``, 4096 frequencies
(official code: gszfwsb/NCFM, NCFM/NCFM.py). The phase term is clamped at 1e-12 before the
square root, as in the official code. ``min_S max_psi NCFD``: the sampling network
(``SamplingNet``: 3 x [Linear, BatchNorm1d, LeakyReLU(0.2)] with Tanh last, fed Gaussian noise;
``num_freqs / t_repeat`` distinct rows, each repeated ``t_repeat`` = 16 times, as in
NCFM/SampleNet.py) is trained by gradient *ascent* on the same loss (Adam, lr 1e-3).

Deviations / choices, all deliberate:
- The official min-max step calls ``loss.backward()`` then ``(-loss).backward()`` on the same
  graph, so the sampling network's accumulated gradient is exactly zero and it never learns
  (its images get the right gradient). Here the sampling network's gradient is taken with
  ``autograd.grad`` and negated, so it really ascends. ``sampling_net=False`` draws
  ``t ~ N(0, I)`` every iteration instead.
- "All else fixed" against DM: the feature extractor is a freshly initialised ConvNet each
  iteration exactly like DM (the official code samples from a pool of briefly trained
  models and adds a calibration CE term with a trained model; neither is used here), the same
  DSA, the same real batch and iteration count. The pixel optimiser is NCFM's own (Adam,
  lr 0.01; the official config uses AdamW lr 0.01).
- One image step per iteration over all classes (official: one step per class), as in DM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..registry import CONDENSERS
from .dm import DM


def ncfd(
    f_real: torch.Tensor,
    f_syn: torch.Tensor,
    t: torch.Tensor,
    *,
    alpha: float = 0.5,
    scale: float = 300.0,
    normalize: bool = True,
) -> torch.Tensor:
    """Neural characteristic function discrepancy between two feature sets ``(N, D)``,
    ``(M, D)`` at frequencies ``t`` ``(T, D)`` (Eq. above; scalar)."""
    if normalize:
        f_real, f_syn = F.normalize(f_real, dim=1), F.normalize(f_syn, dim=1)
    ar, as_ = t @ f_real.t(), t @ f_syn.t()  # (T, N), (T, M)
    re_r, im_r = ar.cos().mean(1), ar.sin().mean(1)
    re_s, im_s = as_.cos().mean(1), as_.sin().mean(1)
    n_r = (re_r**2 + im_r**2).sqrt()
    n_s = (re_s**2 + im_s**2).sqrt()
    amp = (n_r - n_s) ** 2
    pha = (2 * (n_r * n_s - re_r * re_s - im_r * im_s)).clamp(min=1e-12)
    return scale * (alpha * amp + (1 - alpha) * pha).sqrt().mean()


class SamplingNet(nn.Module):
    """Learned frequency sampler ``p_psi`` of NCFM (noise -> 3-layer MLP -> Tanh)."""

    def __init__(self, dim: int, num_freqs: int = 4096, t_repeat: int = 16, t_var: float = 1.0):
        super().__init__()
        self.dim, self.num_freqs, self.t_repeat, self.t_var = dim, num_freqs, t_repeat, t_var
        self.rows = max(1, -(-num_freqs // t_repeat))
        layers: list[nn.Module] = []
        for i in range(3):
            layers += [
                nn.Linear(dim, dim),
                nn.BatchNorm1d(dim),
                nn.LeakyReLU(0.2) if i < 2 else nn.Tanh(),
            ]
        self.net = nn.Sequential(*layers)

    def forward(self, gen: torch.Generator) -> torch.Tensor:
        z = torch.randn(self.rows, self.dim, generator=gen) * self.t_var**0.5
        z = z.to(next(self.parameters()).device)
        return self.net(z).repeat(self.t_repeat, 1)[: self.num_freqs]


@CONDENSERS.register(
    "ncfm",
    paper="Dataset Distillation with Neural Characteristic Function: A Minmax Perspective",
    year=2025,
)
class NCFM(DM):
    name = "ncfm"
    optimizer_img = "adam"

    def __init__(
        self,
        *,
        num_freqs: int = 4096,
        alpha: float = 0.5,
        scale: float = 300.0,
        sampling_net: bool = True,
        lr_sampling_net: float = 1e-3,
        t_repeat: int = 16,
        lr_img: float = 0.01,
        **kw,
    ):
        super().__init__(lr_img=lr_img, **kw)
        if num_freqs < 1:
            raise ConfigError("condense.num_freqs", num_freqs, "must be >= 1")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError("condense.alpha", alpha, "must be in [0, 1]")
        self.num_freqs, self.alpha, self.scale = num_freqs, alpha, scale
        self.use_sampling_net, self.lr_sampling_net, self.t_repeat = (
            sampling_net,
            lr_sampling_net,
            t_repeat,
        )
        self.sampler: SamplingNet | None = None
        self.t: torch.Tensor | None = None

    def begin_step(self, net: nn.Module) -> None:
        if self.sampler is None and self.use_sampling_net:
            with torch.no_grad():
                dim = net.embed(torch.zeros(1, *self.input_shape, device=self.device)).shape[1]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed + 77)
                self.sampler = SamplingNet(dim, self.num_freqs, self.t_repeat).to(self.device)
            self.opt_sampler = torch.optim.Adam(self.sampler.parameters(), lr=self.lr_sampling_net)
        if self.sampler is not None:
            self.sampler.train()
            self.t = self.sampler(self.gen)
        else:
            with torch.no_grad():
                dim = net.embed(torch.zeros(1, *self.input_shape, device=self.device)).shape[1]
            self.t = torch.randn(self.num_freqs, dim, generator=self.gen).to(self.device)

    def class_loss(self, net, f_real, f_syn):
        return ncfd(f_real, f_syn, self.t, alpha=self.alpha, scale=self.scale)

    def backward(self, loss: torch.Tensor) -> None:
        if self.sampler is None:
            loss.backward()
            return
        params = list(self.sampler.parameters())
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        loss.backward(inputs=[self.x_syn])
        self.opt_sampler.zero_grad(set_to_none=True)
        for p, g in zip(params, grads):
            if g is not None:
                p.grad = -g.detach()  # ascent: the sampler maximises the discrepancy
        self.opt_sampler.step()
