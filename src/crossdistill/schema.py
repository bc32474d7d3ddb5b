"""Hyper-parameter validation derived from signatures, so no schema is written twice.

Every registered callable (loss, method, projector, model, condenser, task, prepare stage,
structure op, data source) is validated from its own signature: the type is the annotation
(``Annotated[float, Interval(gt=...)]`` constraints honoured), else the default's type.
Numbers the signature leaves unbounded get sane bounds, so a typo cannot become a 43 TB
allocation or an OverflowError deep in torch:

* every float is finite and ``|x| <= MAX_FLOAT`` (1e6);
* every int is ``|x| <= MAX_INT`` (2**31 - 1, what int32 C APIs take);
* every list/tuple has at most ``MAX_ITEMS`` (10,000) items.

The aliases below are the constraints signatures share (import them from here).
"""

from __future__ import annotations

import collections.abc as cabc
import functools
import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, Union, get_args, get_origin

import annotated_types as at
from pydantic import ConfigDict, ValidationError, create_model
from pydantic.fields import FieldInfo

from .errors import ConfigError

MAX_INT = 2**31 - 1
MAX_FLOAT = 1e6
MAX_ITEMS = 10_000
MAX_SEED = 2**32 - 1  # numpy's seed range

# -- shared constraints (used in signatures) ------------------------------------------------
Temperature = Annotated[float, at.Interval(gt=1e-2, le=1e3)]
Prob = Annotated[float, at.Interval(ge=0, le=1)]
Fraction = Annotated[float, at.Interval(ge=0, lt=1)]
NonNeg = Annotated[float, at.Interval(ge=0, le=MAX_FLOAT)]
Pos = Annotated[float, at.Interval(gt=0, le=MAX_FLOAT)]
Count = Annotated[int, at.Interval(ge=1, le=1_000_000)]
Width = Annotated[int, at.Interval(ge=1, le=8192)]  # channels, hidden sizes, embedding dims
Depth = Annotated[int, at.Interval(ge=1, le=1000)]  # layers, blocks, heads
ImgSize = Annotated[int, at.Interval(ge=1, le=1024)]  # pixels per side
Seed = Annotated[int, at.Interval(ge=0, le=MAX_SEED)]

_BOUNDS = (at.Gt, at.Ge, at.Lt, at.Le, at.Interval)


class _Bad(ConfigError):
    """A ConfigError whose field is relative to where it was raised (pydantic joins them)."""

    relative = True


def _has_bound(meta) -> bool:
    if isinstance(meta, _BOUNDS):
        return True
    if isinstance(meta, FieldInfo):
        return any(isinstance(m, _BOUNDS) for m in meta.metadata)
    return False


def bounded(tp: Any) -> Any:
    """``tp`` with the default bounds added where the annotation gives none."""
    if tp is bool or tp is Any:
        return tp
    if tp is float:
        return Annotated[float, at.Interval(ge=-MAX_FLOAT, le=MAX_FLOAT)]
    if tp is int:
        return Annotated[int, at.Interval(ge=-MAX_INT, le=MAX_INT)]
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        base, *meta = args
        return tp if any(_has_bound(m) for m in meta) else Annotated[(bounded(base), *meta)]
    if origin in (Union, types.UnionType):
        return Union[tuple(bounded(a) for a in args)]  # noqa: UP007
    if origin in (list, tuple, set, frozenset, cabc.Sequence) and args:
        inner = tuple(a if a is Ellipsis else bounded(a) for a in args)
        return Annotated[origin[inner], at.MaxLen(MAX_ITEMS)]
    if origin in (list, tuple, cabc.Sequence) or tp in (list, tuple):
        return Annotated[tp, at.MaxLen(MAX_ITEMS)]
    if origin is dict and args:
        return dict[args[0], bounded(args[1])]
    return tp


def _from_default(default) -> Any:
    if default is None or default is inspect.Parameter.empty:
        return Any
    if isinstance(default, (bool, int, float, str)):
        return type(default)
    if isinstance(default, (tuple, list)):
        kinds = {type(v) for v in default}
        elem = kinds.pop() if len(kinds) == 1 and kinds <= {int, float, str} else Any
        return tuple[elem, ...] if isinstance(default, tuple) else list[elem]
    return Any


