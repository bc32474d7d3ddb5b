"""ProC-KD: prototype-guided cross-task knowledge distillation.

Li et al., "Prototype-guided Cross-task Knowledge Distillation for Large-scale Models"
(2022). The teacher's and the student's label spaces differ (here: a teacher on digits
0-4, a student on 5-9), so logits cannot be matched; what transfers is local structure
(strokes, loops, ends), which both tasks share. No official code exists: the three parts
below are our reading of the abstract (inference throughout), with the maths in
:mod:`crossdistill.losses.prototypes`:

1. **Prototypes** (:func:`fit_to_teacher`): K vectors ``P`` fitted to the frozen teacher's
   local features ``t`` (every spatial position of one stage, on the student's training
   images) by soft assignment and reconstruction,
   ``min_P mean ||t - sum_k a_k(t) p_k||^2 / D`` with ``a_k(t) = softmax_k(-||t - p_k||^2 /
   (D tau))``, then frozen.
2. **Task-adaptive augmentation** (:class:`ProtoAugmented`): at the student's last stage,
   each local feature ``s`` attends over the frozen prototypes and the retrieved feature is
   added before the head: ``s' = s + softmax(W_q s (W_k P)^T / sqrt(d)) W_v P``
   (``W_q``, ``W_k``, ``W_v`` learnt; ``W_v`` starts at zero, so training starts from the
   plain student).
3. **Distillation** (the ``proc_kd`` loss): the student's own local features (before the
   augmentation) through a 1x1-conv projector ``phi`` onto the teacher's, matched to the
   prototype reconstruction of the teacher's feature at the same position:
   ``L_proto = mean ||phi(s) - r(t)||^2 / D``, ``r(t) = sum_k a_k(t) p_k``.

``L = CE(y, student(x)) [labelled] + lambda * L_proto [every image]``, ``lambda = 1``. The
FitNet-style baseline across label spaces is the same student without the augmentation and
``||phi(s) - t||^2`` (the ``fitnet`` recipe on the same taps); logit KD is undefined here.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..losses.prototypes import attend, fit_prototypes, to_tokens
from ..registry import METHODS
from ..schema import NonNeg


class PrototypeAttention(nn.Module):
    """``s + attend(W_q s, W_k P, W_v P)`` on (B, C, H, W) maps (1x1 convs = per-position
    linear maps); ``P`` (K, D) is a frozen buffer, ``W_v`` zero at init."""

    def __init__(self, channels: int, prototypes: Tensor, dim: int = 32):
        super().__init__()
        p = torch.as_tensor(prototypes).detach().float()
        if p.dim() != 2:
            raise ConfigError("proc_kd.prototypes", tuple(p.shape), "a (K, D) matrix")
        self.register_buffer("prototypes", p)
        self.query = nn.Conv2d(channels, dim, 1, bias=False)
        self.key = nn.Linear(p.shape[1], dim, bias=False)
        self.value = nn.Linear(p.shape[1], channels, bias=False)
        nn.init.zeros_(self.value.weight)

    def forward(self, s: Tensor) -> Tensor:
        q = to_tokens(self.query(s))  # (B, HW, d)
        r = attend(q, self.key(self.prototypes), self.value(self.prototypes))  # (B, HW, C)
        return s + r.transpose(1, 2).reshape(s.shape)


class AugmentedStage(nn.Module):
    """A stage followed by the prototype attention: ``body`` (the original stage, whose
    output are the student's own local features) then ``augment``."""

    def __init__(self, body: nn.Module, augment: nn.Module):
        super().__init__()
        self.body, self.augment = body, augment

    def forward(self, x):
        return self.augment(self.body(x))


def _channels(module: nn.Module, field: str) -> int:
    last = None
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            last = m.num_features
        elif isinstance(m, nn.Conv2d):
            last = m.out_channels
    if last is None:
        raise ConfigError(field, type(module).__name__,
                          "a stage with a Conv2d / BatchNorm2d (its output channels); pass "
                          "channels= explicitly")
    return last


class ProtoAugmented(nn.Module):
    """A zoo CNN with :class:`PrototypeAttention` after stage ``at`` (default its last, the
    one before the head). Taps: ``local_path`` = the student's own local features,
    ``augmented_path`` = after the augmentation; ``stages`` / ``feature_path`` as the
    wrapped model's, under ``net.``. ``prototypes`` and ``tau`` are what the ``proc-kd``
    recipe distils toward."""

    def __init__(self, model: nn.Module, prototypes: Tensor, *, at: str | None = None,
                 dim: int = 32, tau: float = 0.1, channels: int | None = None):
        super().__init__()
        stages = getattr(model, "stages", None)
        if at is None:
            if not stages:
                raise ConfigError("proc_kd.student", type(model).__name__,
                                  "a zoo model with `stages`, or at= a module path")
            at = stages[-1]
        try:
            body = model.get_submodule(at)
        except AttributeError:
            raise ConfigError("proc_kd.at", at, f"a module path of the student; stages: "
                              f"{', '.join(stages or [])}") from None
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ConfigError("proc_kd.dim", dim, "a positive attention width")
        if not (isinstance(tau, (int, float)) and tau > 0):
            raise ConfigError("proc_kd.tau", tau, "a positive temperature")
        c = channels or _channels(body, "proc_kd.at")
        parent, _, name = at.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name,
                AugmentedStage(body, PrototypeAttention(c, prototypes, dim)))
        self.net = model
        self.at, self.tau = at, float(tau)
        self.local_path, self.augmented_path = f"net.{at}.body", f"net.{at}"
        self.stages = [f"net.{s}" for s in (stages or [])]
        self.feature_path = f"net.{model.feature_path}" if getattr(
            model, "feature_path", None) else None
        self.family = getattr(model, "family", "proc_kd")

    @property
    def prototypes(self) -> Tensor:
        return self.net.get_submodule(self.at).augment.prototypes

    def forward(self, *args, **kwargs):
        return self.net(*args, **kwargs)


