"""CroDiNo-KD: unimodal networks co-trained from scratch, no multimodal teacher.

Paper: Ferrod et al., "Revisiting Cross-Modal Knowledge Distillation: A Disentanglement
Approach for RGBD Semantic Segmentation", ECML-PKDD 2025 (no official code found). An RGB and
a depth network (here: an image and an audio network, or MNIST and an edge/distance view)
learn together; each embedding is split into a shared (modality-invariant) and a private
part; the losses are each network's CE, InfoNCE aligning the shared parts of paired inputs
and a disentangling term between shared and private (maths: ``crodino`` in
``losses/disentangle.py``). "Decoupled data augmentation" = each modality draws its own
random augmentation (:class:`DecoupledAugment`, a prepare stage). At test each network runs
alone: ``cd.evaluate(group[name], data, io=group.member_io(name))``.

The networks are a :class:`~crossdistill.methods.members.Members` group, the distiller's
student (no teacher): ``Distiller(group, None, recipe.terms, io=group.io(),
prepare=[DecoupledAugment({...})])``; ``BestMembers`` keeps each member's best epoch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..distiller import Term
from ..errors import ConfigError
from ..prepare import Stage
from ..registry import METHODS, PREPARES
from ..schema import NonNeg, Temperature, Width
from . import Recipe, embedding_tap
from .members import Members


def _members(student, teacher, name: str) -> Members:
    if not isinstance(student, Members) or len(student.names) < 2:
        raise ConfigError(
            "method.student", type(student).__name__,
            f"{name} co-trains unimodal networks: pass crossdistill.methods.members.Members"
            "({'image': ..., 'audio': ...}, reads=...) with two or more members",
        )
    if teacher is not None:
        raise ConfigError(
            "method.teacher", type(teacher).__name__,
            f"{name} has no multimodal teacher (teacher=None)",
        )
    return student


@METHODS.register(
    "crodino",
    paper="Revisiting Cross-Modal Knowledge Distillation: A Disentanglement Approach for RGBD "
    "Semantic Segmentation",
    year=2025,
    family="cross-modal",
)
def crodino(
    student,
    teacher=None,
    *,
    nce_weight: NonNeg = 1.0,
    disentangle_weight: NonNeg = 1.0,
    temperature: Temperature = 0.1,
    shared_dim: Width = 32,
    private_dim: Width | None = None,
    split: str = "head",
    disentangle: str = "correlation",
    taps: dict[str, str] | None = None,
) -> Recipe:
    """CE of every member + ``crodino`` (InfoNCE on the shared parts, weight ``nce_weight``,
    temperature ``temperature``; shared-vs-private ``disentangle`` term, weight
    ``disentangle_weight``) on each member's penultimate embedding (``taps`` overrides a
    member's tap, relative to the member: ``{"audio": "block2"}``). Weights and temperature
    are not in the abstract: tune them on val (defaults 1, 1, 0.1: ours)."""
    group = _members(student, teacher, "crodino")
    taps = dict(taps or {})
    extra = [k for k in taps if k not in group.names]
    if extra:
        raise ConfigError("crodino.taps", extra[0], f"member names: {', '.join(group.names)}")
    member_taps = [
        f"{n}.{taps[n]}" if n in taps else f"{n}.{embedding_tap(group[n], f'crodino.taps.{n}')}"
        for n in group.names
    ]
    terms = [Term("ce", student=n, name=f"ce_{n}") for n in group.names]
    terms.append(
        Term(
            "crodino",
            student=member_taps,
            teacher=None,
            shared_dim=shared_dim,
            private_dim=private_dim,
            split=split,
            temperature=temperature,
            nce_weight=nce_weight,
            disentangle_weight=disentangle_weight,
            disentangle=disentangle,
        )
    )
    note = f"crodino: {split} split ({shared_dim} shared) of {', '.join(member_taps)}"
    return Recipe(terms, note=note)


def shift(x: torch.Tensor, max_h: int, max_w: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each sample of ``x`` (B, ..., H, W) by its own random offset in
    ``[-max_h, max_h] x [-max_w, max_w]`` (zero fill), drawn from ``gen``; device-agnostic."""
    if max_h <= 0 and max_w <= 0:
        return x
    b, (h, w) = x.shape[0], x.shape[-2:]
    dev = gen.device
    dy = torch.randint(0, 2 * max_h + 1, (b,), generator=gen, device=dev).to(x.device)
    dx = torch.randint(0, 2 * max_w + 1, (b,), generator=gen, device=dev).to(x.device)
    padded = F.pad(x, (max_w, max_w, max_h, max_h))
    lead = [1] * (x.dim() - 3)
    rows = (dy[:, None] + torch.arange(h, device=x.device)).view(b, *lead, h, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device)).view(b, *lead, 1, w)
    shape = (*padded.shape[:-2], h, padded.shape[-1])
    out = padded.gather(-2, rows.expand(shape))
    return out.gather(-1, cols.expand(*padded.shape[:-2], h, w))


@PREPARES.register(
    "decoupled_augment",
    description="independent random shifts per modality key (CroDiNo-KD's decoupled "
    "augmentation)",
)
class DecoupledAugment(Stage):
    """CroDiNo-KD's decoupled data augmentation: every listed key draws its *own* random
    shift per sample (``shifts[key] = (max rows, max columns)``; for a log-mel
    ``(1, mels, frames)`` use ``(0, frames)`` to shift in time only), unlike the trainer's
    ``augment_shift``, which moves every spatial key of a sample together. Default: image up
    to 2 pixels each way, audio up to 4 frames in time (ours)."""

    def __init__(self, shifts: dict | None = None):
        super().__init__()
        shifts = {"image": (2, 2), "audio": (0, 4)} if shifts is None else dict(shifts)
        if not shifts:
            raise ConfigError("prepare.shifts", shifts, "one or more {key: [rows, columns]}")
        self.shifts = {}
        for k, v in shifts.items():
            v = (v, v) if isinstance(v, int) else tuple(v)
            if len(v) != 2 or any(isinstance(n, bool) or not isinstance(n, int) or n < 0
                                  for n in v):
                raise ConfigError(f"prepare.shifts.{k}", v, "two integers >= 0 (rows, columns)")
            self.shifts[str(k)] = v

    def forward(self, batch, state):
        for k, (mh, mw) in self.shifts.items():
            if k not in batch:
                raise ConfigError("prepare.shifts", k, f"batch keys: {', '.join(sorted(batch))}")
            if batch[k].dim() < 3:
                raise ConfigError(f"prepare.shifts.{k}", tuple(batch[k].shape), "(B, ..., H, W)")
            batch[k] = shift(batch[k], mh, mw, state.generator)
        return batch
