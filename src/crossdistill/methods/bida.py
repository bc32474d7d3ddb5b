"""BiDA: bi-directional domain adaptation (Zhang et al., "Cross-domain Hyperspectral Image
Classification based on Bi-directional Domain Adaptation", IEEE TCSVT 2025), and its two
baselines: source only, and source + MMD.

The student is a :class:`~crossdistill.models.bida.BiDA` (the triple-branch model; no
teacher). Its branch outputs are taps of its return value (``output.source``,
``output.target``, ``output.fused_s``, ``output.fused_t``), so every part of the loss is an
ordinary :class:`~crossdistill.Term` (maths in :mod:`crossdistill.losses.domain`):

``L = CE(source) + mmd_weight * [MMD(source, target) + MMD(fused_s, fused_t)] / 2
+ distill_weight * [H(fused_t -> target) + H(fused_s -> source)]
+ consistency_weight * [MSE(p_source, p_ema_source) + MSE(p_target, p_ema_target)]``

with the official weights 0.1 / 0.1 / 1.0 (lambda1, lambda1, lambda2) and EMA decay 0.999.
Official code vs ours: the second MMD compares ``out_x_fusion_src`` with itself (always 0):
we compare the two fused outputs; the consistency term applies softmax twice: once here;
the distillation targets are not detached there: detached here by default
(``detach_fused=False`` reproduces it). The official MMD starts after epoch 100 of 200
(``mmd_begin``: default 0, our runs are short) and only on full batches (ours are paired, so
the two sets always have equal sizes). The official target batches carry noise augmentation
(the paper's ARS); not reproduced (the EMA copy's dropout is the only perturbation).

The EMA copy lives in the ``ema_consistency`` loss module (checkpointed, updated by its
``on_step`` after every optimiser step, never exported). Validation and test: use the
``domain_adaptation`` task (source accuracy, and target accuracy through a view that feeds
the target images to the shared-weight branch). Deploy ``student.net``: one image in,
logits out (all branches share its weights, so it is the target branch).
"""

from __future__ import annotations

from ..distiller import Term
from ..errors import ConfigError
from ..models.bida import BiDA
from ..registry import METHODS
from ..schema import Count, NonNeg, Pos, Prob
from . import Recipe

PAPER = "Cross-domain Hyperspectral Image Classification based on Bi-directional Domain Adaptation"


def _check(student, teacher, name: str) -> None:
    if not isinstance(student, BiDA):
        raise ConfigError(
            "method.student", type(student).__name__,
            f"{name} trains a crossdistill.models.bida.BiDA (BiDA(models.create('bida')))",
        )
    if teacher is not None:
        raise ConfigError("method.teacher", type(teacher).__name__, f"{name} has no teacher")


def _mmd(weight: float, begin: float, kernel_mul: float, kernel_num: int, taps, name) -> Term:
    return Term("mmd", student=list(taps), teacher=None, weight=weight, begin=begin, name=name,
                kernel_mul=kernel_mul, kernel_num=kernel_num)


@METHODS.register("bida", paper=PAPER, year=2025, family="domain")
def bida(
    student,
    teacher=None,
    *,
    mmd_weight: NonNeg = 0.1,
    distill_weight: NonNeg = 0.1,
    consistency_weight: NonNeg = 1.0,
    ema_decay: Prob = 0.999,
    detach_fused: bool = True,
    mmd_begin: NonNeg = 0.0,
    kernel_mul: Pos = 2.0,
    kernel_num: Count = 5,
) -> Recipe:
    """CE on the source branch + MMD alignment (logits and fused outputs, each at
    ``mmd_weight / 2``) + bi-directional distillation (``distill_weight``; 0 = BiDA
    without it) + EMA consistency (``consistency_weight``). Terms with weight 0 are left
    out (no EMA copy is made without the consistency term)."""
    _check(student, teacher, "bida")
    if isinstance(ema_decay, bool) or not 0.0 <= float(ema_decay) < 1.0:
        raise ConfigError("method.ema_decay", ema_decay, "a number in [0, 1)")
    terms = [Term("ce", student="output.source", name="ce")]
    if mmd_weight > 0:
        w = mmd_weight / 2
        terms += [
            _mmd(w, mmd_begin, kernel_mul, kernel_num, ["output.source", "output.target"],
                 "mmd_logits"),
            _mmd(w, mmd_begin, kernel_mul, kernel_num, ["output.fused_s", "output.fused_t"],
                 "mmd_fused"),
        ]
    if distill_weight > 0:
        for branch, fused, name in (("target", "fused_t", "distill_t"),
                                    ("source", "fused_s", "distill_s")):
            terms.append(Term("soft_ce", student=[f"output.{branch}", f"output.{fused}"],
                              teacher=None, weight=distill_weight, name=name,
                              detach_teacher=detach_fused))
    if consistency_weight > 0:
        terms.append(Term("ema_consistency", student=["output.source", "output.target"],
                          teacher=None, weight=consistency_weight, name="consistency",
                          model=student.net, keys=[student.source_key, student.target_key],
                          decay=float(ema_decay)))
    parts = [n for n, w in (("MMD", mmd_weight), ("distill", distill_weight),
                            ("EMA", consistency_weight)) if w > 0]
    return Recipe(terms, note="bida: CE(source)" + "".join(f" + {p}" for p in parts))


@METHODS.register(
    "mmd_da",
    paper="Learning Transferable Features with Deep Adaptation Networks (MMD baseline)",
    year=2015,
    family="domain",
)
def mmd_da(
    student,
    teacher=None,
    *,
    weight: NonNeg = 0.1,
    mmd_begin: NonNeg = 0.0,
    kernel_mul: Pos = 2.0,
    kernel_num: Count = 5,
) -> Recipe:
    """Source only + MMD: CE on the source branch + ``weight`` x MMD(source logits, target
    logits), the multi-kernel MMD of BiDA's alignment term (BiDA's "+ MMD" baseline; the same
    model, no coupled-branch or EMA terms). ``weight=0`` is the source-only baseline."""
    _check(student, teacher, "mmd_da")
    terms = [Term("ce", student="output.source", name="ce")]
    if weight > 0:
        terms.append(_mmd(weight, mmd_begin, kernel_mul, kernel_num,
                          ["output.source", "output.target"], "mmd_logits"))
    return Recipe(terms, note="mmd_da: CE(source)" + (" + MMD" if weight > 0 else ""))
