"""The model zoo: small, CPU-trainable CNNs, ResNets, VGGs, ViTs, MLP-Mixers, MLPs, the
dataset-condensation ConvNet and tiny audio models, all behind one factory.

Every model takes keyword-only ``num_classes``, ``in_channels`` and ``img_size`` (an int or
``(H, W)``), maps ``(B, C, H, W)`` to logits ``(B, num_classes)`` and carries three
attributes the distillation code relies on instead of per-architecture special cases:

* ``stages`` -- module paths of the main stage outputs, shallow to deep (feature taps,
  early-exit branches);
* ``feature_path`` -- the classifier head; its *input* is the penultimate embedding;
* ``family`` -- ``"cnn"``, ``"vit"``, ``"mixer"``, ``"mlp"`` or ``"audio"``.
"""

from __future__ import annotations

import inspect

from torch import nn

from ..errors import ConfigError
from ..registry import MODELS
from . import audio, cnn, convnet, fusion, mixer, mlp, resnet, seg, ssm, vgg, vit  # noqa: F401  (registers)

__all__ = ["MODELS", "create", "names", "tap_paths"]


def create(name: str, *, field: str = "model", **kwargs) -> nn.Module:
    """Build the registered model ``name`` with ``kwargs``.

    Unknown names and unknown or invalid arguments raise :class:`ConfigError` whose field
    is prefixed with ``field`` (e.g. ``"student"`` gives ``"student.depth"``), so a config
    error points at the config entry that caused it.
    """
    factory = MODELS.get(name, field=field)
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = [p for p, v in params.items() if v.kind is not inspect.Parameter.VAR_KEYWORD]
    if not takes_any:
        for key, value in kwargs.items():
            if key not in params:
                raise ConfigError(
                    f"{field}.{key}",
                    value,
                    f"not an argument of model {name!r}; accepted: {', '.join(accepted)}",
                )
    try:
        return factory(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{field}.{e.field}", e.value, e.allowed) from None


def names() -> list[str]:
    """Every registered model name, sorted."""
    return MODELS.names()


def tap_paths(model: nn.Module) -> list[str]:
    """All named submodule paths of ``model`` (the root ``''`` excluded), in definition order."""
    return [path for path, _ in model.named_modules() if path]
from . import bida as _bida  # noqa: E402,F401  (registers bida)
from . import cross_text as _cross_text  # noqa: E402,F401  (registers)
from . import detect as _detect  # noqa: E402,F401  (registers centernet-tiny, detr-tiny)
from . import dual as _dual  # noqa: E402,F401  (registers dual-encoder)
from . import ezad as _ezad  # noqa: E402,F401  (registers ezad-clip, ezad-centernet)
from . import fewshot as _fewshot  # noqa: E402,F401  (registers proto-fss, distillfss-student)
from . import l0 as _l0  # noqa: E402,F401  (registers the l0_gates / l0_prune structure ops)
from . import mini_vlm as _mini_vlm  # noqa: E402,F401  (registers)
from . import pair as _pair  # noqa: E402,F401  (registers)
from . import segformer as _segformer  # noqa: E402,F401  (registers segformer-tiny)
from . import seq as _seq  # noqa: E402,F401  (registers seq2seq)
from . import vit_seg as _vit_seg  # noqa: E402,F401  (registers vit-seg)
