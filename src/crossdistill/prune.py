"""Group channel pruning (GCP) of conv-BN networks, as logged structure events.

Paper: "Group channel pruning and spatial attention distilling for object detection"
(Chu et al., Applied Intelligence, 2022; official code chumingqian/
Model_Compression_For_YOLOV3-V4: ``utils/prune_utils.py``, ``group_slim_OrMask_prune.py``,
``train.py``). Stage 1 (dynamic sparse training) lives in :func:`attach_gammas` and the
``bn_l1`` loss (``losses/sad.py``), stage 2 (group channel pruning) here, stage 3 (SAD
fine-tuning) in ``methods/gcp_sad.py``.

**Channel graph.** The model is traced with ``torch.fx`` (and one eval-mode forward of a
zero sample for the shapes); every tensor's channel axis is a list of *segments*, each a
slice of one *channel space*. A ``Conv2d`` (groups 1) opens a space; the ``BatchNorm2d``
right after it gives the space its importance ``|gamma|`` (network slimming). Activations,
pooling, dropout, spatial slicing and upsampling keep the layout; an element-wise sum or
product of two maps joins their spaces (a *residual group*: every member must keep the same
channels); ``torch.cat`` along channels concatenates segments. Every Conv2d /
ConvTranspose2d / Linear that reads a layout is a *follower* whose input channels are sliced
with it. A space is *frozen* (never pruned) when it is the model input or output, has no BN
of its own (a ConvTranspose2d, a Linear, a conv without BN), is read by anything else (a
reshape that mixes channels, a grouped conv, an unknown function), or is joined to such a
space by a residual connection.

**Group channel pruning** (Sec. 3.2 of the paper; the official ``group_slim_OrMask_prune``):
producers are grouped by feature scale (input size / output size) and module type (the class
of the innermost non-container module holding the conv: ``Up``, ``BasicBlock``, the model's
own class for stem / encoder convs); each group gets its own |gamma| threshold so that
``ratio`` of *its* channels fall below it (the ``ratio`` smallest of the group: ties broken
by layer order, so the count is exact), each layer keeps at least ``min_channels``, and a
residual group keeps the *union* of its members' kept channels (the official "OrMask"
merge), so additions stay consistent. ``grouping="global"``: one threshold for the whole
network (plain network slimming), for ablations.

**Events.** The plan is a list of plain-data structure events a trainer logs and a resumed
run replays: ``prune_channels`` (the engine's op: a producer's output channels and its BN;
``next`` = the followers that read exactly that space) and ``slice_inputs`` (registered
here: a follower's input channels at arbitrary indices, for what ``prune_channels`` cannot
express: a ConvTranspose2d follower, and concatenation followers, whose input indices are
offset by the other segments, e.g. a U-Net decoder conv reading ``cat([upsampled, skip])``).
:class:`PruneAt` applies a plan as a distiller step hook.

Inference (not in the paper or code): grouping is automatic from the traced graph (the
official code hard-codes YOLOv4 layer-index ranges); the dynamic sparse mask is per group.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .registry import STRUCTURE_OPS
from .structure import _set, _slice_in
from .taps import Tap, resolve

PAPER = "Group channel pruning and spatial attention distilling for object detection"
YEAR = 2022

_KEEP_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Identity, nn.Dropout, nn.Dropout2d,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample,
    nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)
_KEEP_FUNCS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.mish, F.hardswish,
    torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.interpolate, F.max_pool2d, F.avg_pool2d,
    F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.dropout, F.dropout2d, operator.neg,
    torch.clamp, torch.clone,
}
_KEEP_METHODS = {
    "relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "float", "double", "half",
    "to", "type_as", "clamp", "clamp_min", "clamp_max", "neg",
}
_JOIN_FUNCS = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul,
               operator.imul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div}
_JOIN_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_CAT_FUNCS = {torch.cat, torch.concat}
_SHAPE_METHODS = {"size", "dim"}
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass
class Space:
    """One channel space: ``width`` channels opened by the conv at ``conv`` (``None`` for
    the input, a ConvTranspose2d, a Linear, an unknown op), scored by the BN at ``bn``."""

    width: int
    conv: str | None = None
    node: str | None = None  # the fx node of the conv's output
    bn: str | None = None
    frozen: str | None = None  # why it cannot be pruned
    key: str = ""  # the pruning group (scale and module type)


@dataclass
class Follower:
    path: str
    kind: str  # "conv", "convT" or "linear"
    layout: list[tuple[int, int]]  # (space, width) segments of its input channels


@dataclass
class ChannelGraph:
    spaces: list[Space] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)
    followers: list[Follower] = field(default_factory=list)
    links: dict[int, list[str]] = field(default_factory=dict)  # root -> residual join nodes

    def new(self, width: int, **kw) -> int:
        self.spaces.append(Space(int(width), **kw))
        self.parent.append(len(self.parent))
        return len(self.spaces) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def join(self, a: int, b: int, node: str) -> None:
        ra, rb = self.find(a), self.find(b)
        links = self.links.pop(ra, []) + self.links.pop(rb, [])
        if ra != rb:
            self.parent[rb] = ra
            links.append(node)
        self.links[ra] = links

    def freeze(self, layout, reason: str) -> None:
        for sid, _ in layout or ():
            if self.spaces[sid].frozen is None:
                self.spaces[sid].frozen = reason

    def members(self, root: int) -> list[int]:
        return [i for i in range(len(self.spaces)) if self.find(i) == root]

    def roots(self) -> list[int]:
        return sorted({self.find(i) for i in range(len(self.spaces))})

    def frozen(self, root: int) -> tuple[int, str] | None:
        """(member, reason) of the first frozen member of ``root``'s residual group."""
        for i in self.members(root):
            s = self.spaces[i]
            if s.frozen is not None:
                return i, s.frozen
            if s.conv is None or s.bn is None:
                return i, "its channels have no BatchNorm gamma to rank them"
        return None

    def producers(self) -> dict[str, int]:
        """conv path -> space, for the convs with their own BN."""
        return {s.conv: i for i, s in enumerate(self.spaces) if s.conv and s.bn}

    def describe(self, i: int) -> str:
        s = self.spaces[i]
        return s.conv or s.node or f"space {i}"


