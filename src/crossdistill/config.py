"""YAML run configs, validated by pydantic models that mirror the Python API one to one.

``teacher``/``student`` -> ``models.create`` (+ ``checkpoint``), ``data`` -> ``data.load``,
``terms`` -> :class:`Term`, ``train`` -> :class:`TrainConfig`. Nothing is declared twice:
the ``train`` section is derived from the :class:`TrainConfig` dataclass, and every loss's,
method's, projector's, model's, task's, stage's and data source's hyper-parameters are
checked against its own signature (:mod:`crossdistill.schema`). Validation turns every
problem into one :class:`ConfigError` naming the field as written (``terms.1.temperature``),
the value and what is allowed, before any data is read or model built.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from . import schema
from .context import LOSS_CONTEXT
from .errors import ConfigError
from .registry import DATASETS, LOSSES, METHODS, MODELS, PREPARES, PROJECTORS, TASKS
from .train.config import FROM_DATA, TrainConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


IO_KEYS = ("inputs", "logits", "class_dim")
Weight = Annotated[float, Field(ge=0, le=schema.MAX_FLOAT)]


def _relative(field: str, err: ConfigError) -> ConfigError:
    """Re-root an error raised by :func:`schema.check` under ``field`` for the pydantic loc."""
    rest = err.field[len(field) :].lstrip(".") if err.field.startswith(field) else err.field
    return schema.relative(rest, err.value, err.allowed)


def _check(fn, params: dict, what: str, at: str = "", **kw) -> dict:
    """:func:`schema.check` inside a validator: the error is relative to the validated model
    (``at``: the key the parameters sit under, e.g. ``projector_params``)."""
    try:
        return schema.check(fn, params, f"@.{at}" if at else "@", what, **kw)
    except ConfigError as err:
        raise _relative("@", err) from None


def plain_name(v: str | None) -> str | None:
    """Run names become directories under runs/: a plain file name, nothing else."""
    if v is None:
        return v
    if not v or "/" in v or "\\" in v or v.startswith(".") or "\0" in v or len(v) > 200:
        raise ValueError(
            "a plain file name (no path separators, no leading dot, at most 200 characters);"
            " use out_dir for another location"
        )
    return v


class ModelSpec(BaseModel):
    """A model: a zoo model (``model`` = its registered name, other keys its arguments), or a
    Hugging Face model (``hf`` = a model type built from ``config`` with random weights, or
    ``hf_path`` = a local directory for ``from_pretrained``). ``inputs`` / ``logits`` /
    ``class_dim`` are its adapter (see :class:`crossdistill.adapters.ModelIO`)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    model: str | None = None
    checkpoint: str | None = None
    hf: str | None = None
    hf_path: str | None = None
    config: dict[str, Any] | None = None
    head: str = "causal_lm"
    attn_implementation: str = "sdpa"
    inputs: str | list[str] | dict[str, str] | None = None
    logits: int | str | list[int | str] | None = None
    class_dim: int | None = Field(None, ge=-8, le=8)

    @field_validator("model")
    @classmethod
    def _known(cls, v):
        if v is not None:
            MODELS.get(v, "model")
        return v

    @model_validator(mode="after")
    def _params(self):
        if self.model is not None and self.model_extra:
            checked = _check(MODELS.get(self.model), self.model_extra, f"model {self.model!r}")
            self.model_extra.update(checked)
        return self

    def kind(self, field: str) -> str:
        given = [k for k in ("model", "hf", "hf_path") if getattr(self, k)]
        if len(given) != 1:
            raise ConfigError(
                field, given or None, "give exactly one of model (zoo), hf (HF type) or hf_path"
            )
        return given[0]

    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def io(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in IO_KEYS if getattr(self, k) is not None}


class TeacherSpec(ModelSpec):
    """A teacher: a zoo model + ``checkpoint`` (run online), or ``store`` (precomputed signals,
    see ``crossdistill cache-teacher``), or both (the store is then checked against it)."""

    store: str | None = None
    from_config: str | None = None  # a teacher YAML config, trained once and cached by hash


