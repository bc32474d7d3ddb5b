"""Disentangling losses: align the *shared* parts of paired views, keep the shared and
*private* parts apart, and bound the information one latent carries about another.

* ``info_nce``: contrastive alignment of paired embeddings within a batch (CroDiNo-KD's
  shared-part alignment). CRD's ``_info_nce`` in ``losses/contrastive.py`` scores one anchor
  against memory-bank keys; this one contrasts two live batches, so it is separate.
* ``orthogonality`` / ``cross_correlation``: shared vs private parts -> 0 (CroDiNo-KD).
* ``vae_kl``, ``gaussian_loglik``, ``club_bound`` and :class:`ClubEstimator`: the VAE prior
  term and the CLUB mutual-information upper bound (MRDD's distilled disentangling).

All act on the last dimension; rows are every leading position (flattened), so a per-patch
use passes (B, P, D).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import LOSSES
from ..schema import NonNeg, Temperature, Width
from .features import _no_autocast, _upcast


def _two(name: str, s, t) -> tuple[Tensor, Tensor, bool]:
    """(a, b, b_is_teacher): ``s=[a, b]`` (two student taps) or ``s=a, t=b`` (a teacher tap,
    treated as a constant)."""
    if isinstance(s, (list, tuple)):
        if len(s) != 2 or t not in (None, [], ()):
            raise ConfigError(f"{name}.student", len(s), "two student taps and no teacher tap")
        a, b, teacher = s[0], s[1], False
    else:
        if t is None:
            raise ConfigError(f"{name}.teacher", None, "a teacher tap, or two student taps")
        a, b, teacher = s, t, True
    if a.dim() < 2 or b.dim() < 2 or a.shape[:-1] != b.shape[:-1]:
        raise ConfigError(
            f"{name}.inputs", f"{tuple(a.shape)} vs {tuple(b.shape)}",
            "two (..., D) tensors with the same leading dims",
        )
    a, b = _upcast(a), _upcast(b)
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), (b.detach() if teacher else b).to(dtype), teacher


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


@LOSSES.register(
    "info_nce",
    paper="Representation Learning with Contrastive Predictive Coding",
    year=2018,
    inputs="embeddings",
    default_weight=1.0,
)
def info_nce(s, t=None, *, temperature: Temperature = 0.1, symmetric: bool = True) -> Tensor:
    """InfoNCE between paired embeddings (van den Oord et al., 2018, Eq. 4), in the symmetric
    two-batch form of CLIP: with unit rows ``a_i``, ``b_j`` and ``S_ij = <a_i, b_j> / tau``,
    ``l_i = 1/2 [ -log softmax_j(S_i.)_i - log softmax_j(S_.i)_i ]`` (row i's positive is
    column i: the same sample in the other view; every other row is a negative).
    ``symmetric=False`` keeps only the a -> b direction.

    ``s=[a, b]`` (two student taps: both sides learn) or ``s=a, t=b`` (b a constant).
    Shapes (..., D_a), (..., D_b) with D_a == D_b; all leading positions are contrasted with
    each other. Returns one value per position.
    """
    a, b, _ = _two("info_nce", s, t)
    if a.shape != b.shape:
        raise ConfigError(
            "info_nce.inputs", f"{tuple(a.shape)} vs {tuple(b.shape)}", "equal embedding sizes"
        )
    lead = a.shape[:-1]
    with _no_autocast(a):
        logits = F.normalize(_rows(a), dim=-1) @ F.normalize(_rows(b), dim=-1).T / temperature
    target = torch.arange(logits.shape[0], device=logits.device)
    loss = F.cross_entropy(logits, target, reduction="none")
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.T, target, reduction="none"))
    return loss.reshape(lead)


def _check_rows(name: str, a: Tensor) -> None:
    if a.shape[0] < 2:
        raise ConfigError(f"{name}.inputs", tuple(a.shape), "a batch of two or more rows")


@LOSSES.register(
    "orthogonality",
    paper="Domain Separation Networks (soft subspace orthogonality)",
    year=2016,
    inputs="embeddings",
    default_weight=1.0,
)
def orthogonality(s, t=None) -> Tensor:
    """Soft subspace orthogonality of shared and private parts (Bousmalis et al., "Domain
    Separation Networks", NeurIPS 2016, Eq. 3, as their code normalises it): over the N rows
    (every leading position), centre each part's columns, L2-normalise each row, and
    ``L = mean_{jk} ( (Z_s^T Z_p)_{jk} / N )^2`` -- 0 when the two parts span orthogonal
    subspaces across the batch. (DSN sums the squared entries of ``H_s^T H_p``; the mean and
    the 1/N only fix the scale, independent of the batch size and the widths.)

    ``s=[shared, private]`` (..., D_s), (..., D_p). Returns a scalar.
    """
    a, b, _ = _two("orthogonality", s, t)
    a, b = _rows(a), _rows(b)
    _check_rows("orthogonality", a)
    za = F.normalize(a - a.mean(0, keepdim=True), dim=-1)
    zb = F.normalize(b - b.mean(0, keepdim=True), dim=-1)
    with _no_autocast(za):
        return ((za.T @ zb) / a.shape[0]).pow(2).mean()


@LOSSES.register(
    "cross_correlation",
    paper="Barlow Twins: Self-Supervised Learning via Redundancy Reduction (cross-correlation "
    "matrix; driven to zero between shared and private parts)",
    year=2021,
    inputs="embeddings",
    default_weight=1.0,
)
def cross_correlation(s, t=None, *, eps: float = 1e-5) -> Tensor:
    """Decorrelation of shared and private parts: the cross-correlation matrix of Barlow
    Twins (Zbontar et al., ICML 2021, Eq. 2) between the batch-standardised parts,
    ``C_jk = 1/N sum_n zs_nj zp_nk`` (``z`` = column minus its batch mean, over its biased
    batch std + eps), and ``L = mean_{jk} C_jk^2`` in [0, 1]: 0 when no shared feature is
    linearly correlated with any private one. Barlow Twins pushes C to the identity between
    two views; here every entry goes to 0 (our use, CroDiNo-KD's "disentangling" term).

    ``s=[shared, private]`` (..., D_s), (..., D_p). Returns a scalar.
    """
    a, b, _ = _two("cross_correlation", s, t)
    a, b = _rows(a), _rows(b)
    _check_rows("cross_correlation", a)
    za = (a - a.mean(0)) / (a.std(0, unbiased=False) + eps)
    zb = (b - b.mean(0)) / (b.std(0, unbiased=False) + eps)
    with _no_autocast(za):
        return ((za.T @ zb) / a.shape[0]).pow(2).mean()


# --------------------------------------------------------------------------------------
# VAE and CLUB (MRDD)
# --------------------------------------------------------------------------------------
def vae_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """``KL(N(mu, diag(exp(logvar))) || N(0, I)) = 1/2 sum_d (exp(logvar) + mu^2 - 1 - logvar)``
    (Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014, Appendix B), one value
    per position (..., D) -> (...)."""
    return 0.5 * (logvar.exp() + mu.pow(2) - 1.0 - logvar).sum(-1)


def gaussian_loglik(mu: Tensor, logvar: Tensor, c: Tensor) -> Tensor:
    """``log N(c; mu, diag(exp(logvar)))`` summed over the last dim, with its constant
    (the CLUB code's ``loglikeli`` drops the 1/2 and the constant: same maximiser)."""
    return -0.5 * ((c - mu).pow(2) / logvar.exp() + logvar + math.log(2 * math.pi)).sum(-1)


def club_bound(mu: Tensor, logvar: Tensor, c: Tensor) -> Tensor:
    """The CLUB estimate of ``I(v; c)`` (Cheng et al., "CLUB: A Contrastive Log-ratio Upper
    Bound of Mutual Information", ICML 2020, Eq. 11) from ``q(c | v_i) = N(mu_i, sigma_i^2)``:
    per row ``log q(c_i | v_i) - 1/N sum_j log q(c_j | v_i)`` (the positive pair against
    every c of the batch; ``logvar`` and the constant cancel). Shapes (N, D) -> (N,); its
    mean is the bound an encoder of v minimises."""
    var = logvar.exp()
    pos = -(c - mu).pow(2) / (2 * var)
    neg = -(c.unsqueeze(0) - mu.unsqueeze(1)).pow(2).mean(1) / (2 * var)
    return (pos - neg).sum(-1)


class ClubEstimator(nn.Module):
    """The variational ``q(c | v)`` of CLUB: a diagonal Gaussian whose mean and log-variance
    are two small MLPs of v (hidden ``hidden // 2`` and a tanh on the log-variance, as the
    CLUB and MRDD code build it).

    The two roles never share a gradient: :meth:`learning_loss` fits q by maximum
    likelihood on ``sg(v)`` (only q's parameters move: its own optimiser step), and
    :meth:`bound` is the CLUB upper bound with q's parameters held constant (only v's encoder
    moves). Official MRDD (Guanzhou-Ke/MRDD ``src/models/mrdd.py``, ``get_loss``) returns
    just ``lam * -log q(c | v)`` and steps encoder and q together, so the encoder learns to
    make c *more* predictable from v; :class:`~crossdistill.methods.mrdd.MRDD` uses the two
    steps of the paper instead.
    """

    def __init__(self, v_dim: Width, c_dim: Width, hidden: Width = 100):
        super().__init__()
        for field, value in (("v_dim", v_dim), ("c_dim", c_dim), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"club.{field}", value, "a positive integer")
        h = max(hidden // 2, 1)
        self.p_mu = nn.Sequential(nn.Linear(v_dim, h), nn.ReLU(), nn.Linear(h, c_dim))
        self.p_logvar = nn.Sequential(
            nn.Linear(v_dim, h), nn.ReLU(), nn.Linear(h, c_dim), nn.Tanh()
        )

    def forward(self, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.p_mu(v), self.p_logvar(v)

    def learning_loss(self, v: Tensor, c: Tensor) -> Tensor:
        """``-1/N sum_i log q(c_i | v_i)`` on detached inputs: the estimator's own objective."""
        mu, logvar = self(v.detach())
        return -gaussian_loglik(mu, logvar, c.detach()).mean()

    def bound(self, v: Tensor, c: Tensor) -> Tensor:
        """The CLUB bound (mean over the batch) with q frozen: gradients reach v only."""
        frozen = {k: p.detach() for k, p in self.named_parameters()}
        mu, logvar = torch.func.functional_call(self, frozen, (v,))
        return club_bound(mu, logvar, c.detach()).mean()


# --------------------------------------------------------------------------------------
# CroDiNo-KD: shared/private split heads + alignment + disentangling
# --------------------------------------------------------------------------------------
SPLITS = ("head", "channels")
DISENTANGLERS = {"correlation": cross_correlation, "orthogonal": orthogonality}


@LOSSES.register(
    "crodino",
    paper="Revisiting Cross-Modal Knowledge Distillation: A Disentanglement Approach for "
    "RGBD Semantic Segmentation (CroDiNo-KD)",
    year=2025,
    inputs="embeddings",
    default_weight=1.0,
    stateful=True,
)
class CroDiNoLoss(nn.Module):
    """CroDiNo-KD's representation terms (Ferrod et al., ECML-PKDD 2025) over M >= 2 co-trained
    unimodal networks, for a multi-tap term ``[e_1, ..., e_M]`` of their embeddings:

    ``L = nce_weight * mean_{m<n} InfoNCE(s_m, s_n) + disentangle_weight * mean_m D(s_m, p_m)``

    where ``(s_m, p_m)`` are member m's shared and private parts and ``D`` is
    ``cross_correlation`` (``disentangle="correlation"``, the default) or DSN's
    ``orthogonality``. No official code was found; the split, the choice of D and the weights
    are ours (inference from the abstract). ``split="head"`` (default): a trainable
    ``Linear(D_m, shared_dim + private_dim)`` per member, chunked; the heads live in this loss
    module, so they train with the members and are never exported (each member stays a plain
    model). ``split="channels"``: the first ``shared_dim`` channels of the embedding are the
    shared part and the rest private (no parameters; the classifier reads both parts).
    ``private_dim`` defaults to ``shared_dim``. :attr:`last` holds the two parts' values of
    the last call (detached), for logging.
    """

    def __init__(
        self,
        s_shapes,
        t_shapes=None,
        *,
        num_samples=None,
        shared_dim: Width = 32,
        private_dim: Width | None = None,
        split: str = "head",
        temperature: Temperature = 0.1,
        nce_weight: NonNeg = 1.0,
        disentangle_weight: NonNeg = 1.0,
        disentangle: str = "correlation",
    ):
        super().__init__()
        ok = isinstance(s_shapes, (list, tuple)) and len(s_shapes) >= 2
        if not ok or not all(isinstance(x, (list, tuple)) for x in s_shapes):
            raise ConfigError(
                "crodino.student", s_shapes, "a list of two or more embedding taps, one per member"
            )
        if split not in SPLITS:
            raise ConfigError("crodino.split", split, f"one of {', '.join(SPLITS)}")
        if disentangle not in DISENTANGLERS:
            raise ConfigError(
                "crodino.disentangle", disentangle, f"one of {', '.join(DISENTANGLERS)}"
            )
        for field, w in (("nce_weight", nce_weight), ("disentangle_weight", disentangle_weight)):
            if not (isinstance(w, (int, float)) and 0 <= w < math.inf):
                raise ConfigError(f"crodino.{field}", w, "a number >= 0")
        dims = [math.prod(int(d) for d in shape[1:]) for shape in s_shapes]
        self.shared_dim = int(shared_dim)
        self.private_dim = int(private_dim or shared_dim)
        if split == "channels" and min(dims) <= self.shared_dim:
            raise ConfigError(
                "crodino.shared_dim", shared_dim,
                f"fewer than every member's embedding size {dims} (split: channels)",
            )
        self.split, self.temperature = split, float(temperature)
        self.nce_weight, self.disentangle_weight = float(nce_weight), float(disentangle_weight)
        self.disentangle = DISENTANGLERS[disentangle]
        self.dims = dims
        self.heads = nn.ModuleList(
            [nn.Linear(d, self.shared_dim + self.private_dim) for d in dims]
            if split == "head" else []
        )
        self.last: dict[str, float] = {}

    def parts(self, m: int, e: Tensor) -> tuple[Tensor, Tensor]:
        """Member m's (shared, private) parts of its embedding ``e`` (B, ...)."""
        e = e.reshape(e.shape[0], -1)
        if e.shape[1] != self.dims[m]:
            raise ConfigError(
                f"crodino.student.{m}", tuple(e.shape), f"(B, {self.dims[m]}) after flattening"
            )
        if self.split == "head":
            z = self.heads[m](e.to(self.heads[m].weight.dtype))
            return z[:, : self.shared_dim], z[:, self.shared_dim :]
        return e[:, : self.shared_dim], e[:, self.shared_dim :]

    def forward(self, s, t=None, **_) -> Tensor:
        if len(s) != len(self.dims):
            raise ConfigError("crodino.student", len(s), f"{len(self.dims)} embedding taps")
        parts = [self.parts(m, e) for m, e in enumerate(s)]
        pairs = [(m, n) for m in range(len(parts)) for n in range(m + 1, len(parts))]
        nce = sum(
            info_nce([parts[m][0], parts[n][0]], temperature=self.temperature).mean()
            for m, n in pairs
        ) / len(pairs)
        dis = sum(self.disentangle([sh, pr]) for sh, pr in parts) / len(parts)
        self.last = {"nce": float(nce.detach()), "disentangle": float(dis.detach())}
        return self.nce_weight * nce + self.disentangle_weight * dis
