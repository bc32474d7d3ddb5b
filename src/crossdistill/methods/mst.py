"""MST-Distill: a mixture of specialised (masked) teachers for cross-modal distillation.

Paper: "MST-Distill: Mixture of Specialized Teachers for Cross-Modal Knowledge Distillation"
(2025); official code Gray-OREO/MST-Distill (``KD_methods/MST.py``, ``main-MST-Distill.py``).
Maths of stage 3: the ``mst`` loss in ``losses/crossmodal.py``.

Three stages, each an ordinary :class:`~crossdistill.Distiller` + :class:`~crossdistill.Trainer`
run, driven by :func:`mst_distill`:

1. **Co-training.** The multimodal teacher T (``fusion``), the cross-modal auxiliary A (the
   other modality's network) and the student S train together as one
   :class:`~crossdistill.methods.members.Members` group: each ``CE + 16 * KL(T=4)`` from the
   other two (``dml`` terms at T = 4; the ``T^2`` is the 16). The KL targets are detached:
   the official code does not detach them, so each model is also pulled towards the others'
   gradients; ours is the paper's "from the other two". Each member keeps its own best val
   epoch (:class:`~crossdistill.methods.collaborative.BestMembers`).
2. **Masked experts.** A :class:`MaskNet` on each of 2 layers of T and of A (features ->
   one token per channel -> multi-head attention -> sigmoid channel mask, multiplied into the
   layer's output by a forward hook that exists only during the expert's own forward). Each
   of the 4 :class:`MaskedExpert` s trains alone (disjoint parameters, one term each) so its
   logits match the frozen student's (``kd`` at T = 4); each keeps the epoch of its lowest
   val KL (as the official code, which selects stage 2 on the val loss).
3. **Routed distillation.** Experts frozen; ``L = CE(S) + mst`` (GateNet on the student's
   logits, g-weighted mixture of expert logits, 16 * KL, load balance); only S and the gate
   train. The official code routes to the top-1 expert by index (no KD gradient reaches the
   gate) and, in stage 3, leaves each T expert's hook installed while the next one runs
   (T's second expert is then masked twice); we mix by g and run every expert with its own
   mask only, as trained in stage 2.

Official defaults (argparse): stages 1 and 2 one epoch each, stage 3 100 epochs, Adam 1e-4,
batch 512, 2 masked layers per model, 3 heads, hidden factor 2, top-1; its stage-1
checkpoint is simply the last epoch (ours: each model's best val epoch).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from itertools import combinations
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import ModelIO
from ..distiller import Distiller, Term
from ..errors import ConfigError
from ..losses.crossmodal import ROUTINGS
from ..registry import METHODS
from ..schema import NonNeg, Temperature
from ..taps import LOGITS, OUTPUT, Capture, Tap, resolve
from . import Recipe, build, embedding_tap, stage_tap
from .collaborative import BestMembers
from .members import Members


# --------------------------------------------------------------------------------------
# stage 2: masks and masked experts
# --------------------------------------------------------------------------------------
class _Reduce(nn.Module):
    """A feature map (B, C, *spatial) -> (B, C): depthwise stride-2 conv, 1x1 conv, BN,
    ReLU, global average pool (the official ``SpatialReduction``, for 1-D or 2-D maps)."""

    def __init__(self, channels: int, spatial: int):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d}.get(spatial)
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}.get(spatial)
        if conv is None:
            raise ConfigError("mst.layers", f"{spatial}-d map", "vectors, 1-d or 2-d maps")
        self.net = nn.Sequential(
            conv(channels, channels, 3, stride=2, padding=1, groups=channels, bias=False),
            conv(channels, channels, 1, bias=False),
            bn(channels),
            nn.ReLU(),
        )

    def forward(self, x):
        return self.net(x).flatten(2).mean(-1)


class MaskNet(nn.Module):
    """Features ``(B, C)`` or ``(B, C, *spatial)`` -> a channel mask ``(B, C)`` in (0, 1).

    Maps are first reduced to ``(B, C)`` (:class:`_Reduce`); every channel then becomes a
    token (a linear embedding to ``C x hidden``), tokens pass one multi-head self-attention,
    and a linear read-out + sigmoid gives each channel's mask. ``hidden = max(1, C //
    (hidden_factor * heads)) * heads`` (the official sizing, floored at one per head)."""

    def __init__(self, channels: int, spatial: int = 0, *, heads: int = 3, hidden_factor: int = 2):
        super().__init__()
        self.channels = int(channels)
        self.hidden = max(1, self.channels // (hidden_factor * heads)) * heads
        self.reduce = _Reduce(self.channels, spatial) if spatial else None
        self.embed = nn.Linear(self.channels, self.hidden * self.channels)
        self.mha = nn.MultiheadAttention(self.hidden, heads, batch_first=True)
        self.fc = nn.Linear(self.hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reduce is not None:
            x = self.reduce(x)
        tokens = self.embed(x).view(x.shape[0], self.channels, self.hidden)
        out, _ = self.mha(tokens, tokens, tokens, need_weights=False)
        return torch.sigmoid(self.fc(out).squeeze(-1))


def _layer_tap(model: nn.Module, layer: str, field: str) -> Tap:
    tap = Tap.parse(layer)
    if tap.path in (LOGITS, OUTPUT) or tap.kind not in ("output", "input") or tap.select:
        raise ConfigError(field, layer, "a module path (its output) or 'path:input'")
    resolve(model, tap, field)
    return tap


class MaskedExpert(nn.Module):
    """``model`` with ``masknet``'s mask multiplied into one layer (``"stage3"``: its output;
    ``"fc:input"``: the input of ``fc``). The hook is installed at the start of *this
    module's* forward and removed when it returns (or raises), so ``model`` itself never
    carries a hook: called directly, or exported, it is the unmasked model. ``model`` is
    frozen and stays in eval mode; only the mask trains."""

    def __init__(self, model: nn.Module, layer: str, masknet: MaskNet, field: str = "mst.layers"):
        super().__init__()
        self.tap = _layer_tap(model, layer, field)
        self.layer = str(self.tap)
        self.model = model.requires_grad_(False).eval()
        self.masknet = masknet

    def _mask(self, x: torch.Tensor) -> torch.Tensor:
        m = self.masknet(x)
        return x * m.view(*m.shape, *[1] * (x.dim() - 2)).to(x.dtype)

    def forward(self, *args, **kwargs):
        module = self.model.get_submodule(self.tap.module_path)
        if self.tap.kind == "input":
            handle = module.register_forward_pre_hook(
                lambda _m, a: (self._mask(a[0]), *a[1:])
            )
        else:
            handle = module.register_forward_hook(lambda _m, _a, out: self._mask(out))
        try:
            return self.model(*args, **kwargs)
        finally:
            handle.remove()

    def train(self, mode: bool = True):
        self.training = mode
        self.masknet.train(mode)
        self.model.eval()
        return self


def default_layers(model: nn.Module) -> list[str]:
    """The 2 hooked layers when none are given: the model's last stage and the input of its
    head (its penultimate embedding), like the official AV-MNIST choice for the auxiliary
    (its last conv and its hidden fc layer)."""
    return [stage_tap(model, -1, "mst.layers"), embedding_tap(model, "mst.layers")]


@torch.no_grad()
def layer_shape(model: nn.Module, layer: str, inputs: Sequence[str], batch) -> tuple[int, ...]:
    """The shape (batch dim dropped) of ``layer``'s value when ``model`` reads ``inputs``."""
    tap = _layer_tap(model, layer, "mst.layers")
    cap = Capture(model, {layer: tap}, "mst.layers")
    dev = next(model.parameters()).device
    batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}
    was = model.training
    model.eval()
    try:
        cap.active = True
        ModelIO(list(inputs), field="mst.inputs").call(model, batch)
        return tuple(cap.get(layer).shape[1:])
    finally:
        cap.active = False
        cap.remove()
        model.train(was)


