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
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from . import losses as _losses  # noqa: F401  (registers the losses)
from . import projectors as P
from . import tasks as _tasks
from .adapters import ModelIO, select
from .context import FIELDS as CONTEXT_FIELDS
from .context import LOSS_CONTEXT, Context, at_dims, masked_mean
from .errors import ConfigError, describe
from .prepare import TEACHER_PREFIX
from .registry import LOSSES
from .signals import STORE_ONLY
from .taps import LOGITS, OUTPUT, Capture, Tap, resolve

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
    ``weight`` defaults to the loss's recommended weight; ``begin`` keeps it at 0 until that
    epoch; ``warmup`` then ramps it linearly from 0 over that many epochs (DKD).
    ``teacher_model`` picks one of several named teachers.
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
        begin: float = 0.0,
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
            teacher = None if label_only else meta.get("teacher_tap", LOGITS)
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
        if begin < 0:
            raise ConfigError(f"terms.{loss}.begin", begin, "must be >= 0 epochs")
        self.begin = float(begin)
        self.teacher_model = teacher_model
        self.params = params
        self.name = name or loss
        self.field = f"terms.{self.name}"  # where errors point; the config sets terms.<i>
        self.label_only = label_only
        self.sums = meta.get("reduction") == "sum"  # returns a sum: the Term divides it
        self.counter = meta.get("count")  # ctx -> what the sum runs over (default: the mask)
        self._check_params()
        # losses that need a label per position (ce, dkd) average over the labelled ones
        y_param = None if self.stateful else inspect.signature(self.fn).parameters.get("y")
        self.needs_labels = label_only or (
            y_param is not None and y_param.default is inspect.Parameter.empty
        )

    def _check_params(self) -> None:
        """The loss's hyper-parameters (and a named projector's) against their signatures:
        names, types, ranges (:mod:`crossdistill.schema`), before anything is built."""
        from . import schema
        from .registry import PROJECTORS

        field = f"terms.{self.name}"
        if self.teacher == [] and not self.label_only and not schema.teacher_optional(self.fn):
            raise ConfigError(
                f"{field}.teacher", None, f"loss {self.loss!r} compares the student with a "
                "teacher tap; give one (default: logits) or use a label-only loss such as ce"
            )
        self.params = schema.check(
            self.fn, self.params, field, f"loss {self.loss!r}",
            skip=LOSS_CONTEXT, positional=2,
        )
        if self.projector_params and isinstance(self.projector, str) and self.projector != "auto":
            self.projector_params = schema.check(
                PROJECTORS.get(self.projector, f"{field}.projector"), self.projector_params,
                f"{field}.projector_params", f"projector {self.projector!r}", positional=2,
            )

    def weight_at(self, epoch: float) -> float:
        if epoch < self.begin:  # off until then (MMANet's begin_epoch), then the warm-up
            return 0.0
        if self.warmup <= 0:
            return self.weight
        return self.weight * min(1.0, (epoch - self.begin) / self.warmup)

    def reduce(self, value: torch.Tensor, ctx: Context) -> torch.Tensor:
        """Per-position values -> the term's scalar: the mean over the context's mask, and for
        losses that need a label per position (``ce``, ``dkd``) over the positions that have
        one; divided by ``ctx.counts[name]`` instead of the local count when the trainer
        normalises over the global batch. Scalars pass through."""
        count = ctx.counts.get(self.name) if ctx.counts is not None else None
        if self.sums:  # a sum over the masked positions (a tiled loss): only the division
            if count is None:
                ref = ctx.mask if ctx.mask is not None else ctx.y
                count = self.count(ctx, ref.shape).clamp_min(1).to(value.device)
            return value / count
        if value.dim() == 0:
            return value
        return masked_mean(value, self._valid(ctx, value.shape), self.field, count)

    def _valid(self, ctx: Context, shape: torch.Size) -> torch.Tensor | None:
        valid = ctx.mask
        if self.needs_labels and ctx.y is not None and ctx.y.shape == shape:
            labelled = ctx.y != -100
            valid = labelled if valid is None else valid & labelled
        return valid

    def count(self, ctx: Context, shape: torch.Size) -> torch.Tensor:
        """How many positions :meth:`reduce` averages over for values of ``shape``."""
        if self.counter is not None:
            return self.counter(ctx).float()
        valid = self._valid(ctx, shape)
        if valid is None:
            return torch.tensor(float(shape.numel()))
        return at_dims(valid, shape, self.field).sum().float()

    def __repr__(self) -> str:
        t = [str(x) for x in self.teacher] or "labels"
        return f"Term({self.name}: {[str(x) for x in self.student]} -> {t}, w={self.weight})"