# -- tracing -------------------------------------------------------------------------------
def _first_conv(model: nn.Module) -> nn.Module | None:
    return next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)


def sample_input(model: nn.Module, size: int = 32) -> torch.Tensor:
    """A zero image batch of the model's first conv's input channels, ``size`` pixels a side."""
    first = _first_conv(model)
    if first is None:
        raise ConfigError("gcp.model", type(model).__name__, "a network with Conv2d layers")
    p = next(model.parameters())
    if isinstance(first, nn.Linear):
        return torch.zeros(2, first.in_features, device=p.device, dtype=p.dtype)
    return torch.zeros(2, first.in_channels, size, size, device=p.device, dtype=p.dtype)


def _module_type(model: nn.Module, path: str) -> str:
    """The class of the innermost non-container module that holds ``path``."""
    parts = path.split(".")[:-1]
    while parts:
        m = model.get_submodule(".".join(parts))
        if not isinstance(m, _CONTAINERS):
            return type(m).__name__
        parts.pop()
    return type(model).__name__


def _shape(node) -> tuple[int, ...] | None:
    tm = node.meta.get("tensor_meta") if hasattr(node, "meta") else None
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def _channel_kept_by_index(index, ndim: int) -> bool:
    """Whether ``x[index]`` (``x`` of ``ndim`` dims) keeps the channel axis whole and in
    place: dim 0 sliced (not indexed away), dim 1 untouched."""
    idx = index if isinstance(index, tuple) else (index,)
    if any(i is None for i in idx):
        return False
    if Ellipsis in idx:
        e = idx.index(Ellipsis)
        fill = ndim - (len(idx) - 1)
        dims = list(idx[:e]) + [slice(None)] * fill + list(idx[e + 1:])
    else:
        dims = list(idx)
    whole = slice(None, None, None)
    return (not dims or isinstance(dims[0], slice)) and (len(dims) < 2 or dims[1] == whole)


