"""The losses of GCP + SAD: spatial attention distilling and the BN-gamma sparsity penalty.

Paper: Chu et al., "Group channel pruning and spatial attention distilling for object
detection" (Applied Intelligence, 2022); official code chumingqian/
Model_Compression_For_YOLOV3-V4 (``utils/utils.py``: ``at``, ``compute_lost_group_AT``,
``compute_lost_group_AT_KD``; ``utils/prune_utils.py``: ``BNOptimizer.updateBN``).

``sad`` (Eq. of the SAD section; ``at`` + ``compute_lost_group_AT`` in the code): with the
spatial attention ``A(F) = normalise_L2( mean_c F_c^2 )`` flattened over positions,
``L = mean_{b, p} (A(F_t) - A(F_s))^2`` per tapped layer pair; the paper's total is
``sum_layers b_g * L`` with one weight per layer group, which here is each Term's weight
(the recipe sets them, see ``methods/gcp_sad.py``). Since ``A`` has unit norm, ``L =
(2 - 2 cos(A_s, A_t)) / (H W)`` averaged over the batch: the official b = 1e6 / 1e3 / 1e4 on
YOLOv4's large / small / middle maps grow with the map size for that reason. The form equals
``at`` with p = 2 (Zagoruyko & Komodakis), except that student and teacher maps must have the
same size (the paper distils a pruned copy into its unpruned self; no pooling is inferred).

``bn_l1`` (``updateBN``: ``grad += s * sign(gamma)`` after each backward, and its dynamic
variant ``grad -= 0.99 s sign(gamma) * kept``): the engine has no hook between backward and
the optimiser step, so the same gradient comes from a loss on the gammas themselves: the
student tap is :class:`crossdistill.prune.GammaTap` (the concatenated gammas of the BNs that
may be pruned) and ``L = sum_i c_i |gamma_i|``, whose gradient at weight ``s`` is exactly
``s c_i sign(gamma_i)`` (``d|x|/dx = sign(x)``, 0 at 0, as ``torch.sign``). ``c_i = kept``
for the channels among the top ``keep`` fraction by |gamma| of their segment (a pruning
group: ``segments`` lists each group's channel count in tap order), ``rest`` for the others;
the default (1, 1) is the plain penalty. Dynamic sparse training adds a second ``bn_l1`` term
from 40 % of the epochs on (the Term's ``begin``) with ``keep=0.65, kept=-0.99, rest=0``: the
kept 65 % then feel 1 % of the penalty. Being a loss, it is exact under gradient
accumulation (once per optimiser step), loss scaling and DDP averaging, and the 40 % switch
is a function of the epoch, so a resumed run continues it exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..registry import LOSSES
from ..schema import Prob
from .features import _pair

PAPER = "Group channel pruning and spatial attention distilling for object detection"
YEAR = 2022


def spatial_attention(f: Tensor) -> Tensor:
    """``A(F) = normalise_L2(mean_c F^2)`` flattened: (B, C, H, W) -> (B, H*W)."""
    return F.normalize(f.pow(2).mean(dim=1).flatten(1), dim=1)


@LOSSES.register("sad", paper=PAPER, year=YEAR, inputs="features", default_weight=1.0)
def sad(s: Tensor, t: Tensor) -> Tensor:
    """Spatial attention distilling for one layer pair (module doc): ``mean_{b,p} (A(F_t) -
    A(F_s))^2`` of (B, C, H, W) maps of one spatial size (channel counts may differ)."""
    if s.dim() != 4 or t.dim() != 4 or s.shape[0] != t.shape[0] or s.shape[-2:] != t.shape[-2:]:
        raise ConfigError("sad.inputs", f"student {tuple(s.shape)} vs teacher {tuple(t.shape)}",
                          "(B, C, H, W) maps of the same batch and spatial size (channels may "
                          "differ)")
    s, t = _pair(s, t)
    return (spatial_attention(t) - spatial_attention(s)).pow(2).mean()


def _coefficients(g: Tensor, segments: list[int] | None, keep: float, kept: float,
                  rest: float) -> Tensor:
    if keep >= 1.0 or kept == rest:
        return torch.full_like(g, kept)
    sizes = list(segments) if segments else [g.numel()]
    if sum(sizes) != g.numel() or any(n < 1 for n in sizes):
        raise ConfigError("bn_l1.segments", sizes, f"positive channel counts summing to the "
                          f"tapped gammas ({g.numel()})")
    c = torch.full_like(g, rest)
    for part, idx in zip(g.detach().abs().split(sizes), torch.arange(g.numel(),
                                                                     device=g.device).split(sizes)):
        k = int(round(keep * part.numel()))
        if k:
            c[idx[part.topk(k).indices]] = kept
    return c


@LOSSES.register("bn_l1", paper=PAPER, year=YEAR, inputs="BN gammas (prune.GammaTap)",
                 default_weight=0.001)
def bn_l1(s: Tensor, t: Tensor | None = None, *, segments: list[int] | None = None,
          keep: Prob = 1.0, kept: float = 1.0, rest: float = 1.0) -> Tensor:
    """``sum_i c_i |gamma_i|`` over the tapped gammas (module doc); the term weight is the
    sparsity rate ``s`` (the paper: 0.001-0.005)."""
    for name, v in (("kept", kept), ("rest", rest)):
        if not -1.0 <= v <= 1.0:
            raise ConfigError(f"bn_l1.{name}", v, "a coefficient in [-1, 1]")
    g = s.reshape(-1)
    c = _coefficients(g, segments, float(keep), float(kept), float(rest))
    return (c * g.abs()).sum()
