"""The one registry primitive: losses, projectors, models, datasets, methods, condensers,
tasks, prepare stages and structure operations.

A registry maps a name to a callable. Lookup of an unknown name raises a
:class:`~crossdistill.errors.ConfigError` that lists every name that exists, so typos in a
config fail with a useful message. Registries are the only global state in the package.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from .errors import ConfigError, nearest


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self.singular = kind[:-2] if kind.endswith("sses") else kind.removesuffix("s")
        self._items: dict[str, Callable] = {}

    def register(self, name: str, **meta) -> Callable[[Callable], Callable]:
        """Decorator: ``@LOSSES.register("kd")``. ``meta`` is free-form (paper, year, ...)."""

        def deco(obj: Callable) -> Callable:
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            obj.__registry_meta__ = {"name": name, **meta}
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str, field: str | None = None) -> Callable:
        if name not in self._items:
            hint = nearest(str(name), self._items)
            raise ConfigError(
                field or self.kind,
                name,
                f"unknown {self.singular}; "
                f"did you mean {', '.join(hint)}? (available: {', '.join(sorted(self._items))})",
            )
        return self._items[name]

    def meta(self, name: str) -> dict:
        return getattr(self.get(name), "__registry_meta__", {"name": name})

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


LOSSES = Registry("losses")
PROJECTORS = Registry("projectors")
MODELS = Registry("models")
DATASETS = Registry("datasets")
METHODS = Registry("methods")
CONDENSERS = Registry("condensers")
TASKS = Registry("tasks")
PREPARES = Registry("prepares")
STRUCTURE_OPS = Registry("structure ops")
