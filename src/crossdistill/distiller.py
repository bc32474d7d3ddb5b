"""Term and Distiller: a distillation is data, a student, frozen teachers and a list of terms.

A :class:`Term` pairs a student tap with a teacher tap (or labels), bridges their shapes with
a projector and scores them with a registered loss and a weight. The :class:`Distiller`
installs the taps, builds projectors and stateful losses from one dry run, and returns every
term's loss each step. It holds no training logic and no maths of its own.
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from . import losses as _losses  # noqa: F401  (registers the losses)
from . import projectors as P
from .errors import ConfigError
from .registry import LOSSES
from .taps import LOGITS, Capture, Tap

TapSpec = str | Tap | Sequence[str | Tap]


def _taps(spec) -> list[Tap]:
    if spec is None:
        return []
    if isinstance(spec, (str, Tap, Mapping)):
        return [Tap.parse(spec)]
    return [Tap.parse(s) for s in spec]


class Term:
    """One distillation term.

    ``student``/``teacher`` are taps (a module path, ``"path:input"``, ``"path[0]"``, a
    :class:`Tap`, or a list of them for multi-level losses); ``teacher=None`` for label-only
    losses such as ``ce``. ``projector`` is a registered projector name, ``"auto"``, or a
    factory ``(s_shape, t_shape, **projector_params) -> nn.Module`` (methods' own heads).
    ``weight`` defaults to the loss's recommended weight; ``warmup`` ramps it linearly from 0
    over that many epochs (DKD). ``teacher_model`` picks one of several named teachers.
    Remaining keyword arguments are the loss's hyper-parameters.
    """

    def __init__(
        self,
        loss: str,
        *,
        student: TapSpec = LOGITS,
        teacher: TapSpec | None = "default",
        projector: str | Callable[..., nn.Module] | None = None,
        weight: float | None = None,
        warmup: float = 0.0,
        name: str | None = None,
        teacher_model: str | None = None,
        projector_params: dict | None = None,
        **params,
    ):
        self.fn = LOSSES.get(loss, "terms.loss")
        meta = LOSSES.meta(loss)
        self.loss = loss
        self.stateful = bool(meta.get("stateful"))
        label_only = meta.get("inputs") == "labels"
        if teacher == "default":
            teacher = None if label_only else LOGITS
        self.student, self.teacher = _taps(student), _taps(teacher)
        self.multi = not isinstance(student, (str, Tap, Mapping))
        self.projector = projector
        self.projector_params = projector_params or {}
        self.weight = float(meta.get("default_weight", 1.0) if weight is None else weight)
        if self.weight < 0:
            raise ConfigError(f"terms.{loss}.weight", weight, "must be >= 0")
        if warmup < 0:
            raise ConfigError(f"terms.{loss}.warmup", warmup, "must be >= 0 epochs")
        self.warmup = float(warmup)
        self.teacher_model = teacher_model
        self.params = params
        self.name = name or loss
        self._check_params()

    def _check_params(self) -> None:
        sig = inspect.signature(self.fn.__init__ if self.stateful else self.fn)
        accepted = {n for n, p in sig.parameters.items() if p.kind == p.KEYWORD_ONLY}
        accepted -= {"y", "idx", "num_samples"}
        for k in self.params:
            if k not in accepted:
                raise ConfigError(
                    f"terms.{self.name}.{k}",
                    self.params[k],
                    f"unknown parameter of loss {self.loss!r}; "
                    f"allowed: {', '.join(sorted(accepted)) or 'none'}",
                )

    def weight_at(self, epoch: float) -> float:
        if self.warmup <= 0:
            return self.weight
        return self.weight * min(1.0, epoch / self.warmup)

    def __repr__(self) -> str:
        t = [str(x) for x in self.teacher] or "labels"
        return f"Term({self.name}: {[str(x) for x in self.student]} -> {t}, w={self.weight})"


@dataclass
class Output:
    logits: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    total: torch.Tensor | None = None


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def _shape(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape[1:])


class Distiller(nn.Module):
    """Student + frozen teacher(s) + terms. ``forward(batch) -> Output``.

    Tap paths are checked here, at construction; projectors and stateful losses are built by
    :meth:`build` from one dry run on an example batch (the trainer calls it with the first
    training batch before the optimiser exists), so every shape error comes before training.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | Mapping[str, nn.Module] | None = None,
        terms: Sequence[Term] = (),
        *,
        input_key: str = "x",
        label_key: str = "y",
        teacher_input_key: str | None = None,
        num_samples: int | None = None,
        hooks: Sequence[Callable[[Distiller], None]] = (),
        mixture: nn.Module | None = None,
    ):
        super().__init__()
        if not terms:
            terms = [Term("ce")]
        self.student = student
        teachers = (
            {}
            if teacher is None
            else (dict(teacher) if isinstance(teacher, Mapping) else {"teacher": teacher})
        )
        self.teachers = nn.ModuleDict({k: _freeze(m) for k, m in teachers.items()})
        self.mixture = mixture
        if mixture is not None and len(self.teachers) < 2:
            raise ConfigError("mixture", mixture.mode, "a mixture needs at least two teachers")
        self.terms = list(_unique_names(terms))
        self.input_key, self.label_key = input_key, label_key
        self.teacher_input_key = teacher_input_key or input_key
        self.num_samples = num_samples
        self.epoch = 0.0  # fractional epoch, set by the trainer (term warm-ups, schedules)
        self.total_epochs = 1
        self.last_losses: dict[str, float] = {}
        self.hooks = list(hooks)
        self.projectors = nn.ModuleDict()
        self.loss_modules = nn.ModuleDict()
        self._ctx: dict[str, set[str]] = {}
        self._s_cap = Capture(student, self._tap_map(self.terms, "student"), "student tap")
        for t in self.terms:
            if t.teacher:
                self._teacher_of(t)  # every teacher-side term names a teacher that exists
        self._t_caps: dict[str, Capture | dict[str, Tap]] = {}
        for name, model in self.teachers.items():
            terms_here = [t for t in self.terms if t.teacher and self._teacher_of(t) == name]
            taps = self._tap_map(terms_here, "teacher")
            if mixture is not None:
                taps.setdefault(LOGITS, Tap(LOGITS))
            if getattr(model, "is_store", False):
                for key in taps:
                    if key not in model.taps:
                        raise ConfigError(
                            "terms.teacher",
                            key,
                            f"not in the teacher store "
                            f"{model.path}; stored taps: {', '.join(model.taps)}",
                        )
                self._t_caps[name] = taps
            else:
                self._t_caps[name] = Capture(model, taps, "teacher tap")
        self.built = False

    # -- construction -------------------------------------------------------------------
    @staticmethod
    def _tap_map(terms, side: str) -> dict[str, Tap]:
        return {str(tap): tap for t in terms for tap in getattr(t, side)}

    def _teacher_of(self, term: Term) -> str:
        if not self.teachers:
            raise ConfigError(
                f"terms.{term.name}.teacher",
                str(term.teacher[0]),
                "this term needs a teacher, but the distiller has none",
            )
        mix = self.mixture.name if self.mixture is not None else None
        if term.teacher_model is None and mix:
            term.teacher_model = mix  # with a mixture, teacher-side terms read the mixture
        if term.teacher_model is not None and term.teacher_model == mix:
            if [str(t) for t in term.teacher] != [LOGITS]:
                raise ConfigError(
                    f"terms.{term.name}.teacher",
                    [str(t) for t in term.teacher],
                    "a mixture provides only 'logits'; tap one teacher by name "
                    "(teacher_model) for features",
                )
            return mix
        if term.teacher_model is None:
            if len(self.teachers) > 1:
                raise ConfigError(
                    f"terms.{term.name}.teacher_model",
                    None,
                    f"choose one of {', '.join(self.teachers)}",
                )
            return next(iter(self.teachers))
        if term.teacher_model not in self.teachers:
            raise ConfigError(
                f"terms.{term.name}.teacher_model",
                term.teacher_model,
                f"allowed: {', '.join([*self.teachers, *([mix] if mix else [])])}",
            )
        return term.teacher_model

    @torch.no_grad()
    def build(self, batch: Mapping) -> Distiller:
        """Dry run on ``batch``: infer shapes, build projectors and stateful losses."""
        if self.built:
            return self
        was_training = self.student.training
        self.student.eval()
        try:
            s_vals, t_vals = self._capture(batch)
            self._mix(t_vals, batch)
        finally:
            self.student.train(was_training)
        device = next(self.student.parameters()).device
        for term in self.terms:
            s = [s_vals[str(tap)] for tap in term.student]
            t = [t_vals[(self._teacher_of(term), str(tap))] for tap in term.teacher]
            if term.projector:
                if term.multi or len(t) != 1:
                    raise ConfigError(
                        f"terms.{term.name}.projector",
                        term.projector,
                        "projectors bridge one student tap to one teacher tap",
                    )
                if callable(term.projector):  # a method's own factory (s_shape, t_shape)
                    proj = term.projector(_shape(s[0]), _shape(t[0]), **term.projector_params)
                else:
                    proj = P.build(
                        term.projector,
                        _shape(s[0]),
                        _shape(t[0]),
                        f"terms.{term.name}.projector",
                        **term.projector_params,
                    )
                self.projectors[term.name] = proj.to(device)
                s = [proj.eval()(s[0])]
            if term.stateful:
                shapes = ([tuple(x.shape) for x in s], [tuple(x.shape) for x in t])
                if not term.multi:
                    shapes = (shapes[0][0], shapes[1][0] if shapes[1] else None)
                mod = term.fn(*shapes, num_samples=self.num_samples, **term.params)
                self.loss_modules[term.name] = mod.to(device)
            else:
                params = inspect.signature(term.fn).parameters
                self._ctx[term.name] = {k for k in ("y", "idx") if k in params}
                self._score(term, s, t, batch)  # fail now on incompatible shapes
        self.train(self.training)
        self.built = True
        return self

    # -- the step -----------------------------------------------------------------------
    def _capture(self, batch):
        self._s_cap.clear()
        self._s_cap.active = True
        try:
            logits = self.student(batch[self.input_key])
        finally:
            self._s_cap.active = False
        s_vals = {k: self._s_cap.get(k) for k in self._s_cap.taps}
        s_vals[None] = logits
        return s_vals, self.teacher_signals(batch)

    @torch.no_grad()
    def teacher_signals(self, batch) -> dict[tuple[str, str], torch.Tensor]:
        """Every teacher tap's value for ``batch``, keyed ``(teacher name, tap)``: run online
        (frozen, no grad) or looked up by ``batch["idx"]`` in a teacher store."""
        out = {}
        device = batch[self.input_key].device
        for name, model in self.teachers.items():
            cap = self._t_caps[name]
            if getattr(model, "is_store", False):
                if "idx" not in batch:
                    raise ConfigError("batch", sorted(batch), "a teacher store needs batch['idx']")
                out.update({(name, k): model.lookup(batch["idx"], k).to(device) for k in cap})
                continue
            if not cap.taps:
                continue
            cap.clear()
            cap.active = True
            try:
                model(batch[self.teacher_input_key])
            finally:
                cap.active = False
            out.update({(name, k): cap.get(k) for k in cap.taps})
        return out

    def _mix(self, t_vals: dict, batch) -> torch.Tensor | None:
        """Add the mixture's target to ``t_vals``; return its auxiliary (router) loss."""
        if self.mixture is None:
            return None
        if not self.mixture.members:
            first = t_vals[(next(iter(self.teachers)), LOGITS)]
            self.mixture.setup(list(self.teachers), first.shape[1])
            self.mixture.to(first.device)
        logits = {n: t_vals[(n, LOGITS)] for n in self.teachers}
        mixed, _, aux = self.mixture(logits, batch.get(self.label_key))
        t_vals[(self.mixture.name, LOGITS)] = mixed.detach()
        return aux

    def _score(self, term: Term, s: list, t: list, batch) -> torch.Tensor:
        one = lambda xs: xs if term.multi else (xs[0] if xs else None)  # noqa: E731
        if term.stateful:
            return self.loss_modules[term.name](
                one(s), one(t), y=batch.get(self.label_key), idx=batch.get("idx")
            )
        ctx = {"y": batch.get(self.label_key), "idx": batch.get("idx")}
        kwargs = {k: ctx[k] for k in self._ctx[term.name]}
        return term.fn(one(s), one(t), **kwargs, **term.params)

    def forward(self, batch: Mapping) -> Output:
        if not self.built:
            self.build(batch)
        s_vals, t_vals = self._capture(batch)
        aux = self._mix(t_vals, batch)
        losses, total = {}, 0.0
        if aux is not None and self.training:
            losses["mixture_router"] = aux
            total = total + aux
        for term in self.terms:
            s = [s_vals[str(tap)] for tap in term.student]
            t = [t_vals[(self._teacher_of(term), str(tap))] for tap in term.teacher]
            if term.name in self.projectors:
                s = [self.projectors[term.name](s[0])]
            value = self._score(term, s, t, batch)
            losses[term.name] = value
            total = total + term.weight_at(self.epoch) * value
        if self.training:
            self.last_losses = {k: v.detach() for k, v in losses.items()}
        return Output(logits=s_vals[None], losses=losses, total=total)

    def on_step(self) -> None:
        """Called by the trainer after every optimiser step: methods' schedules (e.g. TAID's
        adaptive interpolation) live in loss modules' or recipes' ``on_step(distiller)``."""
        for mod in list(self.loss_modules.values()) + list(self.projectors.values()):
            if hasattr(mod, "on_step"):
                mod.on_step(self)
        for hook in self.hooks:
            hook(self)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.teachers.values():
            m.eval()
        return self

    # -- state --------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything a checkpoint needs: student, projectors, loss state; no teachers."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teachers.")}

    def load_trainable_state(self, state: Mapping[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(dict(state), strict=False)
        missing = [k for k in missing if not k.startswith("teachers.")]
        if missing or unexpected:
            raise ConfigError(
                "checkpoint",
                f"{len(missing)} missing / {len(unexpected)} unexpected keys",
                f"must match this distiller (first missing: {missing[:3]}, "
                f"unexpected: {unexpected[:3]})",
            )

    def clean_student(self) -> nn.Module:
        """A deep copy of the student with no hooks, projectors or teacher attached."""
        self._s_cap.remove()
        try:
            student = copy.deepcopy(self.student)
        finally:
            self._s_cap = Capture(self.student, self._s_cap.taps, "student tap")
        return student

    def export(self, path: str | os.PathLike | None = None) -> nn.Module:
        """The clean student; with ``path``, also its weights as safetensors (keys equal
        ``student.state_dict()`` keys)."""
        student = self.clean_student()
        if path is not None:
            from .io import save_weights

            save_weights(student.state_dict(), path)
        return student

    def extra_repr(self) -> str:
        return "\n".join(repr(t) for t in self.terms)


def _unique_names(terms: Sequence[Term]):
    seen: dict[str, int] = {}
    for t in terms:
        if not isinstance(t, Term):
            raise ConfigError("terms", t, "a list of crossdistill.Term")
        n = seen.get(t.name, 0)
        seen[t.name] = n + 1
        if n:
            t.name = f"{t.name}_{n + 1}"
        yield t
