"""ESP-MedSAM, small form: decoupled encoder distillation, then the decoder on labels.

Paper: Xu et al., "ESP-MedSAM: Efficient Self-Prompting SAM for Universal Domain-Generalized
Medical Image Segmentation", 2024. Its MMDKD first distils *common image knowledge*: a tiny
encoder (TinyViT) regresses the large SAM image encoder's embeddings by MSE, no decoder
involved (MobileSAM-style decoupled distillation). The official repository
(xq141839/ESP-MedSAM) has inference code only, no training script: the stage split, which
parameters train, the weights and the schedules below are ours. The domain-specific parts
(modality controller, self-prompting SPPG, per-modality decoder queries QDMD) have no
counterpart on digit canvases and are left out (methods/dense.md's small form).

Small form, two ordinary Distiller + Trainer runs on one student (:func:`pipeline`), the
stage a recipe parameter, as in ``llava-kd``:

1. ``stage="encoder"``: ``mse(phi(E_s(x)), E_t(x))`` only, no CE, on *unlabelled* canvases
   (:func:`unlabelled` voids every label): the student's encoder output (seg-cnn: ``enc3``,
   its deepest map) through a ``conv1x1`` projector ``phi`` to the teacher encoder's width.
   Only the encoder (and ``phi``) train; the decoder is frozen and unused by the loss.
2. ``stage="decoder"``: CE on labelled canvases; the decoder and head train on the distilled
   encoder, which stays frozen (its BatchNorm running statistics too); with
   ``train_encoder=True`` the whole student fine-tunes. No teacher.

The claim's baseline is the same small model trained alone (plain CE, every parameter).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..distiller import Term
from ..errors import ConfigError
from ..registry import METHODS
from . import Recipe

PAPER = ("ESP-MedSAM: Efficient Self-Prompting SAM for Universal Domain-Generalized Medical "
         "Image Segmentation")
STAGES = ("encoder", "decoder")
ENCODER = ("enc1", "enc2", "enc3")  # seg-cnn's encoder; its decoder is dec1, dec2, head
TASK = {"name": "segmentation", "target": "seg"}


def _modules(model: nn.Module, names: Sequence[str], field: str) -> list[nn.Module]:
    if isinstance(names, str) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(field, names, "a non-empty list of top-level module names")
    children = dict(model.named_children())
    bad = [n for n in names if n not in children]
    if bad:
        raise ConfigError(field, bad, f"top-level modules of the model: {list(children)}")
    return [children[n] for n in names]


def set_trainable(student: nn.Module, stage: str, encoder: Sequence[str] = ENCODER,
                  train_encoder: bool = False) -> list[str]:
    """Which of ``student``'s parameters train in ``stage`` (``requires_grad``), and in the
    decoder stage with a frozen encoder, its BatchNorm statistics frozen too (momentum 0,
    restored by :func:`release`). Returns the names of the training top-level modules."""
    enc = set(encoder)
    _modules(student, list(enc), "esp_medsam.encoder")
    names = [n for n, _ in student.named_children()]
    if stage == "encoder":
        parts = [n for n in names if n in enc]
    elif train_encoder:
        parts = names
    else:
        parts = [n for n in names if n not in enc]
    student.requires_grad_(False)
    for n, m in student.named_children():
        if n in parts:
            m.requires_grad_(True)
        for bn in m.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                if not hasattr(bn, "_esp_momentum"):
                    bn._esp_momentum = bn.momentum
                frozen = stage == "decoder" and n not in parts
                bn.momentum = 0.0 if frozen else bn._esp_momentum
    return parts


def release(student: nn.Module) -> nn.Module:
    """Undo :func:`set_trainable`: every parameter trains, BatchNorm momenta are restored."""
    student.requires_grad_(True)
    for bn in student.modules():
        if hasattr(bn, "_esp_momentum"):
            bn.momentum = bn._esp_momentum
            del bn._esp_momentum
    return student


def unlabelled(data, key: str = "seg"):
    """A copy of a canvas ``Dataset`` whose label map is void (-100) everywhere: stage 1 sees
    images only."""
    from ..data import Dataset

    if key not in data.keys():
        raise ConfigError("esp_medsam.data", key, f"a key of the data: {data.keys()}")
    tensors = dict(data.tensors)
    tensors[key] = torch.full_like(tensors[key], -100)
    return Dataset(tensors, data.kinds, name=f"{data.name}-unlabelled", split=data.split,
                   num_classes=data.num_classes, info=dict(data.info, unlabelled=True))


def _weight(field: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
        raise ConfigError(field, v, "a number > 0")
    return float(v)


@METHODS.register("esp_medsam", paper=PAPER, year=2024, family="dense")
def esp_medsam(
    student,
    teacher=None,
    *,
    stage: str = "encoder",
    tap: str = "enc3",
    teacher_tap: str | None = None,
    encoder: Sequence[str] = ENCODER,
    feature_weight: float = 1.0,
    train_encoder: bool = False,
) -> Recipe:
    """The terms of one stage (module doc); sets which student parameters train
    (:func:`set_trainable`). ``encoder``: the student's top-level encoder modules; ``tap``
    (inside them) is regressed onto the teacher's ``teacher_tap`` (default ``tap``) with
    weight ``feature_weight``; ``train_encoder``: stage 2 fine-tunes the encoder too."""
    if stage not in STAGES:
        raise ConfigError("esp_medsam.stage", stage, f"one of {', '.join(STAGES)}")
    if not isinstance(train_encoder, bool):
        raise ConfigError("esp_medsam.train_encoder", train_encoder, "true or false")
    _modules(student, encoder, "esp_medsam.encoder")
    if stage == "decoder":
        parts = set_trainable(student, stage, encoder, train_encoder)
        return Recipe([Term("ce")], note=f"esp_medsam decoder: ce; trains {' + '.join(parts)}")
    if teacher is None:
        raise ConfigError("method.teacher", None, "stage 'encoder' regresses a teacher encoder")
    if not isinstance(tap, str) or tap.split(".")[0] not in set(encoder):
        raise ConfigError("esp_medsam.tap", tap, f"a module path inside the encoder {encoder}")
    t_tap = tap if teacher_tap is None else teacher_tap
    if not isinstance(t_tap, str) or t_tap not in dict(teacher.named_modules()):
        raise ConfigError("esp_medsam.teacher_tap", t_tap, "a module path of the teacher")
    if tap not in dict(student.named_modules()):
        raise ConfigError("esp_medsam.tap", tap, "a module path of the student")
    w = _weight("esp_medsam.feature_weight", feature_weight)
    parts = set_trainable(student, stage, encoder)
    term = Term("mse", student=tap, teacher=t_tap, projector="conv1x1", weight=w,
                name="encoder_mse")
    return Recipe([term], note=f"esp_medsam encoder: mse {tap} -> {t_tap}; trains "
                               f"{' + '.join(parts)}")


def pipeline(student: nn.Module, teacher: nn.Module, unlabelled_train, train, val=None,
             test=None, *, encoder_epochs: int = 5, decoder_epochs: int = 5,
             encoder_lr: float = 3e-3, decoder_lr: float = 3e-3, train_encoder: bool = False,
             seed: int = 0, task=None, params: dict | None = None, **trainer_kw) -> dict:
    """Stage 1 on ``unlabelled_train`` (no validation: nothing to select on without labels,
    the last epoch is kept), then stage 2 on ``train`` with selection on ``val`` and ``test``
    read once. Same ``student`` object throughout; it leaves fully trainable
    (:func:`release`). ``params`` go to both recipes; ``trainer_kw`` to both Trainers.
    Returns ``{"encoder": stage-1 results, "decoder": stage-2 results, "student"}``."""
    from ..distiller import Distiller
    from ..train import Trainer
    from . import build

    task = TASK if task is None else task
    out = {}
    try:
        for stage, data, v, t, epochs, lr in (
            ("encoder", unlabelled_train, None, None, encoder_epochs, encoder_lr),
            ("decoder", train, val, test, decoder_epochs, decoder_lr),
        ):
            use = teacher if stage == "encoder" else None
            kw = dict(params or {})
            if stage == "decoder":
                kw["train_encoder"] = train_encoder
            recipe = build("esp_medsam", student, use, field=f"pipeline.{stage}", stage=stage,
                           **kw)
            d = Distiller(student, use, recipe.terms, task=task, seed=seed)
            res = Trainer(d, data, v, t, epochs=epochs, lr=lr, seed=seed, **trainer_kw).fit()
            d.close()
            out[stage] = dict(res, note=recipe.note)
    finally:
        release(student)
    out["student"] = student
    return out