def make_experts(
    teacher: nn.Module,
    aux: nn.Module,
    batch,
    *,
    teacher_layers: Sequence[str] | None = None,
    aux_layers: Sequence[str] | None = None,
    teacher_inputs: Sequence[str] = ("image", "audio"),
    aux_inputs: Sequence[str] = ("audio",),
    heads: int = 3,
    hidden_factor: int = 2,
) -> Members:
    """The masked experts ``t0, t1, ...`` (on ``teacher``) and ``a0, a1, ...`` (on ``aux``)
    as one :class:`Members` group; ``batch`` (one example batch) sizes the masks. The
    experts share their base model (each installs only its own hook)."""
    experts, reads = {}, {}
    for prefix, model, layers, inputs in (
        ("t", teacher, teacher_layers, teacher_inputs),
        ("a", aux, aux_layers, aux_inputs),
    ):
        layers = list(layers) if layers is not None else default_layers(model)
        if not layers:
            raise ConfigError(f"mst.{prefix}_layers", layers, "one or more layer paths")
        for i, layer in enumerate(layers):
            shape = layer_shape(model, layer, inputs, batch)
            net = MaskNet(shape[0], len(shape) - 1, heads=heads, hidden_factor=hidden_factor)
            experts[f"{prefix}{i}"] = MaskedExpert(model, layer, net)
            reads[f"{prefix}{i}"] = list(inputs)
    return Members(experts, reads=reads, field="mst.experts")


