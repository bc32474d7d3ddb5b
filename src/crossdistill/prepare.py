"""Prepare stages: seeded batch transforms that run before the forward, in training only.

A stage is a callable ``stage(batch, state) -> batch`` registered in ``PREPARES``
(``state.generator`` is seeded by the run's seed, the stage's position, the optimiser step
and the micro-batch, so a resumed run draws exactly the same; ``state.distiller`` gives the
student and teachers, e.g. for on-policy rollouts). A stage that keeps state across steps
(a replay buffer) is an ``nn.Module`` whose ``get_extra_state``/``set_extra_state`` carry it,
so it is checkpointed with the run. Stages are given as instances, names or
``{"name": ..., **params}``.

A stage whose ``student_only`` is true changes what the *student* sees only: the teachers
read the keys it changed as they were before it (a complete multimodal teacher beside a
student trained with modality dropout, MMANet's setting). The originals travel in the batch
under ``TEACHER_PREFIX + key``, so a window prepared ahead of its forwards stays correct.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .errors import ConfigError
from .registry import PREPARES

TEACHER_PREFIX = "teacher_input__"  # batch key prefix: a teacher's copy of a changed input


class Stage(nn.Module):
    """Base class: registered stages are modules so their state rides in checkpoints."""

    student_only = False  # True: the teachers see the keys this stage changes unchanged
    # True: cheap and deterministic, and the models read the keys it adds, so the build's
    # dry run (shapes, taps, projectors) sees them too (e.g. CLoCKDistill's target queries)
    in_build = False

    def forward(self, batch: dict, state) -> dict:  # pragma: no cover - interface
        raise NotImplementedError


def build_stage(spec) -> nn.Module:
    if isinstance(spec, nn.Module):
        return spec
    if callable(spec) and not isinstance(spec, (str, Mapping)):
        return _Fn(spec)
    params = {}
    if isinstance(spec, Mapping):
        params = {k: v for k, v in spec.items() if k != "name"}
        spec = spec.get("name")
    cls = PREPARES.get(spec, "prepare.name")
    try:
        return cls(**params)
    except TypeError as err:
        raise ConfigError("prepare", params, f"bad parameters for stage {spec!r} ({err})") from None


class _Fn(Stage):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, batch, state):
        return self.fn(batch, state)


@PREPARES.register("modality_dropout", description="zero whole inputs per sample at a rate")
class ModalityDropout(Stage):
    """Per sample, zero each listed key with probability ``rate`` (never all of them), and
    write a presence mask ``present_<key>`` (1 = kept): training for missing modalities.
    ``teacher="complete"`` keeps the teachers on the complete inputs (``student_only``);
    the default ``"dropped"`` gives them the same dropped inputs as the student."""

    def __init__(self, keys: list[str], rate: float = 0.3, teacher: str = "dropped"):
        super().__init__()
        if not 0.0 <= float(rate) <= 1.0:
            raise ConfigError("prepare.rate", rate, "a probability in [0, 1]")
        if not keys:
            raise ConfigError("prepare.keys", keys, "one or more batch keys")
        if teacher not in ("dropped", "complete"):
            raise ConfigError("prepare.teacher", teacher, "dropped or complete")
        self.keys, self.rate = list(keys), float(rate)
        self.student_only = teacher == "complete"

    def forward(self, batch, state):
        missing = [k for k in self.keys if k not in batch]
        if missing:
            raise ConfigError("prepare.keys", missing[0], f"batch keys: {', '.join(sorted(batch))}")
        b = batch[self.keys[0]].shape[0]
        g = state.generator
        drop = torch.rand(b, len(self.keys), generator=g, device=g.device) < self.rate
        if len(self.keys) > 1:  # keep at least one modality per sample
            all_gone = drop.all(1)
            keep = torch.randint(0, len(self.keys), (b,), generator=g, device=g.device)
            drop[all_gone, keep[all_gone]] = False
        for j, k in enumerate(self.keys):
            x = batch[k]
            present = (~drop[:, j]).to(x.device)
            batch[k] = x * present.view(-1, *[1] * (x.dim() - 1)).to(x.dtype)
            batch[f"present_{k}"] = present
        return batch


@PREPARES.register("pick_caption", description="one of each sample's captions, drawn per step")
class PickCaption(Stage):
    """Keys holding several captions per sample, ``(B, C, L)`` (``digit_captions``): keep one
    caption per sample, drawn uniformly each step from the seeded generator, the same index
    for every listed key (ids and their mask). Evaluation reads all C (the model averages)."""

    def __init__(self, keys: list[str] = ("caption_ids", "caption_mask")):
        super().__init__()
        if not keys:
            raise ConfigError("prepare.keys", keys, "one or more batch keys")
        self.keys = list(keys)

    def forward(self, batch, state):
        missing = [k for k in self.keys if k not in batch]
        if missing:
            raise ConfigError("prepare.keys", missing[0], f"batch keys: {', '.join(sorted(batch))}")
        first = batch[self.keys[0]]
        if first.dim() != 3 or any(batch[k].shape[:2] != first.shape[:2] for k in self.keys):
            raise ConfigError("prepare.keys", {k: tuple(batch[k].shape) for k in self.keys},
                              "(B, C, L) tensors with the same B and C")
        g = state.generator
        pick = torch.randint(0, first.shape[1], (first.shape[0],), generator=g, device=g.device)
        rows = torch.arange(first.shape[0], device=first.device)
        for k in self.keys:
            batch[k] = batch[k][rows, pick.to(first.device)]
        return batch


@PREPARES.register("gaussian_noise", description="add seeded Gaussian noise to a key")
class GaussianNoise(Stage):
    """``x + std * N(0, 1)`` on batch key ``key`` (robustness, noisy-student style)."""

    def __init__(self, key: str = "x", std: float = 0.1):
        super().__init__()
        if not float(std) >= 0:
            raise ConfigError("prepare.std", std, "a number >= 0")
        self.key, self.std = key, float(std)

    def forward(self, batch, state):
        if self.key not in batch:
            raise ConfigError("prepare.key", self.key, f"batch keys: {', '.join(sorted(batch))}")
        x = batch[self.key]
        g = state.generator
        noise = torch.randn(x.shape, generator=g, device=g.device, dtype=x.dtype)
        batch[self.key] = x + self.std * noise.to(x.device)
        return batch
