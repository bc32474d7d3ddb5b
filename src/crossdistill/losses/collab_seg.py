"""The dense (segmentation) losses of CNN-Transformer collaborative learning.

Paper: Zhu et al., "A Good Student is Cooperative and Reliable: CNN-Transformer Collaborative
Learning for Semantic Segmentation", ICCV 2023. No official code was found; the forms below
follow methods/dense.md and the abstract, and every detail the paper's text does not fix is
marked as our inference. The classification recast of the same method (per-sample BSD,
region heads, HFD with "auto" projectors, DML) lives in ``losses/hetero.py``; what is the
same maths is reused from there (the lower-CE peer selection, HFD's two-way detached MSE)
and every KL is :func:`crossdistill.losses.divergences.kl`.

Logits enter class-last, ``(B, H, W, K)`` (the collaborative-pair recipes tap each member's
logits after moving the class axis last); label maps are ``(B, H, W)`` with -100 for void
pixels. ``T`` is the distillation temperature; selection always uses the T = 1 predictions.

* ``bsd_pixel`` (pixel-wise BSD): at pixel p, A teaches B where A predicts the true class and
  (``compare=True``, the default) A's true-class probability beats B's; B teaches A likewise:
  ``l_p = T^2 [ 1[argmax z_a = y, p_a(y) > p_b(y)] KL(sg p_a^T || p_b^T)
  + 1[argmax z_b = y, p_b(y) > p_a(y)] KL(sg p_b^T || p_a^T) ]``, averaged over labelled
  pixels. With ``compare=False`` both correct peers teach each other there (the comparison
  is the "optionally" of methods.md; which one the paper uses is not stated: inference).
* ``bsd_region_map`` (region-wise BSD on logits): the map is split into ``grid x grid``
  regions (region of row h: ``floor(h * grid / H)``, same for columns); in region r of
  sample i the peer with the lower mean CE over r's labelled pixels teaches the other at
  every pixel of r: ``l_p = T^2 [ 1[CE^a_ir < CE^b_ir] KL(sg p_a^T || p_b^T) + (a <-> b) ]``,
  averaged over labelled pixels (a region without labelled pixels, or a tie, transfers
  nothing).
* ``bsd_region_feat`` (stateful; region-wise BSD on decoder features): the same region
  selection, but the pupil's projected feature regresses the teacher's detached feature
  (MSE) in the regions the other peer won: ``L = mean_{q in grid_b} 1[b wins r(q)]
  mean_c (P_ab(F_a) - sg F_b)^2 + mean_{q in grid_a} 1[a wins r(q)] mean_c (P_ba(F_b) -
  sg F_a)^2``. Projectors: 1x1 conv + BN resized to the other's grid (tokens first reshaped
  to their square map); they train with the pair.
* ``hfd_map`` (stateful; HFD for maps): :class:`~crossdistill.losses.hetero.HFDLoss` (the
  same two-way MSE with detached targets) with the bridges methods/dense.md names: CNN -> ViT a conv
  patchify (kernel = stride = the size ratio, i.e. a linear map of each patch, as a ViT's
  patch embedding) to the transformer's tokens; ViT -> CNN the tokens reshaped to their map,
  1x1 conv (+ BN) and bilinear upsampling to the CNN map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import projectors as P
from ..errors import ConfigError
from ..registry import LOSSES
from ..schema import Depth, Temperature
from .divergences import kl
from .features import _upcast
from .hetero import HFDLoss, _selection
from .logits import _check_logits, _check_temperature

PAPER = ("A Good Student is Cooperative and Reliable: CNN-Transformer Collaborative Learning "
         "for Semantic Segmentation")


# -- shared pieces -----------------------------------------------------------------------------
def _two(name: str, s, what: str = "class-last logits of model A and of model B") -> tuple:
    if not isinstance(s, (list, tuple)) or len(s) != 2:
        raise ConfigError(f"{name}.student", s if not isinstance(s, Tensor) else
                          tuple(s.shape), f"a list of two taps: the {what}")
    return s[0], s[1]


def _check_labels(name: str, z: Tensor, y: Tensor | None) -> Tensor:
    if y is None or tuple(y.shape) != tuple(z.shape[:-1]):
        raise ConfigError(f"{name}.y", None if y is None else tuple(y.shape),
                          f"a label map of shape {tuple(z.shape[:-1])} (-100: void pixel)")
    return y.long()


def _check_grid(name: str, grid, h: int, w: int) -> int:
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1 or grid > min(h, w):
        raise ConfigError(f"{name}.grid", grid, f"an integer in 1..{min(h, w)} (regions per "
                          f"side of a {h}x{w} map)")
    return grid


def log_probs(a: Tensor, b: Tensor, temperature: float) -> tuple[Tensor, ...]:
    """``(log p_a, log p_b, log p_a^T, log p_b^T)`` of two logits (the T = 1 pair is reused
    at T = 1: per-pixel softmaxes dominate these losses' cost)."""
    la, lb = F.log_softmax(a, -1), F.log_softmax(b, -1)
    if float(temperature) == 1.0:
        return la, lb, la, lb
    T = float(temperature)
    return la, lb, F.log_softmax(a / T, -1), F.log_softmax(b / T, -1)


def mutual_kl(la: Tensor, lb: Tensor, a_teaches: Tensor, b_teaches: Tensor,
              temperature: float) -> Tensor:
    """``T^2 [ a_teaches KL(sg p_a || p_b) + b_teaches KL(sg p_b || p_a) ]`` per position,
    for (..., K) log-probabilities at temperature T and (...) float masks."""
    T = float(temperature)
    return (a_teaches * kl(la.detach(), lb) + b_teaches * kl(lb.detach(), la)) * (T * T)


def region_index(h: int, w: int, grid: int, device=None) -> Tensor:
    """(h, w) long map: the row-major id of each position's region among ``grid x grid``;
    row ``i`` lies in region row ``floor(i * grid / h)`` (columns alike), so any map of any
    size is split the same way in relative coordinates."""
    rows = torch.arange(h, device=device) * grid // h
    cols = torch.arange(w, device=device) * grid // w
    return rows[:, None] * grid + cols[None, :]


@torch.no_grad()
def region_selection(la: Tensor, lb: Tensor, y: Tensor, grid: int) -> tuple[Tensor, Tensor]:
    """Which peer teaches each region: ``(a_wins, b_wins)``, float (B, grid * grid), from the
    class-last T = 1 log-probabilities (B, H, W, K) and labels (B, H, W). A peer wins a
    region when its summed (equivalently, mean) CE over the region's labelled pixels is the
    lower; a region with no labelled pixel, or a tie, is won by neither."""
    b, h, w, _ = la.shape
    lab = y != -100
    yy = y.clamp_min(0).unsqueeze(-1)
    ce_a = -la.gather(-1, yy)[..., 0] * lab
    ce_b = -lb.gather(-1, yy)[..., 0] * lab
    rid = region_index(h, w, grid, la.device).flatten().expand(b, -1)
    r = grid * grid

    def per_region(v: Tensor) -> Tensor:
        return v.new_zeros(b, r).scatter_add_(1, rid, v.flatten(1).to(v.dtype))

    sa, sb, n = per_region(ce_a), per_region(ce_b), per_region(lab.to(la.dtype))
    has = n > 0
    return (has & (sa < sb)).to(la.dtype), (has & (sb < sa)).to(la.dtype)


def at_positions(region_mask: Tensor, h: int, w: int, grid: int) -> Tensor:
    """(B, grid * grid) per-region values -> (B, h, w) per position of an ``h x w`` map."""
    rid = region_index(h, w, grid, region_mask.device).flatten().expand(len(region_mask), -1)
    return region_mask.gather(1, rid).view(-1, h, w)


# -- pixel-wise BSD ----------------------------------------------------------------------------
@LOSSES.register("bsd_pixel", paper=PAPER + " (pixel-wise BSD)", year=2023, inputs="logits",
                 default_weight=1.0)
def bsd_pixel(s, t=None, *, y: Tensor, temperature: Temperature = 1.0,
              compare: bool = True) -> Tensor:
    """Pixel-wise bidirectional selective distillation (module doc): at each labelled pixel
    the peer that predicts the true class (and, ``compare=True``, gives it the higher
    probability) teaches the other, ``KL_T`` with the teacher side detached, ``T^2``-scaled.

    ``s``: ``[z_a, z_b]`` two class-last (..., K) logits; ``y`` (...) labels, -100 void
    (value 0 there; the Term averages over the labelled pixels). Returns (...) values.
    """
    a, b = _two("bsd_pixel", s)
    _check_logits("bsd_pixel", a, b)
    _check_temperature("bsd_pixel", temperature)
    if not isinstance(compare, bool):
        raise ConfigError("bsd_pixel.compare", compare, "true or false")
    a, b = _upcast(a), _upcast(b)
    y = _check_labels("bsd_pixel", a, y)
    la, lb, la_t, lb_t = log_probs(a, b, temperature)
    with torch.no_grad():
        lab = y != -100
        a_right = (a.argmax(-1) == y) & lab
        b_right = (b.argmax(-1) == y) & lab
        if compare:  # hetero's lower-CE selection (= higher true-class probability)
            a_better, b_better = _selection(la.detach(), lb.detach(), y)
            a_right, b_right = a_right & (a_better > 0), b_right & (b_better > 0)
    return mutual_kl(la_t, lb_t, a_right.to(a.dtype), b_right.to(a.dtype), temperature)


# -- region-wise BSD, logits -----------------------------------------------------------------
@LOSSES.register("bsd_region_map", paper=PAPER + " (region-wise BSD)", year=2023,
                 inputs="logits", default_weight=1.0)
def bsd_region_map(s, t=None, *, y: Tensor, grid: Depth = 4,
                   temperature: Temperature = 1.0) -> Tensor:
    """Region-wise bidirectional selective distillation on dense logits (module doc): per
    ``grid x grid`` region the peer with the lower CE on the region's labelled pixels teaches
    the other at each of its pixels (``KL_T``, teacher detached, ``T^2``-scaled).

    ``s``: ``[z_a, z_b]`` two class-last (B, H, W, K) logits; ``y`` (B, H, W) labels, -100
    void (value 0; the Term averages over labelled pixels). Returns (B, H, W) values.
    """
    a, b = _two("bsd_region_map", s)
    _check_logits("bsd_region_map", a, b)
    if a.dim() != 4:
        raise ConfigError("bsd_region_map.inputs", tuple(a.shape),
                          "class-last (B, H, W, K) logit maps")
    _check_temperature("bsd_region_map", temperature)
    a, b = _upcast(a), _upcast(b)
    y = _check_labels("bsd_region_map", a, y)
    h, w = a.shape[1:3]
    grid = _check_grid("bsd_region_map", grid, h, w)
    la, lb, la_t, lb_t = log_probs(a, b, temperature)
    a_wins, b_wins = region_selection(la.detach(), lb.detach(), y, grid)
    lab = (y != -100).to(a.dtype)
    a_t, b_t = (at_positions(m, h, w, grid) * lab for m in (a_wins, b_wins))
    return mutual_kl(la_t, lb_t, a_t, b_t, temperature)


# -- region-wise BSD, features ---------------------------------------------------------------
def _as_map_shape(shape: tuple, field: str) -> tuple:
    if len(shape) == 3:
        return shape
    if len(shape) == 2 and P.grid_of(shape[0]) is not None and not P.grid_of(shape[0])[1]:
        side = P.grid_of(shape[0])[0]
        return (shape[1], side, side)
    raise ConfigError(field, shape, "a (C, H, W) map or (N, D) tokens on a square grid "
                      "(no cls token)")


def _as_map(x: Tensor) -> Tensor:
    return x if x.dim() == 4 else P.tokens_to_map(x)


@LOSSES.register("bsd_region_feat", paper=PAPER + " (region-wise BSD, features)", year=2023,
                 inputs="features", default_weight=1.0, stateful=True)
class RegionFeatureBSDLoss(nn.Module):
    """Region-wise BSD on decoder features (module doc) for a multi-tap term ``[F_a, F_b,
    z_a, z_b]``: the logits (class-last (B, H, W, K)) pick each region's teacher, the two
    trainable 1x1-conv projectors carry each peer's feature into the other's space. Returns
    the scalar loss (each direction a mean over the target map's positions)."""

    def __init__(self, s_shapes, t_shapes=None, *, num_samples=None, grid: Depth = 4):
        super().__init__()
        if (not isinstance(s_shapes, (list, tuple)) or len(s_shapes) != 4
                or not isinstance(s_shapes[0], (list, tuple))):
            raise ConfigError("bsd_region_feat.student", s_shapes, "four taps: model A's "
                              "feature, model B's feature, A's and B's class-last logits")
        fa, fb, za, zb = (tuple(x[1:]) for x in s_shapes)
        if len(za) != 3 or za != zb:
            raise ConfigError("bsd_region_feat.student", f"{za} vs {zb}",
                              "taps 3 and 4: two equal class-last (H, W, K) logit maps")
        ma = _as_map_shape(fa, "bsd_region_feat.student")
        mb = _as_map_shape(fb, "bsd_region_feat.student")
        self.grid = _check_grid("bsd_region_feat", grid, *za[:2])
        for m in (ma, mb):
            _check_grid("bsd_region_feat", grid, *m[1:])
        self.ab = P.build("conv1x1", ma, mb, "bsd_region_feat.projector")
        self.ba = P.build("conv1x1", mb, ma, "bsd_region_feat.projector")

    def forward(self, s, t=None, *, y=None, idx=None, **_) -> Tensor:
        fa, fb, za, zb = s
        y = _check_labels("bsd_region_feat", za, y)
        la, lb = (F.log_softmax(_upcast(z.detach()), -1) for z in (za, zb))
        a_wins, b_wins = region_selection(la, lb, y, self.grid)
        fa, fb = _as_map(_upcast(fa)), _as_map(_upcast(fb))
        out = fa.new_zeros(())
        for src, tgt, proj, wins in ((fa, fb, self.ab, b_wins), (fb, fa, self.ba, a_wins)):
            err = (proj(src) - tgt.detach()).pow(2).mean(1)  # (B, h, w)
            out = out + (at_positions(wins, *err.shape[1:], self.grid) * err).mean()
        return out


# -- HFD for maps ------------------------------------------------------------------------------
class Patchify(nn.Module):
    """(C, H, W) map -> the tokens ``(N, D)`` (or map ``(D, h, w)``) of a coarser grid: a conv
    with kernel = stride = ``H / h`` (each patch linearly embedded, as a ViT's patch
    embedding). Sides must be integer multiples of the target grid."""

    def __init__(self, s_shape, t_shape):
        super().__init__()
        c, h, w = s_shape
        if len(t_shape) == 2:
            side = P.grid_of(t_shape[0])
            if side is None or side[1]:
                raise ConfigError("hfd_map.projector", t_shape, "target tokens on a square "
                                  "grid without a cls token")
            grid, d, self.tokens = (side[0], side[0]), t_shape[1], True
        else:
            grid, d, self.tokens = tuple(t_shape[1:]), t_shape[0], False
        if h % grid[0] or w % grid[1] or h // grid[0] != w // grid[1]:
            raise ConfigError("hfd_map.projector", f"{s_shape} -> {t_shape}",
                              "source sides an equal integer multiple of the target grid's")
        p = h // grid[0]
        self.proj = nn.Conv2d(c, d, p, stride=p)

    def forward(self, x: Tensor) -> Tensor:
        y = self.proj(x)
        return y.flatten(2).transpose(1, 2) if self.tokens else y


class TokensUp(nn.Module):
    """Square-grid tokens ``(N, D)`` -> a finer map ``(C, H, W)``: tokens reshaped to their
    map, 1x1 conv + BN to C channels, then bilinear upsampling (hetero's ``tokens_to_map``
    upsamples first and convolves at full resolution: the same maps up to where BN sits, at a
    fraction of the cost)."""

    def __init__(self, s_shape, t_shape):
        super().__init__()
        self.size = tuple(t_shape[1:])
        self.proj = nn.Sequential(nn.Conv2d(s_shape[1], t_shape[0], 1, bias=False),
                                  nn.BatchNorm2d(t_shape[0]))

    def forward(self, x: Tensor) -> Tensor:
        return P.resize_map(self.proj(P.tokens_to_map(x)), self.size)


def _upsamples(s_shape, t_shape) -> bool:
    """Square-grid tokens (no cls token) bridged to a map of a finer grid."""
    g = P.grid_of(s_shape[0]) if len(s_shape) == 2 else None
    return (g is not None and not g[1] and len(t_shape) == 3 and t_shape[1] >= g[0]
            and t_shape[2] >= g[0])


def _patchifies(s_shape, t_shape) -> bool:
    """A map bridged to tokens, or to a map of a coarser grid by an integer factor."""
    if len(s_shape) != 3:
        return False
    if len(t_shape) == 2:
        g = P.grid_of(t_shape[0])
        return g is not None and not g[1] and s_shape[1] % g[0] == 0 and s_shape[2] % g[0] == 0 \
            and s_shape[1] == s_shape[2]
    if len(t_shape) == 3:
        h, w = t_shape[1:]
        return (s_shape[1] > h and s_shape[1] % h == 0 and s_shape[2] % w == 0
                and s_shape[1] // h == s_shape[2] // w)
    return False


@LOSSES.register("hfd_map", paper=PAPER + " (HFD, dense bridges)", year=2023, inputs="features",
                 default_weight=1.0, stateful=True)
class HFDMapLoss(HFDLoss):
    """HFD between a CNN's and a ViT's low-layer features (module doc): hetero's
    :class:`~crossdistill.losses.hetero.HFDLoss` (``MSE(P_ab(F_a), sg F_b) + MSE(P_ba(F_b),
    sg F_a)``) whose map -> tokens (or map -> coarser map) bridge is a conv patchify
    (:class:`Patchify`) instead of pooling + 1x1 conv, and whose tokens -> finer map bridge
    convolves before it upsamples (:class:`TokensUp`); every other pair of shapes uses
    HFDLoss's ``"auto"`` projectors.

    ``s``: ``[F_a, F_b]`` (a multi-tap term with no teacher)."""

    def __init__(self, s_shapes, t_shapes=None, *, num_samples=None):
        super().__init__(s_shapes, t_shapes, num_samples=num_samples, projector="auto")

    @staticmethod
    def _build(name, s_shape, t_shape):
        if _patchifies(tuple(s_shape), tuple(t_shape)):
            return Patchify(tuple(s_shape), tuple(t_shape))
        if _upsamples(tuple(s_shape), tuple(t_shape)):
            return TokensUp(tuple(s_shape), tuple(t_shape))
        return HFDLoss._build(name, s_shape, t_shape)