def _hints(fn) -> dict[str, Any]:
    """Resolved annotations; one unresolvable name costs only that parameter its type."""
    try:
        return typing.get_type_hints(fn, include_extras=True)
    except Exception:  # noqa: BLE001  (a TYPE_CHECKING-only name somewhere)
        out = {}
        ns = {**vars(typing), **getattr(fn, "__globals__", {})}
        for name, ann in getattr(fn, "__annotations__", {}).items():
            try:
                out[name] = eval(ann, ns) if isinstance(ann, str) else ann  # noqa: S307
            except Exception:  # noqa: BLE001
                pass
        return out


def _chain(fn) -> list[Callable]:
    """The functions whose keyword parameters ``fn`` accepts: a class's ``__init__`` and,
    while it forwards ``**kw``, its bases' (condensers)."""
    if not inspect.isclass(fn):
        return [fn]
    out = []
    for k in fn.__mro__:
        init = k.__dict__.get("__init__")
        if init is None or k is object:
            continue
        out.append(init)
        params = inspect.signature(init).parameters.values()
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return out


class Spec:
    """The validator of one callable's hyper-parameters (cached per callable and skip set)."""

    def __init__(self, fn: Callable, skip: frozenset[str], positional: int):
        self.fields: dict[str, tuple[Any, Any]] = {}
        self.open = False  # takes **kw that no signature of the chain names
        self.required: list[str] = []
        chain = _chain(fn)
        for i, f in enumerate(chain):
            hints = _hints(f)
            params = list(inspect.signature(f).parameters.values())
            if inspect.isclass(fn):
                params = params[1:]  # self
            if i == 0:
                params = [p for p in params if p.kind is not p.VAR_POSITIONAL][positional:]
            for p in params:
                if p.kind is p.VAR_KEYWORD:
                    self.open = i == len(chain) - 1
                    continue
                if p.kind is p.VAR_POSITIONAL or p.name in skip or p.name in self.fields:
                    continue
                tp = hints.get(p.name, _from_default(p.default))
                empty = p.default is inspect.Parameter.empty
                self.fields[p.name] = (bounded(tp), ... if empty else p.default)
                if empty:
                    self.required.append(p.name)
        cfg = ConfigDict(extra="allow", arbitrary_types_allowed=True, allow_inf_nan=False)
        self.model = create_model(
            f"Params_{getattr(fn, '__name__', 'fn')}", __config__=cfg, **self.fields
        )

    def check(self, params: Mapping, field: str, what: str) -> dict:
        """The validated (coerced) ``params``; one :class:`ConfigError` for the first problem."""
        allowed = ", ".join(self.fields) or "none"
        for k, v in params.items():
            if not isinstance(k, str):
                raise ConfigError(field or "config", k, f"names are strings; allowed: {allowed}")
            if k not in self.fields and not self.open:
                raise ConfigError(
                    _join(field, k), v, f"unknown parameter of {what}; allowed: {allowed}"
                )
        missing = [k for k in self.required if k not in params]
        if missing:
            raise ConfigError(
                _join(field, missing[0]), None, f"{what} needs {', '.join(missing)} (no default)"
            )
        try:
            m = self.model.model_validate(dict(params))
        except ValidationError as err:
            raise pydantic_error(err, field) from None
        return {k: (getattr(m, k) if k in self.fields else v) for k, v in params.items()}


def _join(field: str, key: str) -> str:
    return f"{field}.{key}" if field else key


@functools.cache
def spec_of(fn: Callable, skip: frozenset[str] = frozenset(), positional: int = 0) -> Spec:
    return Spec(fn, skip, positional)


def check(
    fn: Callable,
    params: Mapping,
    field: str,
    what: str,
    *,
    skip: Iterable[str] = (),
    positional: int = 0,
) -> dict:
    """Validate ``params`` (a config mapping) against ``fn``'s signature; returns them coerced.

    ``positional`` leading parameters and the names in ``skip`` are filled by the caller
    (tensors, shapes, ``num_classes``...), not by the config. Errors name
    ``field.<parameter>`` and list the allowed names.
    """
    if not isinstance(params, Mapping):
        raise ConfigError(field, params, f"a mapping of {what}'s parameters")
    return spec_of(fn, frozenset(skip), positional).check(params, field, what)


