"""YAML run configs, validated by pydantic models that mirror the Python API one to one.

``teacher``/``student`` -> ``models.create`` (+ ``checkpoint``), ``data`` -> ``data.load``,
``terms`` -> :class:`Term`, ``train`` -> :class:`TrainConfig`. Validation turns every problem
into one :class:`ConfigError` naming the field, the value and what is allowed, before any
training starts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from .errors import ConfigError
from .registry import DATASETS, LOSSES, METHODS, MODELS, PROJECTORS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


IO_KEYS = ("inputs", "logits", "class_dim")


class ModelSpec(BaseModel):
    """A model: a zoo model (``model`` = its registered name, other keys its arguments), or a
    Hugging Face model (``hf`` = a model type built from ``config`` with random weights, or
    ``hf_path`` = a local directory for ``from_pretrained``). ``inputs`` / ``logits`` /
    ``class_dim`` are its adapter (see :class:`crossdistill.adapters.ModelIO`)."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    checkpoint: str | None = None
    hf: str | None = None
    hf_path: str | None = None
    config: dict[str, Any] | None = None
    head: str = "causal_lm"
    attn_implementation: str = "sdpa"
    inputs: str | list[str] | dict[str, str] | None = None
    logits: int | str | list[int | str] | None = None
    class_dim: int | None = None

    @field_validator("model")
    @classmethod
    def _known(cls, v):
        if v is not None:
            MODELS.get(v, "model")
        return v

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
    weights: dict[str, float] | None = None
    tau: float = Field(1.0, gt=0)
    space: Literal["prob", "logit"] = "prob"
    router_hidden: int = Field(32, ge=1)


class AugmentSpec(_Strict):
    shift: int = Field(0, ge=0, le=8)
    flip: bool = False


class DataSpec(_Strict):
    name: str = "digits"
    root: str | None = None
    params: dict[str, Any] = {}  # the source's own options (sizes, tokenizer, block, ...)
    batch_size: int = Field(64, ge=1)
    img_size: int | None = Field(None, ge=4)
    labelled: int | None = Field(None, ge=1)
    split_seed: int = 0
    augment: AugmentSpec = AugmentSpec()

    @field_validator("name")
    @classmethod
    def _known(cls, v):
        DATASETS.get(v, "name")
        return v


class TermSpec(BaseModel):
    """One term; keys beyond the named ones are the loss's hyper-parameters."""

    model_config = ConfigDict(extra="allow")
    loss: str
    student: str | list[str] = "logits"
    teacher: str | list[str] | None = "default"
    projector: str | None = None
    projector_params: dict[str, Any] = {}
    weight: float | None = Field(None, ge=0)
    warmup: float = Field(0.0, ge=0)
    name: str | None = None
    teacher_model: str | None = None

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


class MethodSpec(BaseModel):
    """A registered method (recipe); keys beyond ``name`` are its hyper-parameters."""

    model_config = ConfigDict(extra="allow")
    name: str

    @field_validator("name")
    @classmethod
    def _known(cls, v):
        from . import methods  # noqa: F401  (registers)

        METHODS.get(v, "name")
        return v

    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class TrainSpec(_Strict):
    epochs: int = Field(10, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    milestones: list[float] = [0.5, 0.75]
    gamma: float = Field(0.1, gt=0)
    grad_clip: float | None = Field(None, gt=0)
    accumulate: int = Field(1, ge=1)
    amp: bool = False
    seed: int = 0
    device: str = "cpu"
    checkpoint_every: int = Field(0, ge=0)
    eval_batch_size: int = Field(512, ge=1)
    num_workers: int = Field(0, ge=0, le=64)
    progress: bool = True
    strategy: Literal["ddp", "fsdp"] = "ddp"
    find_unused: bool = False
    deterministic: bool = False


class RunConfig(_Strict):
    _path: Path | None = PrivateAttr(None)
    name: str | None = None
    out_dir: str | None = None
    teacher: TeacherSpec | None = None
    teachers: dict[str, TeacherSpec] | None = None
    mixture: MixtureSpec | None = None
    student: ModelSpec
    data: DataSpec = DataSpec()
    method: MethodSpec | None = None
    task: str | dict[str, Any] | None = None  # default: the data source's task
    prepare: list[str | dict[str, Any]] = Field(default_factory=list)
    terms: list[TermSpec] = Field(default_factory=list)
    train: TrainSpec = TrainSpec()

    def digest(self) -> str:
        """Short hash of the resolved config (cache keys, run names)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def _pydantic_error(err: ValidationError, root: str = "") -> ConfigError:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    field = f"{root}.{loc}" if root and loc else (loc or root or "config")
    ctx = e.get("ctx", {}) or {}
    if isinstance(ctx.get("error"), ConfigError):  # a registry lookup inside a validator
        inner = ctx["error"]
        return ConfigError(field, inner.value, inner.allowed)
    msg = e["msg"].replace("Value error, ", "")
    if e["type"] == "extra_forbidden":
        msg = "unknown setting; check the spelling (see the README's config section)"
    more = len(err.errors()) - 1
    return ConfigError(
        field, e.get("input"), msg + (f" (and {more} more problem(s))" if more else "")
    )


def validate(raw: dict) -> RunConfig:
    if not isinstance(raw, dict):
        raise ConfigError(
            "config", type(raw).__name__, "a YAML mapping with student, data, terms, train"
        )
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise _pydantic_error(err) from None


def set_path(raw: dict, dotted: str, value: Any) -> None:
    """Apply one ``--set a.b.c=value`` override (``terms.1.weight`` indexes lists)."""
    keys = dotted.split(".")
    node: Any = raw
    for i, k in enumerate(keys[:-1]):
        if isinstance(node, list):
            if not k.isdigit() or int(k) >= len(node):
                raise ConfigError("--set", dotted, f"{'.'.join(keys[:i])} has {len(node)} items")
            node = node[int(k)]
        else:
            node = node.setdefault(k, {})
            if node is None:
                node = raw[k] = {}
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError("--set", dotted, f"index out of range (list has {len(node)} items)")
        node[int(last)] = value
    else:
        node[last] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in items or []:
        if "=" not in item:
            raise ConfigError("--set", item, "use key.path=value, e.g. train.lr=0.1")
        key, val = item.split("=", 1)
        out.append((key.strip(), yaml.safe_load(val)))
    return out


def load(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (safe loader: plain data only, no tags), apply ``--set`` overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config", str(path), "file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError("config", str(path), f"not valid YAML ({err})") from None
    for key, val in parse_overrides(overrides or []):
        set_path(raw, key, val)
    cfg = validate(raw)
    if cfg.name is None:
        cfg.name = path.stem
    cfg._path = path  # noqa: SLF001  (teacher from_config resolves against it)
    return cfg


def dump(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True), sort_keys=False)