class MixtureSpec(_Strict):
    mode: Literal["fixed", "entropy", "true_class", "router"] = "fixed"
    weights: dict[str, Weight] | None = None
    tau: float = Field(1.0, gt=0, le=1e3)
    space: Literal["prob", "logit"] = "prob"
    router_hidden: int = Field(32, ge=1, le=8192)


class AugmentSpec(_Strict):
    shift: int = Field(0, ge=0, le=8, description="random shift of up to this many pixels")
    flip: bool = Field(False, description="random horizontal flip")


# the functions a split-level source forwards ``**params`` to, and what it fills itself
_SOURCE_PARAMS = {
    "shakespeare": ("crossdistill.data.text_source:shakespeare_split", ("root",)),
    "shakespeare_pair": ("crossdistill.data.text_pair:shakespeare_pair_split", ("root",)),
    "canvas": ("crossdistill.data.canvas:canvas_dataset", ("n", "root", "seed")),
    "detection-canvas": ("crossdistill.data.detection:detection_dataset", ("n", "root", "seed")),
    "fewshot-canvas": ("crossdistill.data.fewshot:fewshot_dataset", ("n", "root", "seed")),
    "av": ("crossdistill.data.av:paired_av", ("mnist_root", "seed")),
}


def check_source_params(name: str, params: dict, field: str = "data.params") -> dict:
    """A data source's ``params`` checked against its signature (and the one it forwards to)."""
    fn = DATASETS.get(name, "data.name")
    what = f"data source {name!r}"
    if not DATASETS.meta(name).get("splits"):
        if params:
            k = next(iter(params))
            raise ConfigError(f"{field}.{k}", params[k], f"{what} takes no params")
        return {}
    own = schema.spec_of(fn, frozenset({"root", "split_seed"}), 1)
    mine = {k: v for k, v in params.items() if k in own.fields}
    rest = {k: v for k, v in params.items() if k not in own.fields}
    out = schema.check(fn, mine, field, what, skip=("root", "split_seed"), positional=1)
    target = _SOURCE_PARAMS.get(name)
    if target is None:
        return {**out, **rest}
    mod, _, attr = target[0].partition(":")
    inner = getattr(importlib.import_module(mod), attr)
    allowed = schema.spec_of(inner, frozenset(target[1]), 1).fields
    for k, v in rest.items():
        if k not in allowed:
            names = ", ".join([*own.fields, *allowed])
            raise ConfigError(f"{field}.{k}", v, f"unknown parameter of {what}; allowed: {names}")
    return {**out, **schema.check(inner, rest, field, what, skip=target[1], positional=1)}


class DataSpec(_Strict):
    name: str = Field("digits", description="a registered data source (`crossdistill list "
                      "datasets`)")
    root: str | None = Field(None, description="data directory (default: the source's own; "
                             "MNIST: $CROSSDISTILL_DATA/mnist-t10k)")
    params: dict[str, Any] = Field({}, description="the source's own options (sizes, "
                                   "tokenizer, block, ...)")
    batch_size: int = Field(64, ge=1, le=65_536, description="global training batch size")
    img_size: int | None = Field(None, ge=4, le=1024, description="resize images to this side")
    labelled: int | None = Field(None, ge=1, le=10**9, description="keep labels on this many "
                                 "train samples (the rest -100)")
    split_seed: int = Field(0, ge=0, le=schema.MAX_SEED, description="seed of the fixed "
                            "train/val/test split (independent of train.seed)")
    augment: AugmentSpec = AugmentSpec()

    @field_validator("name")
    @classmethod
    def _known(cls, v):
        DATASETS.get(v, "name")
        return v

    @model_validator(mode="after")
    def _params(self):
        try:
            self.params = check_source_params(self.name, self.params, "@.params")
        except ConfigError as err:
            raise _relative("@", err) from None
        return self


def _multi_tap(fn) -> bool:
    """A stateful loss built from a list of shapes (``s_shapes: list[...]``): multi-level."""
    if not isinstance(fn, type):
        return False
    hint = schema._hints(fn.__init__).get("s_shapes")
    return typing.get_origin(hint) is list