def analyse(model: nn.Module, sample: torch.Tensor | None = None,
            input_size: int = 32) -> ChannelGraph:
    """The channel graph of ``model`` (module doc), traced with torch.fx; ``sample`` (or a
    zero image of ``input_size`` pixels) runs once in eval mode for the shapes."""
    import torch.fx as fx
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        gm = fx.symbolic_trace(model)
    except Exception as err:  # data-dependent control flow, unsupported constructs
        raise ConfigError("gcp.model", type(model).__name__,
                          f"a model torch.fx can trace (channel pruning follows its graph): "
                          f"{type(err).__name__}: {str(err)[:200]}") from None
    x = sample_input(model, input_size) if sample is None else sample
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(x)
    finally:
        model.train(was)
    mods = dict(model.named_modules())
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    in_h = x.shape[-1] if x.dim() == 4 else 1
    g = ChannelGraph()
    lay: dict = {}

    def tensor_inputs(n):
        return [a for a in n.all_input_nodes if lay.get(a) is not None]

    def opaque(n, reason):
        for a in tensor_inputs(n):
            g.freeze(lay[a], reason)
        shp = _shape(n)
        return [(g.new(shp[1], frozen=reason, node=n.name), shp[1])] if shp and len(shp) >= 2 \
            else None

    for n in gm.graph.nodes:
        shp = _shape(n)
        if n.op == "placeholder":
            lay[n] = [(g.new(shp[1], frozen="the model input", node=n.name), shp[1])] \
                if shp and len(shp) >= 2 else None
        elif n.op == "get_attr":
            lay[n] = None
        elif n.op == "output":
            def walk(a):
                if isinstance(a, fx.Node):
                    g.freeze(lay.get(a), "it is the model's output")
                elif isinstance(a, (tuple, list)):
                    for b in a:
                        walk(b)
                elif isinstance(a, dict):
                    for b in a.values():
                        walk(b)
            walk(n.args)
        elif n.op == "call_module":
            m, path = mods[n.target], n.target
            src = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
            inp = lay.get(src) if src is not None else None
            if calls[path] > 1:
                lay[n] = opaque(n, f"{path} is called more than once (shared weights)")
            elif isinstance(m, nn.Conv2d) and m.groups == 1 and inp is not None:
                g.followers.append(Follower(path, "conv", list(inp)))
                ratio = in_h / shp[-1] if shp and len(shp) == 4 and shp[-1] else 1.0
                sid = g.new(m.out_channels, conv=path, node=n.name,
                            key=f"{_module_type(model, path)}/x{ratio:g}")
                lay[n] = [(sid, m.out_channels)]
            elif isinstance(m, nn.ConvTranspose2d) and m.groups == 1 and inp is not None:
                g.followers.append(Follower(path, "convT", list(inp)))
                lay[n] = [(g.new(m.out_channels, node=n.name,
                                 frozen=f"{path} is a ConvTranspose2d (its outputs are kept)"),
                           m.out_channels)]
            elif isinstance(m, nn.Linear) and inp is not None and shp is not None and len(
                    _shape(src) or ()) == 2:
                g.followers.append(Follower(path, "linear", list(inp)))
                lay[n] = [(g.new(m.out_features, node=n.name,
                                 frozen=f"{path} is a Linear layer (its outputs are kept)"),
                           m.out_features)]
            elif isinstance(m, nn.BatchNorm2d) and inp is not None:
                sid = inp[0][0]
                s = g.spaces[sid]
                if len(inp) == 1 and s.conv and s.bn is None and src.name == s.node:
                    s.bn = path
                else:
                    g.freeze(inp, f"{path} is a BatchNorm that does not directly follow a conv")
                lay[n] = inp
            elif isinstance(m, _KEEP_MODULES) and inp is not None:
                lay[n] = inp
            elif isinstance(m, nn.Flatten) and inp is not None and _flat_ok(src, shp):
                lay[n] = inp
            else:
                lay[n] = opaque(n, f"it is read by {path} ({type(m).__name__})")
        else:  # call_function / call_method
            lay[n] = _function(g, n, lay, shp, opaque, fx)
    return g


def _flat_ok(src, shp) -> bool:
    """A flatten / view that only drops 1x1 spatial dims: (B, C, 1, 1) -> (B, C)."""
    before = _shape(src)
    return (before is not None and shp is not None and len(shp) == 2 and len(before) >= 2
            and before[1] == shp[1] and all(d == 1 for d in before[2:]))