def describe(fn: Callable, *, skip: Iterable[str] = (), positional: int = 0) -> list[dict]:
    """One row per hyper-parameter: name, type, default, range (the config reference)."""
    s = spec_of(fn, frozenset(skip), positional)
    rows = []
    for name, (tp, default) in s.fields.items():
        rows.append(
            {
                "name": name,
                "type": type_name(tp),
                "default": "required" if default is ... else default,
                "range": range_of(tp),
            }
        )
    return rows


def type_name(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return type_name(args[0])
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{inner}]" if inner else name
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _bounds(meta) -> dict:
    out = {}
    items = meta.metadata if isinstance(meta, FieldInfo) else [meta]
    for m in items:
        if isinstance(m, at.Interval):
            out.update({k: getattr(m, k) for k in ("gt", "ge", "lt", "le") if getattr(m, k)
                        is not None})
        elif isinstance(m, _BOUNDS):
            key = type(m).__name__.lower()
            out[key] = getattr(m, key)
    return out


def range_of(tp: Any) -> str:
    """``[1, 1000]``, ``(0.01, 1000]``, ... from the constraints of ``tp`` ('' if none)."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return next((r for r in map(range_of, args) if r), "")
    if origin is not Annotated:
        return ""
    b = {}
    for m in args[1:]:
        b.update(_bounds(m))
    if not b:
        return range_of(args[0])
    n = {k: (str(v) if isinstance(v, int) else f"{v:g}") for k, v in b.items()}
    lo = f"[{n['ge']}" if "ge" in n else (f"({n['gt']}" if "gt" in n else "(-inf")
    hi = f"{n['le']}]" if "le" in n else (f"{n['lt']})" if "lt" in n else "inf)")
    return f"{lo}, {hi}"


def pydantic_error(err: ValidationError, root: str = "") -> ConfigError:
    """The first problem of a pydantic error as one :class:`ConfigError` naming the field as
    the user wrote it (``root.loc``)."""
    errors = err.errors()
    # in a union (``Width | tuple[Width, ...]``) the member of the right type says most
    e = next((x for x in errors if not x["type"].endswith(("_type", "_parsing"))), errors[0])
    loc = ".".join(str(p) for p in e["loc"] if not _union_tag(p))
    field = f"{root}.{loc}" if root and loc else (loc or root or "config")
    ctx = e.get("ctx", {}) or {}
    inner = ctx.get("error")
    if isinstance(inner, ConfigError):  # raised inside a validator
        if getattr(inner, "relative", False):
            field = f"{field}.{inner.field}" if inner.field else field
        return ConfigError(field, inner.value, inner.allowed)
    msg = e["msg"].replace("Value error, ", "")
    if e["type"] == "extra_forbidden":
        msg = "unknown setting; check the spelling (see the README's config reference)"
    if e["type"] == "finite_number":
        msg = "must be a finite number"
    more = len({x["loc"][:1] for x in errors}) - 1
    return ConfigError(
        field, _short(e.get("input")), msg + (f" (and {more} more problem(s))" if more else "")
    )


def _union_tag(part) -> bool:
    """pydantic's names of union members in an error location (``constrained-int``, ...)."""
    return isinstance(part, str) and ("[" in part or part in _TAGS)


_TAGS = {"constrained-int", "constrained-float", "int", "float", "str", "bool", "list", "tuple",
         "dict", "none", "is-instance", "literal", "function-after", "function-before"}


def _short(value, limit: int = 200):
    """A value as echoed in an error: long ones cut (a 50 MB string is not printed whole)."""
    text = repr(value)
    return value if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def teacher_optional(fn: Callable) -> bool:
    """A loss whose teacher argument may be left out (``t=None`` / ``t_shape(s)=None``)."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    params = [p for p in inspect.signature(target).parameters.values() if p.name != "self"]
    return len(params) > 1 and params[1].default is None


def relative(field: str, value, allowed: str) -> ConfigError:
    """A ConfigError for a pydantic validator: its field is appended to the validator's loc."""
    return _Bad(field, value, allowed)