class BestExperts:
    """Trainer callback for stage 2: every expert keeps the mask weights of the epoch where
    its val KL to the (frozen) student was lowest; ``restore()`` loads them."""

    def __init__(self, experts: Members, student, student_inputs, val, temperature=4.0):
        self.experts, self.student, self.val, self.T = experts, student, val, temperature
        self.io = ModelIO(list(student_inputs), field="mst.student_inputs")
        self.best = {n: (float("inf"), -1, None) for n in experts.names}

    @torch.no_grad()
    def val_kl(self, device="cpu") -> dict[str, float]:
        from ..data.loaders import eval_batches

        was = self.experts.training
        self.experts.eval()
        sums, n = dict.fromkeys(self.experts.names, 0.0), 0
        T = self.T
        for batch, _ in eval_batches(self.val, 256):
            batch = {k: v.to(device) for k, v in batch.items()}
            p_s = F.log_softmax(self.io.call(self.student, batch) / T, -1)
            z = self.experts.logits(**{k: batch[k] for k in self.experts.keys()})
            for name, ze in z.items():
                q = F.log_softmax(ze / T, -1)
                sums[name] += float((p_s.exp() * (p_s - q)).sum() * T * T)
            n += p_s.shape[0]
        self.experts.train(was)
        return {k: v / max(n, 1) for k, v in sums.items()}

    def on_epoch_end(self, trainer, row: dict) -> None:
        epoch = int(row.get("epoch", trainer.state["epoch"] - 1))
        for name, v in self.val_kl(trainer.device).items():
            if v < self.best[name][0]:
                net = self.experts[name].masknet
                state = {k: x.detach().clone() for k, x in net.state_dict().items()}
                self.best[name] = (v, epoch, state)

    def restore(self) -> dict:
        """Load each mask's best weights; returns ``{name: (val_kl, epoch)}``."""
        for name, (_, _, state) in self.best.items():
            if state is not None:
                self.experts[name].masknet.load_state_dict(state)
        return {name: (v, e) for name, (v, e, _) in self.best.items()}


# --------------------------------------------------------------------------------------
# the stage-3 recipe
# --------------------------------------------------------------------------------------
@METHODS.register(
    "mst",
    paper="MST-Distill: Mixture of Specialized Teachers for Cross-Modal Knowledge Distillation",
    year=2025,
    family="crossmodal",
)
def mst(
    student,
    teacher,
    *,
    temperature: Temperature = 4.0,
    routing: Literal["mixture", "top1_st", "top1"] = "mixture",
    lb_weight: NonNeg = 1.0,
    kd_weight: NonNeg = 1.0,
) -> Recipe:
    """Stage 3 of MST-Distill: ``CE(S) + kd_weight * [16 * KL(routed experts || S) +
    lb_weight * load balance]`` (see the ``mst`` loss). ``teacher`` is the frozen expert group
    from :func:`make_experts` (any :class:`Members` of models with the student's classes);
    the whole three-stage method is :func:`mst_distill`."""
    if not isinstance(teacher, Members) or len(teacher.names) < 2:
        raise ConfigError(
            "method.teacher",
            type(teacher).__name__,
            "a group of two or more experts (crossdistill.methods.mst.make_experts, or "
            "Members); run the whole method with mst_distill(teacher, aux, student, ...)",
        )
    if routing not in ROUTINGS:
        raise ConfigError("method.routing", routing, f"one of {', '.join(ROUTINGS)}")
    terms = [
        Term("ce"),
        Term(
            "mst",
            student=[LOGITS],
            teacher=list(teacher.names),
            temperature=temperature,
            routing=routing,
            lb_weight=lb_weight,
            weight=kd_weight,
        ),
    ]
    return Recipe(terms, note=f"mst: {routing} over experts {', '.join(teacher.names)}")