class TermSpec(BaseModel):
    """One term; keys beyond the named ones are the loss's hyper-parameters."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    loss: str = Field(description="a registered loss (`crossdistill list losses`)")
    student: str | list[str] = Field("logits", description="student tap(s): a module path, "
                                     "path:input, logits")
    teacher: str | list[str] | None = Field("default", description="teacher tap(s); default "
                                            "logits, none for label-only losses")
    projector: str | None = Field(None, description="a registered projector or auto")
    projector_params: dict[str, Any] = Field({}, description="the projector's own arguments")
    weight: Weight | None = Field(None, description="term weight (default: the loss's "
                                  "recommended one)")
    warmup: float = Field(0.0, ge=0, le=100_000, description="ramp the weight from 0 over "
                          "this many epochs")
    name: str | None = Field(None, description="the term's name in logs (default: the loss)")
    teacher_model: str | None = Field(None, description="which of teachers.NAME this term reads")

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, v):
        LOSSES.get(v, "loss")
        return v

    @field_validator("projector")
    @classmethod
    def _known_projector(cls, v):
        if v is not None and v != "auto":
            PROJECTORS.get(v, "projector")
        return v

    @model_validator(mode="after")
    def _params(self):
        fn = LOSSES.get(self.loss)
        if self.model_extra:
            checked = _check(
                fn, self.model_extra, f"loss {self.loss!r}", skip=LOSS_CONTEXT, positional=2
            )
            self.model_extra.update(checked)
        if isinstance(self.student, str) and _multi_tap(fn):
            raise schema.relative(
                "student", self.student, f"loss {self.loss!r} takes a list of student taps and a "
                "list of teacher taps (one per stage), e.g. student: [layer2, layer3]"
            )
        if self.teacher is None and LOSSES.meta(self.loss).get("inputs") != "labels":
            if not schema.teacher_optional(fn):
                raise schema.relative(
                    "teacher", None, f"loss {self.loss!r} compares the student with a teacher "
                    "tap; give one (default: logits) or use a label-only loss such as ce"
                )
        if self.projector_params:
            if self.projector in (None, "auto"):
                raise schema.relative(
                    "projector_params", self.projector_params,
                    "name a projector to give it parameters (projector: mlp, ...)"
                )
            self.projector_params = _check(
                PROJECTORS.get(self.projector),
                self.projector_params,
                f"projector {self.projector!r}",
                "projector_params",
                positional=2,
            )
        return self


class MethodSpec(BaseModel):
    """A registered method (recipe); keys beyond ``name`` are its hyper-parameters."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    name: str

    @field_validator("name")
    @classmethod
    def _known(cls, v):
        from . import methods  # noqa: F401  (registers)

        METHODS.get(v, "name")
        return v

    @model_validator(mode="after")
    def _params(self):
        if self.model_extra:
            fn = METHODS.get(self.name)
            self.model_extra.update(
                _check(fn, self.model_extra, f"method {self.name!r}", positional=2)
            )
        return self

    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


def _named(spec, registry, field: str, default: str | None = None):
    """``name`` or ``{name: ..., **params}`` of ``registry`` checked against its signature."""
    if isinstance(spec, str) or spec is None:
        name, params = spec or default, {}
    else:
        params = {k: v for k, v in spec.items() if k != "name"}
        name = spec.get("name", default)
    if not isinstance(name, str):
        raise schema.relative(f"{field}name", name, f"a registered name: {', '.join(registry)}")
    fn = registry.get(name, f"{field}name")
    checked = _check(fn, params, f"{registry.singular} {name!r}")
    return spec if isinstance(spec, str) or spec is None else {"name": name, **checked}


class _TrainBase(_Strict):
    @field_validator("log", mode="before", check_fields=False)
    @classmethod
    def _one_logger(cls, v):
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _lr_floor(self):
        if self.min_lr > self.lr:
            raise schema.relative("min_lr", self.min_lr, f"must be <= lr ({self.lr:g})")
        return self


def _train_fields() -> dict:
    hints = typing.get_type_hints(TrainConfig, include_extras=True)
    out = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in FROM_DATA:
            continue
        if f.default_factory is not dataclasses.MISSING:
            out[f.name] = (hints[f.name], Field(default_factory=f.default_factory))
        else:
            out[f.name] = (hints[f.name], f.default)
    return out