def _function(g: ChannelGraph, n, lay: dict, shp, opaque, fx):
    t, name = n.target, n.name
    args = [a for a in n.args]
    tensors = [a for a in args if isinstance(a, fx.Node) and lay.get(a) is not None]
    first = lay.get(args[0]) if args and isinstance(args[0], fx.Node) else None
    if shp is None:  # shapes, sizes, tuples: no channels of their own
        if n.op == "call_method" and t in _SHAPE_METHODS or t in (getattr, len):
            return None
        return opaque(n, f"it is read by {name}")
    if t is getattr or (n.op == "call_method" and t in _SHAPE_METHODS):
        return None
    if t is operator.getitem and first is not None:
        ndim = len(_shape(args[0]) or ())
        if _channel_kept_by_index(args[1], ndim):
            return first
        return opaque(n, f"{name} slices its channels")
    if (n.op == "call_function" and t in _KEEP_FUNCS) or (
            n.op == "call_method" and t in _KEEP_METHODS):
        if first is not None and shp[1] == sum(w for _, w in first):
            return first
        return opaque(n, f"it is read by {name}")
    if (n.op == "call_function" and t in _JOIN_FUNCS) or (
            n.op == "call_method" and t in _JOIN_METHODS):
        full = [lay[a] for a in tensors if (_shape(a) or (0, 1))[1] == shp[1] and len(
            _shape(a) or ()) >= 2]
        if not full:
            return opaque(n, f"it is read by {name}")
        widths = [w for _, w in full[0]]
        for other in full[1:]:
            if [w for _, w in other] != widths:
                return opaque(n, f"{name} adds maps of different channel layouts")
        for other in full[1:]:
            for (a, _), (b, _) in zip(full[0], other):
                g.join(a, b, name)
        return full[0]
    if n.op == "call_function" and t in _CAT_FUNCS:
        parts = args[0] if args else n.kwargs.get("tensors")
        dim = args[1] if len(args) > 1 else n.kwargs.get("dim", 0)
        if not isinstance(parts, (list, tuple)) or not all(
                isinstance(p, fx.Node) and lay.get(p) is not None for p in parts):
            return opaque(n, f"it is read by {name}")
        if isinstance(dim, bool) or not isinstance(dim, int):
            return opaque(n, f"{name} concatenates along a computed dim")
        dim = dim % len(shp)
        if dim == 1:
            return [seg for p in parts for seg in lay[p]]
        widths = [w for _, w in lay[parts[0]]]
        for p in parts[1:]:
            if [w for _, w in lay[p]] != widths:
                return opaque(n, f"{name} concatenates maps of different channel layouts")
            for (a, _), (b, _) in zip(lay[parts[0]], lay[p]):
                g.join(a, b, name)
        return lay[parts[0]]
    if first is not None and (t is torch.flatten or (n.op == "call_method" and t in (
            "flatten", "view", "reshape"))) and _flat_ok(args[0], shp):
        return first
    return opaque(n, f"it is read by {name}")


# -- planning ------------------------------------------------------------------------------
@dataclass
class PrunePlan:
    events: list[dict]
    groups: dict[str, dict]  # pruning group -> {"channels", "pruned", "threshold"}
    kept: dict[str, tuple[int, int]]  # conv path -> (kept, width)
    residual: list[list[str]]  # the conv paths pruned together (shortcut-linked)

    @property
    def channels(self) -> tuple[int, int]:
        """(kept, total) over the pruned convs' output channels."""
        return (sum(k for k, _ in self.kept.values()), sum(w for _, w in self.kept.values()))


def check_ratio(ratio, field: str = "gcp.ratio") -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ConfigError(field, ratio, "a pruning ratio in [0, 1) (the fraction of each "
                          "group's channels removed)")
    return float(ratio)


def _check_grouping(grouping) -> str:
    if grouping not in ("scale_type", "global"):
        raise ConfigError("gcp.grouping", grouping, "'scale_type' (per feature scale and "
                          "module type, the paper) or 'global' (one threshold)")
    return grouping


def selected(g: ChannelGraph, model: nn.Module, layers: Sequence[str] | None,
             field: str = "gcp.layers") -> list[int]:
    """The residual-group roots to prune: every prunable one, or those of ``layers`` (each
    named conv brings its whole shortcut-linked group; a conv that cannot be pruned is an
    error naming it and why)."""
    prods = g.producers()
    if layers is None:
        return [r for r in g.roots() if g.frozen(r) is None and any(
            g.spaces[i].conv for i in g.members(r))]
    if isinstance(layers, str) or not all(isinstance(p, str) for p in layers):
        raise ConfigError(field, layers, "a list of Conv2d module paths")
    names = dict(model.named_modules())
    roots = []
    for path in layers:
        if path not in prods:
            why = ("no such module" if path not in names else
                   f"a {type(names[path]).__name__}, not a Conv2d followed by its BatchNorm2d")
            ok = sorted(p for p, i in prods.items() if g.frozen(g.find(i)) is None)
            raise ConfigError(field, path, f"{why}; prunable convs: {ok[:12]}")
        root = g.find(prods[path])
        bad = g.frozen(root)
        if bad is not None:
            member, reason = bad
            joins = g.links.get(root)
            if joins and member != prods[path]:
                raise ConfigError(field, path, f"pruning it breaks the residual connection "
                                  f"{joins[0]}: its output is added to {g.describe(member)}, "
                                  f"whose channels cannot be pruned ({reason}); leave it out")
            raise ConfigError(field, path, f"its channels cannot be pruned ({reason})")
        if root not in roots:
            roots.append(root)
    return sorted(roots)


