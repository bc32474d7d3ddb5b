"""Methods: one recipe per paper family, registered in ``METHODS``.

A method is a function ``(student, teacher, **hyper) -> Recipe``: it builds the
:class:`~crossdistill.Term` list (taps, losses, projectors, weights) and, where the paper
needs one, a step hook (a schedule). It holds no maths: that lives in ``losses/``.
Importing this package registers every method module below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from ..errors import ConfigError
from ..registry import METHODS


@dataclass
class Recipe:
    terms: list
    hooks: list[Callable] = field(default_factory=list)
    note: str = ""


def build(
    name: str, student: nn.Module, teacher: nn.Module | None, field: str = "method", **params
) -> Recipe:
    """The recipe of method ``name`` for these models; unknown hyper-parameters are errors."""
    import inspect

    fn = METHODS.get(name, f"{field}.name")
    sig = inspect.signature(fn)
    accepted = [k for k, p in sig.parameters.items() if p.kind == p.KEYWORD_ONLY]
    for k, v in params.items():
        if k not in accepted:
            raise ConfigError(
                f"{field}.{k}",
                v,
                f"unknown parameter of method {name!r}; allowed: {', '.join(accepted) or 'none'}",
            )
    out = fn(student, teacher, **params)
    return out if isinstance(out, Recipe) else Recipe(list(out))


def stage_tap(model: nn.Module, which: int = -1, field: str = "method") -> str:
    """A model's ``stages[which]`` path (zoo models carry ``stages``; user models pass taps)."""
    stages = getattr(model, "stages", None)
    if not stages:
        raise ConfigError(
            field,
            type(model).__name__,
            "model has no `stages`; pass the tap "
            "paths explicitly (student_tap=..., teacher_tap=...)",
        )
    return stages[which]


def embedding_tap(model: nn.Module, field: str = "method") -> str:
    """The input of a model's classifier head: its penultimate embedding."""
    head = getattr(model, "feature_path", None)
    if not head:
        raise ConfigError(
            field,
            type(model).__name__,
            "model has no `feature_path`; pass the tap paths explicitly",
        )
    return f"{head}:input"


from . import classic  # noqa: E402,F401  (registers)

__all__ = ["METHODS", "Recipe", "build", "embedding_tap", "stage_tap"]
from . import acam as _acam  # noqa: E402,F401  (registers acam_kd, static_mask_kd)
from . import (  # noqa: E402,F401
    any2seg,
    bida,  # noqa: E402,F401
    collaborative,
    crodino,
    dho,
    inherit,
    mmanet,
    mst,
    ofa,
    pld,
    scalekd,
    taid,
)
from . import clockdistill as _clockdistill  # noqa: E402,F401  (registers)
from . import collab_seg as _collab_seg  # noqa: E402,F401  (registers)
from . import cprd as _cprd  # noqa: E402,F401  (registers)
from . import dcd as _dcd  # noqa: E402,F401  (registers)
from . import distillfss as _distillfss  # noqa: E402,F401  (registers)
from . import esp_medsam as _esp_medsam  # noqa: E402,F401  (registers)
from . import ezad as _ezad  # noqa: E402,F401  (registers)
from . import gcp_sad as _gcp_sad  # noqa: E402,F401  (registers; its structure ops too)
from . import gssf as _gssf  # noqa: E402,F401  (registers)
from . import libs as _libs  # noqa: E402,F401
from . import llava_kd as _llava_kd  # noqa: E402,F401  (registers)
from . import makd as _makd  # noqa: E402,F401  (registers)
from . import multisource as _multisource  # noqa: E402,F401  (registers)
from . import proc_kd as _proc_kd  # noqa: E402,F401  (registers)
from . import sgva as _sgva  # noqa: E402,F401  (registers)
from . import trans_encoder as _trans_encoder  # noqa: E402,F401  (registers)
from . import transkd as _transkd  # noqa: E402,F401  (registers)
from . import unidistill as _unidistill  # noqa: E402,F401  (registers)
from . import vlm_ood as _vlm_ood  # noqa: E402,F401  (registers)