@torch.no_grad()
def local_features(model: nn.Module, data, tap: str, *, io=None, batch_size: int = 512,
                   limit: int | None = None) -> Tensor:
    """(N * H * W, D) local features of ``model`` at ``tap`` (a module path; maps or
    tokens) over ``data`` (the first ``limit`` samples), in eval mode."""
    from ..data.loaders import eval_batches
    from ..taps import Capture, Tap
    from ..train.loop import eval_io

    _, adapter = eval_io("classification", io)
    cap = Capture(model, {"f": Tap.parse(tap)}, "proc_kd.teacher_tap")
    was = model.training
    model.eval()
    out, seen = [], 0
    try:
        for batch, _ in eval_batches(data, batch_size):
            cap.clear()
            cap.active = True
            adapter.call(model, batch)
            cap.active = False
            f = to_tokens(cap.get("f").float())
            out.append(f.reshape(-1, f.shape[-1]))
            seen += len(batch["idx"])
            if limit is not None and seen >= limit:
                break
    finally:
        cap.remove()
        model.train(was)
    return torch.cat(out)


def fit_to_teacher(teacher: nn.Module, data, *, tap: str | None = None, k: int = 16,
                   tau: float = 0.1, steps: int = 200, lr: float = 0.05, seed: int = 0,
                   limit: int | None = None, io=None) -> Tensor:
    """ProC-KD step 1: K prototypes fitted to the frozen ``teacher``'s local features at
    ``tap`` (default its last stage) on ``data`` (the student's training images, labels
    unused). Returns (K, D)."""
    from . import stage_tap

    tap = tap or stage_tap(teacher, -1, "proc_kd.teacher")
    feats = local_features(teacher, data, tap, io=io, limit=limit)
    return fit_prototypes(feats, k, tau=tau, steps=steps, lr=lr, seed=seed)


@METHODS.register(
    "proc-kd",
    paper="Prototype-guided Cross-task Knowledge Distillation for Large-scale Models",
    year=2022,
    family="cross-task",
)
def proc_kd(student, teacher, *, teacher_tap: str | None = None, weight: NonNeg = 1.0,
            ce_weight: NonNeg = 1.0, target: Literal["teacher", "self"] = "teacher",
            projector: str = "conv1x1"):
    """ProC-KD (module docstring): ``ce_weight * CE + weight * L_proto`` for a
    :class:`ProtoAugmented` student whose prototypes were fitted to this teacher
    (:func:`fit_to_teacher`); ``teacher_tap`` the teacher stage they were fitted on (default
    its last). ``target="self"``: the student's own projected feature's reconstruction."""
    from ..distiller import Term
    from ..losses.prototypes import TARGETS
    from . import Recipe, stage_tap

    if not isinstance(student, ProtoAugmented):
        raise ConfigError("method.student", type(student).__name__,
                          "a ProtoAugmented(model, prototypes) student "
                          "(crossdistill.methods.proc_kd)")
    if teacher is None:
        raise ConfigError("method.teacher", None, "proc-kd distils a teacher's local features")
    if target not in TARGETS:
        raise ConfigError("proc_kd.target", target, f"one of {', '.join(TARGETS)}")
    t_tap = teacher_tap or stage_tap(teacher, -1, "method.teacher")
    terms = [Term("ce", weight=ce_weight),
             Term("proc_kd", student=student.local_path, teacher=t_tap, projector=projector,
                  weight=weight, prototypes=student.prototypes, tau=student.tau, target=target)]
    return Recipe(terms, note=f"proc-kd: CE + prototype-reconstruction KD at {t_tap} "
                  f"(K={student.prototypes.shape[0]}), prototype attention at {student.at}")


__all__ = ["AugmentedStage", "PrototypeAttention", "ProtoAugmented", "fit_to_teacher",
           "local_features", "proc_kd"]