def plan(model: nn.Module, ratio: float, *, layers: Sequence[str] | None = None,
         grouping: str = "scale_type", min_channels: int = 1,
         sample: torch.Tensor | None = None, input_size: int = 32) -> PrunePlan:
    """The group-channel-pruning plan of ``model`` at its current BN gammas (module doc)."""
    ratio = check_ratio(ratio)
    grouping = _check_grouping(grouping)
    if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 1:
        raise ConfigError("gcp.min_channels", min_channels, "an integer >= 1")
    g = analyse(model, sample, input_size)
    roots = selected(g, model, layers)
    ranks: dict[str, list] = {}
    for root in roots:
        for i in g.members(root):
            s = g.spaces[i]
            gamma = resolve(model, Tap(s.bn), "gcp.bn").weight.detach().abs().float().cpu()
            key = s.key if grouping == "scale_type" else "global"
            ranks.setdefault(key, []).extend((float(v), i, c) for c, v in enumerate(gamma))
    masks = {i: torch.ones(g.spaces[i].width, dtype=torch.bool)
             for root in roots for i in g.members(root)}
    groups = {}
    for key, items in ranks.items():
        order = sorted(items, key=lambda u: u[0])  # stable: ties by layer order, channel
        n = int(ratio * len(order))
        for _, i, c in order[:n]:
            masks[i][c] = False
        groups[key] = {"channels": len(order), "pruned": n,
                       "threshold": order[n][0] if n < len(order) else float("inf")}
    for i, m in masks.items():  # at least min_channels per layer: its largest gammas
        need = min(min_channels, len(m))
        if int(m.sum()) < need:
            gamma = resolve(model, Tap(g.spaces[i].bn), "gcp.bn").weight.detach().abs()
            m[gamma.cpu().topk(need).indices] = True
    keep: dict[int, list[int]] = {}
    for root in roots:  # OrMask: a residual group keeps the union of its members' channels
        union = torch.zeros(g.spaces[root].width, dtype=torch.bool)
        for i in g.members(root):
            union |= masks[i]
        keep[root] = union.nonzero().flatten().tolist()
    events, kept, residual = [], {}, []
    pruned = {r for r in roots if len(keep[r]) < g.spaces[r].width}
    plain = {r: [] for r in pruned}
    others = []
    for f in g.followers:
        hit = [g.find(sid) in pruned for sid, _ in f.layout]
        if not any(hit):
            continue
        if len(f.layout) == 1 and f.kind in ("conv", "linear"):
            plain[g.find(f.layout[0][0])].append(f.path)
        else:
            others.append(f)
    for root in roots:
        members = [i for i in g.members(root) if g.spaces[i].conv]
        if len(members) > 1:
            residual.append([g.spaces[i].conv for i in members])
        for i in members:
            kept[g.spaces[i].conv] = (len(keep[root]), g.spaces[i].width)
        if root not in pruned:
            continue
        for j, i in enumerate(members):
            s = g.spaces[i]
            events.append({"op": "prune_channels", "path": s.conv, "keep": list(keep[root]),
                           "bn": s.bn, "next": plain[root] if j == 0 else []})
    for f in others:
        idx, off = [], 0
        for sid, w in f.layout:
            r = g.find(sid)
            idx += [off + k for k in keep[r]] if r in pruned else list(range(off, off + w))
            off += w
        events.append({"op": "slice_inputs", "path": f.path, "keep": idx})
    return PrunePlan(events, groups, kept, residual)