@dataclass
class Output:
    """One step's result: the student's logits (class axis last), each term's loss, their
    weighted sum, and the batch as the losses saw it (after the ``prepare`` stages)."""

    logits: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    total: torch.Tensor | None = None
    batch: Mapping | None = None


def _first_call(io: ModelIO, model: nn.Module, batch: Mapping, **flags):
    """The dry run's call: a model that cannot take the data (inputs it has no argument for,
    a channel or size mismatch) fails here, before training, as one line naming its field."""
    try:
        return io.call(model, batch, **flags)
    except ConfigError:
        raise
    except (TypeError, RuntimeError, ValueError, IndexError, KeyError) as err:
        shapes = {k: tuple(v.shape) for k, v in batch.items() if torch.is_tensor(v)}
        raise ConfigError(
            io.field,
            type(model).__name__,
            f"cannot run on the data's first batch {shapes} ({describe(err, 300)}); "
            f"check its inputs (adapter), sizes (img_size, in_channels) and the data",
        ) from None


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

    ``task`` (a :class:`~crossdistill.tasks.Task` or its name; default classification) says
    which batch key holds the targets, which positions count, and the models' default
    inputs. ``io`` / ``teacher_io`` (a :class:`~crossdistill.adapters.ModelIO`, a dict of its
    arguments, or per teacher a dict of those) say how each model is called and where its
    logits are. ``prepare`` stages (see :mod:`crossdistill.prepare`) transform each training
    batch before the forward, seeded by the run's seed and step.

    Inside your own loop: ``out = distiller(batch); out.total.backward()``, and tell it where
    training stands with :meth:`set_progress` (term warm-ups and schedules read it).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | Mapping[str, nn.Module] | None = None,
        terms: Sequence[Term] = (),
        *,
        task=None,
        io=None,
        teacher_io=None,
        num_samples: int | None = None,
        hooks: Sequence[Callable[[Distiller], None]] = (),
        mixture: nn.Module | None = None,
        prepare: Sequence = (),
        seed: int = 0,
        data=None,
    ):
        super().__init__()
        self.data = data  # the training Dataset, for stateful losses that read it (tokenizers)
        self.task = _tasks.build(task)
        if not terms:
            terms = self.task.default_terms()
        if not terms:
            raise ConfigError(
                "terms", [], f"task {self.task.name!r} has no default terms: give some"
            )
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
        self.io = self._io(io, "student")
        per_teacher = (  # {teacher name: spec}, or one spec for every teacher
            isinstance(teacher_io, Mapping) and teacher_io and set(teacher_io) <= set(self.teachers)
        )
        per = teacher_io if per_teacher else None
        self.teacher_io = {
            n: self._io(per.get(n) if per is not None else teacher_io, f"teachers.{n}")
            for n in self.teachers
        }
        self.num_samples = num_samples
        self.seed = int(seed)
        self.step, self.total_steps, self.steps_per_epoch = 0, None, None
        self.epoch = 0.0  # fractional epoch (term warm-ups, schedules); see set_progress
        self.total_epochs = 1
        self._warned_progress = False
        self._last_losses: dict[str, torch.Tensor] = {}
        self.hooks = list(hooks)
        self.prepare = nn.ModuleList([_prepare_stage(p) for p in prepare])
        self._has_prepare = len(self.prepare) > 0
        self._student_only = any(getattr(p, "student_only", False) for p in self.prepare)
        self._calls = 0  # forwards since the last set_progress (gradient accumulation)
        self.structure_log: list[dict] = []
        self.structure_changed = False
        self.projectors = nn.ModuleDict()
        self.loss_modules = nn.ModuleDict()
        self._ctx: dict[str, set[str]] = {}
        self._dims: dict[str, int] = {}  # per term: dims of its unreduced value (build)
        self._s_out = _output_taps(self.terms, "student")
        self._s_flags = output_flags(student, self._s_out)  # asked once, not per step
        if not any(LOGITS in map(str, t.student) for t in self.terms):
            self._s_flags.update(_no_logits(student))
        for t in self.terms:
            if t.teacher:
                self._teacher_of(t)  # every teacher-side term names a teacher that exists
        self._check_taps()
        self._s_cap = self._student_capture()
        self._t_caps: dict[str, Capture | dict[str, Tap]] = {}
        self._t_out: dict[str, dict[str, Tap]] = {}
        self._t_flags: dict[str, dict] = {}
        self._t_logits: dict[str, bool] = {}
        for name, model in self.teachers.items():
            terms_here = [t for t in self.terms if t.teacher and self._teacher_of(t) == name]
            taps = self._tap_map(terms_here, "teacher", hooked=False)
            self._t_logits[name] = LOGITS in taps or mixture is not None
            self._t_out[name] = _output_taps(terms_here, "teacher")
            self._t_flags[name] = output_flags(model, self._t_out[name])
            if not self._t_logits[name]:
                self._t_flags[name].update(_no_logits(model))
            if getattr(model, "is_store", False):
                if mixture is not None:
                    taps.setdefault(LOGITS, Tap(LOGITS))
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
                hooked = self._tap_map(terms_here, "teacher")
                self._t_caps[name] = Capture(model, hooked, "teacher tap")
        # (name, is a store, must run) per teacher, asked once: getattr on a module is slow
        self._t_plan = [  # (a plain reference per teacher: no nn.Module lookup per step)
            (n, _is_store(m), _is_store(m) or self._needs_call(n), m)
            for n, m in self.teachers.items()
        ]
        self._plan: list[tuple] = []  # per term, resolved by build (see _make_plan)
        self._step_modules: list[nn.Module] = []
        self.built = False

    # -- construction -------------------------------------------------------------------
    def _check_taps(self) -> None:
        """Every hooked tap resolves to a module, or fails naming its term's field
        (``terms.1.student``) and the nearest valid paths."""
        for t in self.terms:
            sides = [("student", self.student)]
            owner = self._teacher_of(t) if t.teacher else None
            if owner in self.teachers:  # (a mixture's signals are not hooked)
                sides.append(("teacher", self.teachers[owner]))
            for side, model in sides:
                if getattr(model, "is_store", False):
                    continue
                for tap in getattr(t, side):
                    if side == "teacher" and str(tap) in STORE_ONLY:
                        raise ConfigError(
                            f"{t.field}.teacher", str(tap), f"a signal of a "
                            f"{STORE_ONLY[str(tap)]}; an online teacher gives its full "
                            "logits: use fkl / jsd with teacher: logits",
                        )
                    if str(tap) != LOGITS and tap.path != OUTPUT:
                        resolve(model, tap, f"{getattr(t, 'field', t.name)}.{side}")

    @staticmethod
    def _tap_map(terms, side: str, hooked: bool = True) -> dict[str, Tap]:
        """Taps of one side; ``hooked``: only those a forward hook captures (not the logits,
        which the adapter reads, nor ``output...`` selections of the model's return value)."""
        taps = {str(tap): tap for t in terms for tap in getattr(t, side)}
        if hooked:
            taps = {k: v for k, v in taps.items() if k != LOGITS and v.path != OUTPUT}
        return taps

    def _student_capture(self) -> Capture:
        return Capture(self.student, self._tap_map(self.terms, "student"), "student tap")

    def _io(self, spec, field: str) -> ModelIO:
        io = ModelIO.parse(copy.copy(spec) if isinstance(spec, ModelIO) else spec, field)
        return io.with_defaults(self.task.inputs, self.task.class_dim)

    def _teacher_of(self, term: Term) -> str:
        if not self.teachers:
            raise ConfigError(
                f"{term.field}.teacher",
                str(term.teacher[0]),
                "this term needs a teacher, but the distiller has none",
            )
        mix = self.mixture.name if self.mixture is not None else None
        if term.teacher_model is None and mix:
            term.teacher_model = mix  # with a mixture, teacher-side terms read the mixture
        if term.teacher_model is not None and term.teacher_model == mix:
            if [str(t) for t in term.teacher] != [LOGITS]:
                raise ConfigError(
                    f"{term.field}.teacher",
                    [str(t) for t in term.teacher],
                    "a mixture provides only 'logits'; tap one teacher by name "
                    "(teacher_model) for features",
                )
            return mix
        if term.teacher_model is None:
            if len(self.teachers) > 1:
                raise ConfigError(
                    f"{term.field}.teacher_model",
                    None,
                    f"choose one of {', '.join(self.teachers)}",
                )
            return next(iter(self.teachers))
        if term.teacher_model not in self.teachers:
            raise ConfigError(
                f"{term.field}.teacher_model",
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
        batch = self._build_batch(batch)
        self.io.check_batch(batch)
        self.task.check_batch(batch)  # e.g. evaluation views' keys
        for name, io in self.teacher_io.items():
            if not getattr(self.teachers[name], "is_store", False) and self._needs_call(name):
                io.check_batch(batch)
        try:
            s_vals, t_vals = self._capture(batch, check=True)
            self._mix(t_vals, batch)
        finally:
            self.student.train(was_training)
        device = next(self.student.parameters()).device
        ctx = self.context(batch)  # one context for every term, as in forward
        ref = ctx.mask if ctx.mask is not None else ctx.y
        for term in self.terms:
            s = [s_vals[str(tap)] for tap in term.student]
            t = [t_vals[(self._teacher_of(term), str(tap))] for tap in term.teacher]
            if term.projector:
                if term.multi or len(t) != 1:
                    raise ConfigError(
                        f"{term.field}.projector",
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
                        f"{term.field}.projector",
                        **term.projector_params,
                    )
                self.projectors[term.name] = proj.to(device)
                s = [proj.eval()(s[0])]
            if term.stateful:
                shapes = ([tuple(x.shape) for x in s], [tuple(x.shape) for x in t])
                if not term.multi:
                    shapes = (shapes[0][0], shapes[1][0] if shapes[1] else None)
                extra = {"data": self.data} if _takes_arg(term.fn, "data") else {}
                mod = term.fn(*shapes, num_samples=self.num_samples, **extra, **term.params)
                self.loss_modules[term.name] = mod.to(device)
                # dry-run a copy: the shapes fail now, the live state and the random
                # stream (a memory bank draws negatives) are left untouched
                cuda = [device] if device.type == "cuda" else []
                with torch.random.fork_rng(devices=cuda):
                    value = _at_term(term, self._raw, term, s, t, ctx, copy.deepcopy(mod))
            else:
                params = inspect.signature(term.fn).parameters
                self._ctx[term.name] = {k for k in CONTEXT_FIELDS if k in params}
                value = _at_term(term, self._raw, term, s, t, ctx)
            term.reduce(value, ctx)
            self._dims[term.name] = ref.dim() if term.sums and ref is not None else value.dim()
        for stage in self.prepare:  # e.g. onpolicy: prompt vs block, context lengths, tokenizer
            check = getattr(stage, "check", None)
            if check is not None:
                check(self, batch)
        self.train(self.training)
        self._make_plan()
        self.built = True
        return self

    def _build_batch(self, batch: Mapping) -> Mapping:
        """The dry run's batch: the ``in_build`` prepare stages applied (fixed seed; the
        run's own prepare draws and counters are untouched)."""
        stages = [s for s in self.prepare if getattr(s, "in_build", False)]
        if not stages:
            return batch
        batch = dict(batch)
        gen = torch.Generator(next(iter(batch.values())).device).manual_seed(0)
        for stage in stages:
            batch = stage(batch, PrepareState(self, gen))
        return batch

    def _make_plan(self) -> None:
        """What each step needs, resolved once after a build rather than on every step: per
        term its tap keys and projector; the loss modules and projectors with ``on_step``."""
        self._plan = [
            (
                term,
                [str(tap) for tap in term.student],
                [(self._teacher_of(term), str(tap)) for tap in term.teacher],
                self.projectors[term.name] if term.name in self.projectors else None,
            )
            for term in self.terms
        ]
        mods = [*self.loss_modules.values(), *self.projectors.values()]
        self._step_modules = [m for m in mods if hasattr(m, "on_step")]

    # -- the step -----------------------------------------------------------------------
    def run_model(
        self, model, io: ModelIO, cap: Capture, out_taps: dict, flags: dict, batch, check=False
    ):
        """Call one model through its adapter with its hooks armed (``flags``: the HF output
        flags its ``output.*`` taps need); returns its tap values (``"logits"`` = the
        adapter's logits, class axis last)."""
        call = _first_call if check else ModelIO.call
        if cap.taps:
            cap.clear()
            cap.active = True
            try:
                out = call(io, model, batch, **flags)
            finally:
                cap.active = False
            vals = {k: cap.get(k) for k in cap.taps}
        else:  # no hook to arm (the logits come from the adapter)
            out, vals = call(io, model, batch, **flags), {}
        vals[LOGITS] = io.check(out) if check else io.logits(out)
        vals.update(select_outputs(out, out_taps, f"{io.field} tap"))
        return vals, out

    def _capture(self, batch, check: bool = False):
        s_vals, _ = self.run_model(
            self.student, self.io, self._s_cap, self._s_out, self._s_flags, batch, check
        )
        s_vals[None] = s_vals[LOGITS]
        return s_vals, self.teacher_signals(batch, check)

    def _needs_call(self, name: str) -> bool:
        """Whether an online teacher must run: some term reads its logits or taps."""
        return bool(self._t_logits[name] or self._t_out[name] or self._t_caps[name].taps)

    @torch.no_grad()
    def teacher_signals(self, batch, check: bool = False) -> dict[tuple[str, str], torch.Tensor]:
        """Every teacher tap's value for ``batch``, keyed ``(teacher name, tap)``: run online
        (frozen, no grad) through its adapter, or looked up by ``batch["idx"]`` in a store.
        Inputs a ``student_only`` prepare stage changed reach the teachers unchanged."""
        if self._student_only:
            n = len(TEACHER_PREFIX)
            kept = {k[n:]: v for k, v in batch.items() if k.startswith(TEACHER_PREFIX)}
            batch = {**batch, **kept} if kept else batch
        out = {}
        for name, store, needed, model in self._t_plan:
            if not needed:
                continue
            cap = self._t_caps[name]
            if store:
                if "idx" not in batch:
                    raise ConfigError("batch", sorted(batch), "a teacher store needs batch['idx']")
                device = next(iter(batch.values())).device
                out.update({(name, k): model.lookup(batch["idx"], k).to(device) for k in cap})
                continue
            vals, _ = self.run_model(
                model,
                self.teacher_io[name],
                cap,
                self._t_out[name],
                self._t_flags[name],
                batch,
                check,
            )
            out.update({(name, k): v for k, v in vals.items()})
        return out

    def context(self, batch) -> Context:
        """What losses may read besides the two taps: targets, the position mask, sample ids."""
        return Context(
            y=self.task.targets(batch),
            mask=self.task.loss_mask(batch),
            idx=batch.get("idx"),
            batch=batch,
        )

    def _mix(self, t_vals: dict, batch) -> torch.Tensor | None:
        """Add the mixture's target to ``t_vals``; return its auxiliary (router) loss."""
        if self.mixture is None:
            return None
        if not self.mixture.members:
            first = t_vals[(next(iter(self.teachers)), LOGITS)]
            self.mixture.setup(list(self.teachers), first.shape[1])
            self.mixture.to(first.device)
        logits = {n: t_vals[(n, LOGITS)] for n in self.teachers}
        mixed, _, aux = self.mixture(logits, self.task.targets(batch))
        t_vals[(self.mixture.name, LOGITS)] = mixed.detach()
        return aux

    def _raw(self, term: Term, s: list, t: list, ctx: Context, mod=None) -> torch.Tensor:
        """The term's loss before reduction (per position, or a scalar)."""
        if not term.multi:
            s, t = s[0], (t[0] if t else None)
        if term.stateful:
            mod = self.loss_modules[term.name] if mod is None else mod
            extra = {"mask": ctx.mask} if getattr(mod, "takes_mask", False) else {}
            if getattr(mod, "takes_batch", False):  # keys beyond the taps (an alignment)
                extra["batch"] = ctx.batch
            return mod(s, t, y=ctx.y, idx=ctx.idx, **extra)
        kwargs = {k: getattr(ctx, k) for k in self._ctx[term.name]}
        return term.fn(s, t, **kwargs, **term.params)

    def _score(self, term: Term, s: list, t: list, ctx: Context) -> torch.Tensor:
        return term.reduce(self._raw(term, s, t, ctx), ctx)

    def token_counts(self, batch: Mapping) -> dict[str, torch.Tensor]:
        """Per term with per-position values: how many positions of ``batch`` (after its
        ``prepare`` stages) its mean runs over. The trainer sums these over an accumulation
        window and all processes and passes them back as ``forward(..., counts=)``, so every
        term is a mean over the valid positions of the global batch; terms that return a
        scalar keep their own reduction."""
        ctx = self.context(batch)
        ref = ctx.mask if ctx.mask is not None else ctx.y
        out = {}
        for term in self.terms:
            d = self._dims.get(term.name, 0)
            if d and ref is not None and ref.dim() >= d:
                out[term.name] = term.count(ctx, ref.shape[:d]).to(ref.device)
        return out

    # -- progress, for the trainer or your own loop ---------------------------------------
    def set_progress(
        self,
        step: int,
        total_steps: int,
        *,
        steps_per_epoch: int | None = None,
        epoch: float | None = None,
    ):
        """Where training stands: optimiser ``step`` of ``total_steps``. Term warm-ups count
        in epochs of ``steps_per_epoch`` steps (default: the whole run is one epoch);
        ``epoch`` gives the fractional epoch directly (the Trainer passes it per micro-batch)."""
        step, total_steps = int(step), int(total_steps)
        d = self.__dict__  # plain attributes, set past nn.Module.__setattr__ (~1 us each)
        if d.get("total_steps") != total_steps or d.get("_per_arg") != steps_per_epoch:
            per = max(steps_per_epoch or total_steps, 1)
            d.update(
                total_steps=total_steps,
                steps_per_epoch=steps_per_epoch or total_steps,
                total_epochs=max(1, round(total_steps / per)),
                _per=per,
                _per_arg=steps_per_epoch,
            )
        if d.get("step") != step:  # micro-batches of one step draw their own prepare seeds
            d["_calls"] = 0
        d["step"] = step
        d["epoch"] = step / d["_per"] if epoch is None else float(epoch)

    def _check_progress(self) -> None:
        if self.total_steps is None and not self._warned_progress:
            ramps = [t.name for t in self.terms if t.warmup > 0]
            if ramps:
                warnings.warn(
                    f"terms {ramps} have a warm-up but the distiller was never told its "
                    "progress: call distiller.set_progress(step, total_steps) each step "
                    "(the Trainer does); until then they use epoch 0",
                    stacklevel=3,
                )
            self._warned_progress = True

    def prepare_batch(self, batch: Mapping) -> dict:
        """Run the ``prepare`` stages (training only), each seeded by (seed, stage, step,
        call), so a resumed run draws exactly what an uninterrupted one would."""
        if not self.__dict__["_has_prepare"] or not self.training:
            return batch
        batch = dict(batch)
        dev = next(iter(batch.values())).device
        for i, stage in enumerate(self.prepare):
            seed = ((self.seed * 1_000_003 + i) * 100_003 + self.step) * 101 + self._calls
            gen = torch.Generator(dev).manual_seed(seed % (2**63))
            before = dict(batch) if getattr(stage, "student_only", False) else None
            batch = stage(batch, PrepareState(self, gen))
            if before is not None:  # the teachers keep what this stage changed
                for k, v in before.items():
                    if batch.get(k) is not v and TEACHER_PREFIX + k not in batch:
                        batch[TEACHER_PREFIX + k] = v
        self._calls += 1
        return batch

    # -- structure events -------------------------------------------------------------------
    def apply_structure(self, op: str, *, drop_terms: Sequence[str] = (), **args) -> None:
        """Change the student's structure with a registered structure op (pruning, dropping
        layers, ...). The op is logged, so a resumed run replays it before loading weights;
        the trainer then rebuilds the optimiser and the projectors. ``drop_terms``: terms
        that end with this event (their taps go with it, e.g. pruning gates removed by the
        final prune)."""
        from .structure import apply

        names = {t.name for t in self.terms}
        bad = [n for n in drop_terms if n not in names]
        if bad:
            raise ConfigError("structure.drop_terms", bad, f"names of terms: {sorted(names)}")
        apply(self.student, op, args)
        gone = set(drop_terms)
        self.terms = [t for t in self.terms if t.name not in gone]
        self.structure_log.append({"op": op, **args, **({"drop_terms": list(drop_terms)}
                                                          if drop_terms else {})})
        self.structure_changed = True

    def replay_structure(self, log: Sequence[Mapping]) -> None:
        """Re-apply a checkpoint's logged structure events to a freshly built student."""
        for event in log:
            self.apply_structure(**event)

    def rebuild(self, batch: Mapping) -> None:
        """After a structure event: re-create hooks, projectors and stateful losses."""
        self._s_cap.remove()
        self._s_cap = self._student_capture()
        self.projectors = nn.ModuleDict()
        self.loss_modules = nn.ModuleDict()
        self.built = False
        self.build(batch)
        self.structure_changed = False

    def forward(
        self, batch: Mapping, *, prepared: bool = False, counts: Mapping | None = None
    ) -> Output:
        """One step's losses. ``prepared``: the ``prepare`` stages already ran on ``batch``
        (the trainer runs them for a whole window first, to count its tokens); ``counts``:
        each term's divisor (see :meth:`token_counts`), default the local count."""
        if not self.built:
            self.build(batch)
        if not self._warned_progress:
            self._check_progress()
        if not prepared:
            batch = self.prepare_batch(batch)
        ctx = self.context(batch)
        if counts is not None:
            ctx.counts = counts
        s_vals, t_vals = self._capture(batch)
        aux = self._mix(t_vals, batch)
        losses, total = {}, None
        if aux is not None and self.training:
            losses["mixture_router"] = total = aux
        epoch = self.epoch
        for term, s_keys, t_keys, proj in self._plan:
            s = [s_vals[k] for k in s_keys]
            t = [t_vals[k] for k in t_keys]
            if proj is not None:
                s = [proj(s[0])]
            value = losses[term.name] = self._score(term, s, t, ctx)
            w = term.weight_at(epoch)
            part = value if w == 1.0 else w * value  # x * 1.0 is x: same numbers, one op less
            total = part if total is None else total + part
        if self.training:
            self.__dict__["_last_losses"] = losses  # detached only when read
        return Output(logits=s_vals[None], losses=losses, total=total, batch=batch)

    @property
    def last_losses(self) -> dict[str, torch.Tensor]:
        """Each term's loss in the last training forward, detached (for hooks and tests)."""
        return {k: v.detach() for k, v in self._last_losses.items()}

    def on_step(self) -> None:
        """Called by the trainer after every optimiser step: methods' schedules (e.g. TAID's
        adaptive interpolation) live in loss modules' or recipes' ``on_step(distiller)``."""
        for mod in self._step_modules:
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

    def close(self) -> None:
        """Remove the tap hooks this distiller installed on the student and the teachers (a
        finished stage handing its models on to the next one); it cannot run afterwards."""
        self._s_cap.remove()
        for cap in self._t_caps.values():
            if isinstance(cap, Capture):
                cap.remove()
        self.built = False

    def clean_student(self) -> nn.Module:
        """A deep copy of the student with no hooks, projectors or teacher attached."""
        self._s_cap.remove()
        try:
            student = copy.deepcopy(self.student)
        finally:
            self._s_cap = self._student_capture()
        return student

    def export(self, path: str | os.PathLike | None = None) -> nn.Module:
        """The clean student; with ``path``, also its weights as safetensors (keys equal
        ``student.state_dict()`` keys)."""
        student = self.clean_student()
        if path is not None:
            from .io import save_weights

            save_weights(student.state_dict(), path)
            if hasattr(student, "save_pretrained"):  # a Hugging Face student: also its own format
                from .models.hf import export_hf

                export_hf(student, str(os.fspath(path)).removesuffix(".safetensors") + "_hf")
        return student

    def extra_repr(self) -> str:
        return "\n".join(repr(t) for t in self.terms)


def _at_term(term: Term, fn, *args):
    """``fn(*args)`` for the dry run: a loss's own error names its field the way the loss
    knows it (``alm.teacher``, ``terms.alm``); it is re-raised at the term's place in the
    config (``terms.1.teacher``), so every error points where the user can fix it."""
    try:
        return fn(*args)
    except ConfigError as err:
        for prefix in (f"terms.{term.loss}", f"terms.{term.name}", term.loss):
            rest = err.field[len(prefix):]
            if err.field.startswith(prefix) and rest[:1] in ("", ".") and term.field != prefix:
                raise ConfigError(term.field + rest, err.value, err.allowed) from None
        raise


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


class PrepareState:
    """What a prepare stage may read: the distiller (its student, teachers, step) and a
    generator seeded for this call."""

    def __init__(self, distiller: Distiller, generator: torch.Generator):
        self.distiller, self.generator = distiller, generator

    @property
    def step(self) -> int:
        return self.distiller.step


def _prepare_stage(spec):
    from .prepare import build_stage

    return build_stage(spec)


def _is_store(model) -> bool:
    return bool(getattr(model, "is_store", False))


def _output_taps(terms, side: str) -> dict[str, Tap]:
    return {str(tap): tap for t in terms for tap in getattr(t, side) if tap.path == OUTPUT}


def select_outputs(out, out_taps: Mapping[str, Tap], field: str) -> dict[str, torch.Tensor]:
    """The tensors that ``output.*`` taps select from a model's return value."""
    vals = {}
    for key, tap in out_taps.items():
        v = select(out, tap.select, f"{field} {key!r}")
        if not torch.is_tensor(v):
            raise ConfigError(field, key, f"selects a {type(v).__name__}, not a tensor "
                              "(HF: attentions need attn_implementation: eager)")
        vals[key] = v
    return vals


def output_flags(model: nn.Module, out_taps: Mapping[str, Tap]) -> dict:
    """Ask a model for hidden states / attentions when a tap selects them, if its forward
    takes the Hugging Face flag (other models return such fields themselves or not at all)."""
    flags = {}
    for tap in out_taps.values():
        first = str(tap.select).split(".")[0]
        flag = {"hidden_states": "output_hidden_states", "attentions": "output_attentions"}.get(
            first
        )
        if flag and _takes(model, flag):
            flags[flag] = True
    return flags


def _no_logits(model: nn.Module) -> dict:
    """When no term reads a model's logits (a tiled loss runs its output layer on hidden
    states itself), ask a Hugging Face LM for the last position's only, so the full
    ``B x L x V`` logits are never built in training."""
    takes = "logits_to_keep" in inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if takes else {}


def _takes_arg(cls, arg: str) -> bool:
    target = cls.__init__ if inspect.isclass(cls) else cls
    return arg in inspect.signature(target).parameters


def _takes(model: nn.Module, arg: str) -> bool:
    params = inspect.signature(model.forward).parameters
    return arg in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