def stage1_terms(names: Sequence[str] = ("t", "a", "s"), temperature: float = 4.0) -> list:
    """Each member's CE, and per pair the symmetric, detached ``T^2 * KL`` (``dml``)."""
    terms = [Term("ce", student=n, name=f"ce_{n}") for n in names]
    terms += [
        Term("dml", student=[a, b], teacher=None, temperature=temperature, name=f"kl_{a}{b}")
        for a, b in combinations(names, 2)
    ]
    return terms


# --------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------
def _example(data):
    from ..data.loaders import eval_batches

    return next(iter(eval_batches(data, 8)))[0]


def _settings(epochs, lr, batch_size, seed, extra) -> dict:
    """The trainer settings every stage (and :func:`baseline_distill`) shares."""
    kw = dict(epochs=epochs, batch_size=batch_size, lr=lr, optimizer="adamw", weight_decay=0.0,
              progress=False, seed=seed)
    kw.update(extra)
    return kw


def _per_stage(value, what: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != 3:
            raise ConfigError(f"mst.{what}", value, "one value, or three (one per stage)")
        return tuple(value)
    return (value,) * 3


def mst_distill(
    teacher: nn.Module,
    aux: nn.Module,
    student: nn.Module,
    train,
    val,
    test=None,
    *,
    epochs: Sequence[int] = (5, 2, 10),
    lr: float | Sequence[float] = 1e-3,
    batch_size: int = 64,
    teacher_inputs: Sequence[str] = ("image", "audio"),
    aux_inputs: Sequence[str] = ("audio",),
    student_inputs: Sequence[str] = ("image",),
    teacher_layers: Sequence[str] | None = None,
    aux_layers: Sequence[str] | None = None,
    temperature: float = 4.0,
    routing: str = "mixture",
    lb_weight: float = 1.0,
    heads: int = 3,
    hidden_factor: int = 2,
    task=None,
    seed: int = 0,
    **trainer_kw,
) -> dict:
    """Run MST-Distill's three stages (see the module docstring) and return the student.

    ``teacher`` (multimodal, reads ``teacher_inputs``), ``aux`` (the other modality, reads
    ``aux_inputs``) and ``student`` (reads ``student_inputs``) are trained in place: T and A
    in stage 1 (then frozen), S in stages 1 and 3. ``epochs = (e1, e2, e3)``; ``e1 = 0``
    skips co-training (T and A used as given), ``e2 = 0`` leaves the masks untrained.
    ``lr`` is one value or one per stage (AdamW, no weight decay; the paper: Adam 1e-4,
    batch 512, 100 stage-3 epochs). ``task`` (e.g. with missing-modality ``views``) applies
    to every stage; ``trainer_kw`` go to every :class:`~crossdistill.Trainer`.

    Returns ``{"student", "teacher", "aux", "experts", "gate", "stage1", "stage2",
    "stage3", "results"}``: per stage its metrics, ``results`` the stage-3 trainer's
    (``best_val_acc``, ``test_acc``, ...) and the gate's routing counts.
    """
    from ..train import Trainer, evaluate

    e1, e2, e3 = _per_stage(epochs, "epochs")
    for i, e in enumerate((e1, e2, e3), start=1):
        if isinstance(e, bool) or not isinstance(e, int) or e < (1 if i == 3 else 0):
            raise ConfigError(f"mst.epochs[{i - 1}]", e, ">= 1 for stage 3, >= 0 for 1 and 2")
    lrs = _per_stage(lr, "lr")
    if routing not in ROUTINGS:
        raise ConfigError("mst.routing", routing, f"one of {', '.join(ROUTINGS)}")

    device = trainer_kw.get("device", "cpu")

    def fit(distiller, e, lr_, callbacks=(), test_data=None):
        kw = _settings(e, lr_, batch_size, seed, trainer_kw)
        return Trainer(distiller, train, val, test_data, callbacks=list(callbacks), **kw).fit()

    reads = {"t": list(teacher_inputs), "a": list(aux_inputs), "s": list(student_inputs)}
    group = Members({"t": teacher, "a": aux, "s": student}, reads=reads, output="s",
                    field="mst.models")
    stage1: dict = {}
    if e1:  # -- stage 1: co-training ------------------------------------------------------
        d1 = Distiller(group, None, stage1_terms(temperature=temperature), io=group.io(),
                       task=task, seed=seed)
        keep = BestMembers(group, val, task=task)
        stage1["trainer"] = fit(d1, e1, lrs[0], [keep])
        d1.close()
        best = keep.restore()
        stage1["val_acc"] = {n: acc for n, (acc, _) in best.items()}
        stage1["best_epoch"] = {n: ep for n, (_, ep) in best.items()}
        if test is not None:
            stage1["test"] = {
                n: evaluate(group[n], test, device=device, task=task, io=group.member_io(n))
                for n in group.names
            }

    # -- stage 2: masked experts ---------------------------------------------------------
    student_io = {"inputs": list(student_inputs)}
    experts = make_experts(
        teacher, aux, _example(train), teacher_layers=teacher_layers, aux_layers=aux_layers,
        teacher_inputs=teacher_inputs, aux_inputs=aux_inputs, heads=heads,
        hidden_factor=hidden_factor,
    ).to(next(teacher.parameters()).device)
    stage2: dict = {}
    keep2 = BestExperts(experts, student, student_inputs, val, temperature)
    if e2:
        terms2 = [
            Term("kd", student=n, teacher=LOGITS, temperature=temperature, weight=1.0,
                 name=f"mask_{n}")
            for n in experts.names
        ]
        d2 = Distiller(experts, student, terms2, io=experts.io(), teacher_io=student_io,
                       task=task, seed=seed)
        stage2["trainer"] = fit(d2, e2, lrs[1], [keep2])
        d2.close()
        best2 = keep2.restore()
        stage2["val_kl"] = {n: v for n, (v, _) in best2.items()}
        stage2["best_epoch"] = {n: ep for n, (_, ep) in best2.items()}
    else:
        stage2["val_kl"] = keep2.val_kl(next(student.parameters()).device)
    stage2["layers"] = {n: experts[n].layer for n in experts.names}
    stage2["val_acc"] = {
        n: evaluate(experts[n], val, device=device, task=task, io=experts.member_io(n))["acc"]
        for n in experts.names
    }

    # -- stage 3: routed distillation ----------------------------------------------------
    student.requires_grad_(True)  # stage 2 froze it as its teacher
    student.train()
    recipe = build("mst", student, experts, temperature=temperature, routing=routing,
                   lb_weight=lb_weight)
    d3 = Distiller(student, experts, recipe.terms, io=student_io, teacher_io=experts.io(),
                   hooks=recipe.hooks, task=task, seed=seed)
    res3 = fit(d3, e3, lrs[2], test_data=test)
    d3.close()
    loss = d3.loss_modules["mst"]
    res3["routes"] = {n: int(c) for n, c in zip(experts.names, loss.routes.tolist())}
    return {
        "student": student,
        "teacher": teacher,
        "aux": aux,
        "experts": experts,
        "gate": copy.deepcopy(loss.gate),
        "stage1": stage1,
        "stage2": stage2,
        "stage3": res3,
        "results": res3,
    }


def baseline_distill(
    method: str,
    teacher: nn.Module,
    student: nn.Module,
    train,
    val,
    test=None,
    *,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 64,
    teacher_inputs: Sequence[str] = ("image", "audio"),
    student_inputs: Sequence[str] = ("image",),
    task=None,
    seed: int = 0,
    params: dict | None = None,
    **trainer_kw,
) -> dict:
    """A one-stage baseline (``"kd"``, ``"fitnet"``, ``"crd"``, ``"scratch"``, ... any
    registered recipe) with MST-Distill's stage-3 settings: the cross-modal comparison
    MST-Distill claims (``params`` go to the recipe). Returns ``{"student", "results"}``,
    the student a clean copy of its best val epoch."""
    from ..train import Trainer

    use = None if method == "scratch" else teacher
    recipe = build(method, student, use, **(params or {}))
    d = Distiller(student, use, recipe.terms, io={"inputs": list(student_inputs)},
                  teacher_io={"inputs": list(teacher_inputs)} if use is not None else None,
                  hooks=recipe.hooks, task=task, seed=seed, num_samples=_num_samples(train))
    kw = _settings(epochs, lr, batch_size, seed, trainer_kw)
    res = Trainer(d, train, val, test, **kw).fit()
    return {"student": d.export(), "results": res}


def _num_samples(data) -> int | None:
    """The memory-bank size a CRD term needs (largest sample id + 1), when the data has ids."""
    idx = getattr(data, "idx", None)
    return int(idx.max()) + 1 if torch.is_tensor(idx) and idx.numel() else None