TrainSpec = create_model("TrainSpec", __base__=_TrainBase, **_train_fields())
TrainSpec.__doc__ = "The ``train:`` section: :class:`TrainConfig` less the data-side fields."


class RunConfig(_Strict):
    _path: Path | None = PrivateAttr(None)
    name: str | None = Field(None, description="run name: runs/<name> (default: the config "
                             "file's stem); a plain file name")
    out_dir: str | None = Field(None, description="run directory, any path (default runs/<name>)")
    teacher: TeacherSpec | None = None
    teachers: dict[str, TeacherSpec] | None = None
    mixture: MixtureSpec | None = None
    student: ModelSpec
    data: DataSpec = DataSpec()
    method: MethodSpec | None = None
    task: str | dict[str, Any] | None = None  # default: the data source's task
    prepare: list[str | dict[str, Any]] = Field(default_factory=list, max_length=100)
    terms: list[TermSpec] = Field(default_factory=list, max_length=1000)
    train: TrainSpec = TrainSpec()

    _name = field_validator("name")(classmethod(lambda cls, v: plain_name(v)))

    @field_validator("task")
    @classmethod
    def _task(cls, v):
        from . import tasks  # noqa: F401  (registers)

        try:
            return _named(v, TASKS, "") if v is not None else v
        except ConfigError as err:
            raise schema.relative(err.field, err.value, err.allowed) from None

    @field_validator("prepare")
    @classmethod
    def _prepare(cls, v):
        from . import prepare  # noqa: F401  (registers)

        out = []
        for i, s in enumerate(v):
            try:
                out.append(_named(s, PREPARES, ""))
            except ConfigError as err:
                raise schema.relative(f"{i}.{err.field}", err.value, err.allowed) from None
        return out

    def digest(self) -> str:
        """Short hash of the resolved config (cache keys, run names)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def _pydantic_error(err: ValidationError, root: str = "") -> ConfigError:
    return schema.pydantic_error(err, root)


def validate(raw: dict) -> RunConfig:
    if not isinstance(raw, dict):
        raise ConfigError(
            "config", type(raw).__name__, "a YAML mapping with student, data, terms, train"
        )
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise _pydantic_error(err) from None
    except RecursionError:
        raise ConfigError("config", "deeply nested", "at most a few levels of nesting") from None


# ``--set`` parsing and strict YAML reading live in yamlfile.py (re-exported here)
from .yamlfile import parse_overrides, read_yaml, resolve_path, set_path  # noqa: E402, F401

PATH_FIELDS = ("checkpoint", "store", "hf_path", "from_config")  # of student/teacher(s)


def _resolve_paths(cfg: RunConfig, base: Path, require: bool = True) -> None:
    """Relative paths resolve against the config file's directory, else the working
    directory (:func:`resolve_path`). ``require=False`` leaves missing ones as written
    (a saved run's config, whose teacher may be gone: eval/export do not need it)."""
    specs = [("student", cfg.student), ("teacher", getattr(cfg, "teacher", None))]
    specs += [(f"teachers.{n}", s) for n, s in (getattr(cfg, "teachers", None) or {}).items()]
    spots = [(cfg.data, "root", "data.root")]
    spots += [(s, k, f"{f}.{k}") for f, s in specs if s is not None for k in PATH_FIELDS]
    for obj, key, field in spots:
        value = getattr(obj, key, None)
        if isinstance(value, str) and value:
            try:
                setattr(obj, key, resolve_path(value, base, field))
            except ConfigError:
                if require:
                    raise


def load(
    path: str | Path, overrides: list[str] | None = None, *, require_paths: bool = True
) -> RunConfig:
    """Read a YAML config (strict safe loader: plain data only, see yamlfile.py), apply
    ``--set`` overrides, validate, and resolve its relative paths."""
    path = Path(path)
    raw = read_yaml(path, "config")
    for key, val, item in parse_overrides(overrides or []):
        raw = set_path(raw, key, val, item)
    cfg = validate({} if raw is None else raw)
    if cfg.name is None:
        cfg.name = path.stem
    cfg._path = path  # noqa: SLF001  (teacher from_config resolves against it)
    _resolve_paths(cfg, path.parent, require_paths)
    return cfg


def dump(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True), sort_keys=False)