def sparsity_targets(model: nn.Module, *, layers: Sequence[str] | None = None,
                     grouping: str = "scale_type", sample: torch.Tensor | None = None,
                     input_size: int = 32) -> list[tuple[str, list[str]]]:
    """``[(pruning group, [BN paths])]``: the BNs stage 1's L1 acts on (those of the convs
    stage 2 may prune), in group order."""
    grouping = _check_grouping(grouping)
    g = analyse(model, sample, input_size)
    out: dict[str, list[str]] = {}
    for root in selected(g, model, layers):
        for i in g.members(root):
            s = g.spaces[i]
            out.setdefault(s.key if grouping == "scale_type" else "global", []).append(s.bn)
    return list(out.items())


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- structure op and step hook --------------------------------------------------------------
def _slice_in_any(m: nn.Module, keep: torch.Tensor) -> nn.Module:
    if isinstance(m, nn.ConvTranspose2d):
        if m.groups != 1:
            raise ConfigError("structure.path", "grouped ConvTranspose2d", "groups=1")
        new = nn.ConvTranspose2d(len(keep), m.out_channels, m.kernel_size, m.stride, m.padding,
                                 m.output_padding, 1, m.bias is not None, m.dilation,
                                 m.padding_mode).to(m.weight.device, m.weight.dtype)
        new.weight.copy_(m.weight[keep])
        if m.bias is not None:
            new.bias.copy_(m.bias)
        return new
    return _slice_in(m, keep)


@STRUCTURE_OPS.register("slice_inputs",
                        description="keep some input channels of a Conv2d, ConvTranspose2d "
                        "or Linear")
def slice_inputs(model, *, path: str, keep: list[int]):
    """Keep input channels ``keep`` (indices into its current inputs) of the layer at
    ``path``: the follower side of a channel pruning that ``prune_channels``' ``next``
    cannot express (offset indices behind a concatenation, ConvTranspose2d)."""
    layer = resolve(model, Tap(path), "structure.path")
    if not isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        raise ConfigError("structure.path", type(layer).__name__,
                          "a Conv2d, ConvTranspose2d or Linear")
    width = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    idx = sorted(int(k) for k in keep)
    if not idx or idx[0] < 0 or idx[-1] >= width or len(set(idx)) != len(idx):
        raise ConfigError("structure.keep", keep, f"distinct channel indices in 0..{width - 1}")
    _set(model, path, _slice_in_any(layer, torch.as_tensor(idx, dtype=torch.long)))


class PruneAt:
    """A distiller step hook that applies a plan's events (``distiller.apply_structure``,
    logged, so a resumed run replays them before loading its weights) at the end of
    optimiser step ``at`` (default 1: the step hooks run after a step, so the first step
    sees the unpruned model). A run whose log already holds the events (a resume) does
    nothing."""

    def __init__(self, events: Sequence[dict], at: int = 1):
        if isinstance(at, bool) or not isinstance(at, int) or at < 1:
            raise ConfigError("gcp.prune_at", at, "an optimiser step >= 1")
        self.events = [dict(e) for e in events]
        self.at = at

    def done(self, d) -> bool:
        return not self.events or self.events[0] in d.structure_log

    def __call__(self, d) -> None:
        if d.step + 1 < self.at or self.done(d):
            return
        for e in self.events:
            d.apply_structure(**e)


# -- stage 1: the gamma tap ------------------------------------------------------------------
ATTR = "gcp_gammas"


class GammaTap(nn.Module):
    """No parameters of its own: its output is the concatenated gammas of the BNs at
    ``paths`` (resolved in the model it is called with), the tap the ``bn_l1`` term reads.
    The model's forward pre-hook calls it, so the tap fires on every forward."""

    def __init__(self, paths: Sequence[str]):
        super().__init__()
        self.paths = list(paths)

    def forward(self, root: nn.Module) -> torch.Tensor:
        return torch.cat([root.get_submodule(p).weight for p in self.paths])


def _pre_forward(module, args):
    getattr(module, ATTR)(module)


def attach_gammas(model: nn.Module, paths: Sequence[str]) -> str:
    """Attach the :class:`GammaTap` of ``paths`` as ``model.gcp_gammas`` (no parameters, so
    the state dict is unchanged); returns its tap path. :func:`release` removes it."""
    if hasattr(model, ATTR):
        release(model)
    bad = [p for p in paths if not isinstance(resolve(model, Tap(p), "gcp.bn"),
                                              nn.modules.batchnorm._BatchNorm)]
    if bad or not paths:
        raise ConfigError("gcp.bn", bad or list(paths), "BatchNorm module paths (at least one)")
    setattr(model, ATTR, GammaTap(paths))
    model.register_forward_pre_hook(_pre_forward)
    return ATTR


def release(model: nn.Module) -> None:
    """Remove :func:`attach_gammas`' tap and hook (a finished sparse stage)."""
    if getattr(model, ATTR, None) is None:
        return
    for key, fn in list(model._forward_pre_hooks.items()):  # (a deep copy's hooks too)
        if fn is _pre_forward:
            del model._forward_pre_hooks[key]
    delattr(model, ATTR)
