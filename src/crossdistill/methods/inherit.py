"""TinyCLIP's manual weight inheritance for BERT-style text towers.

Wu et al., "TinyCLIP: CLIP Distillation via Affinity Mimicking and Weight Inheritance"
(ICCV 2023), Sec. 3.2 "manual inheritance": a smaller student starts from a subset of the
teacher's weights instead of random ones. Depth: teacher blocks ``0, k, 2k, ...``
(``"interval_front"``, the official ``weight_inherit.py`` default; ``k = L_t // L_s``) or the
first ``L_s`` (``"front"``). Width: the leading hidden channels, the leading attention heads
(the query / key / value rows of those heads, the head size kept) and the leading FFN
channels. Facts from the official code (read, not copied): it slices every tensor to its
leading entries the same way; the L2 variant is the same front slice, so it is not repeated
here.

:func:`inherit_bert` works on two Hugging Face ``BertModel`` (all-MiniLM-L6-v2 is one) of
the same vocabulary and head size; the student's hidden size, head count, FFN width and
depth may each be smaller. With equal widths and every layer kept, the student computes
the teacher's function exactly (tested).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import METHODS
from ..schema import NonNeg, Pos

LAYER_CHOICES = ("interval_front", "front")


def layer_map(n_teacher: int, n_student: int, how: str = "interval_front") -> list[int]:
    """The teacher block each student block inherits."""
    if how not in LAYER_CHOICES:
        raise ConfigError("inherit.layers", how, f"one of {', '.join(LAYER_CHOICES)}")
    if not 1 <= n_student <= n_teacher:
        raise ConfigError("inherit.student_layers", n_student, f"1..{n_teacher} (the teacher's)")
    if how == "front":
        return list(range(n_student))
    k = n_teacher // n_student
    return [i * k for i in range(n_student)]


def _cfg(model, field: str) -> dict:
    c = getattr(model, "config", None)
    if c is None or getattr(c, "model_type", None) not in ("bert",):
        raise ConfigError(field, type(model).__name__, "a transformers BertModel")
    heads = int(c.num_attention_heads)
    return {"hidden": int(c.hidden_size), "heads": heads, "head": int(c.hidden_size) // heads,
            "ffn": int(c.intermediate_size), "layers": int(c.num_hidden_layers),
            "vocab": int(c.vocab_size), "positions": int(c.max_position_embeddings)}


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src[tuple(slice(0, n) for n in dst.shape)])


@torch.no_grad()
def inherit_bert(teacher: nn.Module, student: nn.Module, layers: str = "interval_front") -> dict:
    """Copy the teacher's leading weights into ``student`` in place; returns what was kept
    (``layers``: the teacher block per student block, widths)."""
    t, s = _cfg(teacher, "inherit.teacher"), _cfg(student, "inherit.student")
    for key in ("hidden", "heads", "ffn", "positions"):
        if s[key] > t[key]:
            raise ConfigError(f"inherit.student.{key}", s[key],
                              f"<= the teacher's {t[key]}: inheritance keeps leading entries")
    if s["head"] != t["head"] or s["vocab"] != t["vocab"]:
        raise ConfigError("inherit.student", {"head_size": s["head"], "vocab": s["vocab"]},
                          f"the teacher's head size {t['head']} and vocabulary {t['vocab']}")
    picks = layer_map(t["layers"], s["layers"], layers)
    te, se = teacher.embeddings, student.embeddings
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        _copy(getattr(se, name).weight, getattr(te, name).weight)
    _copy(se.LayerNorm.weight, te.LayerNorm.weight)
    _copy(se.LayerNorm.bias, te.LayerNorm.bias)
    for j, i in enumerate(picks):
        tl, sl = teacher.encoder.layer[i], student.encoder.layer[j]
        # leading heads = leading rows (heads are contiguous blocks of head_size rows)
        for a, b in ((sl.attention.self.query, tl.attention.self.query),
                     (sl.attention.self.key, tl.attention.self.key),
                     (sl.attention.self.value, tl.attention.self.value),
                     (sl.attention.output.dense, tl.attention.output.dense),
                     (sl.intermediate.dense, tl.intermediate.dense),
                     (sl.output.dense, tl.output.dense)):
            _copy(a.weight, b.weight)
            _copy(a.bias, b.bias)
        for a, b in ((sl.attention.output.LayerNorm, tl.attention.output.LayerNorm),
                     (sl.output.LayerNorm, tl.output.LayerNorm)):
            _copy(a.weight, b.weight)
            _copy(a.bias, b.bias)
    pooler_t, pooler_s = getattr(teacher, "pooler", None), getattr(student, "pooler", None)
    if pooler_t is not None and pooler_s is not None:
        _copy(pooler_s.dense.weight, pooler_t.dense.weight)
        _copy(pooler_s.dense.bias, pooler_t.dense.bias)
    return {"layers": picks, "hidden": s["hidden"], "heads": s["heads"], "ffn": s["ffn"]}


class L0Schedule:
    """TinyCLIP's automatic inheritance as a step hook: training is split into
    ``len(targets)`` pruning stages over the first ``prune_until`` of the steps. In stage
    ``k`` the gates' size target falls linearly from the last stage's to ``targets[k]``
    (reached at 80 % of the stage); at its end the encoder keeps the units of the largest
    gates up to that size (``l0_prune``, a logged structure event, so a resume replays it)
    and gets fresh gates, except after the last stage, which removes them and the budget
    term: the rest of training distils into the pruned, plain encoder."""

    def __init__(self, path: str, targets, prune_until: float, term: str = "l0"):
        self.path, self.targets = path, [float(t) for t in targets]
        self.until, self.term = float(prune_until), term

    def __call__(self, d) -> None:
        from ..models.l0 import ATTR
        from ..taps import Tap, resolve

        if not d.total_steps:
            return
        done = sum(e["op"] == "l0_prune" for e in d.structure_log)
        n = len(self.targets)
        if done >= n:
            return
        span = self.until * d.total_steps / n
        start, end = done * span, (done + 1) * span
        prev = self.targets[done - 1] if done else 1.0
        frac = min(1.0, max(0.0, (d.step - start) / (0.8 * span)))
        gates = resolve(d.student, Tap(f"{self.path}.{ATTR}"), "tinyclip.path")
        gates.target.fill_(prev + frac * (self.targets[done] - prev))
        if d.step >= end:
            keep = gates.keep(self.targets[done])
            last = done == n - 1
            d.apply_structure("l0_prune", path=self.path, heads=keep["heads"], ffn=keep["ffn"],
                              regate=not last, drop_terms=[self.term] if last else [])


@METHODS.register(
    "tinyclip",
    paper="TinyCLIP: CLIP Distillation via Affinity Mimicking and Weight Inheritance",
    year=2023,
    family="vision-language",
)
def tinyclip(
    student,
    teacher,
    *,
    inherit: bool = True,
    layers: str = "interval_front",
    alpha: NonNeg = 1.0,
    temperature: Pos = 0.07,
    teacher_temperature: Pos = 0.01,
    auto: bool = False,
    targets: list[float] = (0.5,),
    prune_until: float = 0.5,
    budget_weight: Pos = 1.0,
):
    """TinyCLIP for two :class:`~crossdistill.models.dual.DualEncoder` (Wu et al., 2023,
    Eq. 2-4): ``alpha * L_affinity + (1 - alpha) * L_clip`` (the paper's default ``alpha =
    1``: affinity mimicking alone), with the student's text tower first inheriting the
    teacher's leading weights when both are BERT-style (``inherit``; :func:`inherit_bert`,
    at recipe build time, so a resume loads its checkpoint over it).

    ``auto``: automatic inheritance (Sec. 3.2; :mod:`crossdistill.models.l0`): the student's
    text tower (with ``inherit``: of the teacher's widths, copied from the teacher's
    ``layers``; without: as the caller initialised it) gets L0 gates on heads and FFN
    channels with the ``l0_budget`` Lagrangian (``budget_weight``), and is pruned in
    ``len(targets)`` stages to ``targets`` x its size (fractions of the encoder's gated
    weights, decreasing) over the first ``prune_until`` of training (:class:`L0Schedule`)."""
    from ..distiller import Term
    from ..models.dual import DualEncoder
    from . import Recipe

    if not isinstance(student, DualEncoder) or not isinstance(teacher, DualEncoder):
        raise ConfigError("method.student", type(student).__name__,
                          "tinyclip distils a dual-encoder teacher into a dual-encoder student")
    if alpha > 1:
        raise ConfigError("tinyclip.alpha", alpha, "a weight in [0, 1]")
    note = "tinyclip: affinity mimicking"
    hooks, extra = [], []
    if auto:
        from ..models.l0 import ATTR, attach

        ts = [float(t) for t in targets]
        if not ts or any(not 0 < t < 1 for t in ts) or ts != sorted(ts, reverse=True):
            raise ConfigError("tinyclip.targets", list(targets),
                              "decreasing size fractions in (0, 1), e.g. [0.5, 0.25]")
        if not 0 < prune_until <= 1:
            raise ConfigError("tinyclip.prune_until", prune_until, "a fraction in (0, 1]")
        s_enc = getattr(student.text, "encoder", None)
        s_cfg = _cfg(s_enc, "inherit.student")
        if inherit:  # start from the teacher's full width (its layers: ``layers``)
            t_cfg = _cfg(getattr(teacher.text, "encoder", None), "inherit.teacher")
            diff = {k: s_cfg[k] for k in ("hidden", "heads", "ffn") if s_cfg[k] != t_cfg[k]}
            if diff:
                raise ConfigError("tinyclip.auto", diff, "a student text tower of the "
                                  f"teacher's widths (hidden {t_cfg['hidden']}, heads "
                                  f"{t_cfg['heads']}, ffn {t_cfg['ffn']}; fewer layers allowed):"
                                  " automatic inheritance starts from the teacher and learns "
                                  "what to drop")
            kept = inherit_bert(teacher.text.encoder, s_enc, layers)
            note += f", text tower = teacher layers {kept['layers']} at full width"
        attach(s_enc)
        path = "text.encoder"
        hooks.append(L0Schedule(path, ts, prune_until))
        extra.append(Term("l0_budget", student=f"{path}.{ATTR}", teacher=None, name="l0",
                          weight=float(budget_weight)))
        note += f", L0-pruned to {ts} of its size"
    elif inherit:
        kept = inherit_bert(teacher.text.encoder, student.text.encoder, layers)
        note += f", text tower inherited from teacher layers {kept['layers']}"
    s_taps, t_taps = [student.image_tap, student.text_tap], [teacher.image_tap, teacher.text_tap]
    terms = []
    if alpha > 0:
        terms.append(Term("affinity", student=s_taps, teacher=t_taps, weight=float(alpha),
                          temperature=temperature, teacher_temperature=teacher_temperature))
    if alpha < 1:
        terms.append(Term("clip", student=s_taps, teacher=None, weight=1.0 - float(alpha),
                          temperature=temperature))
    return Recipe(terms + extra, hooks=hooks, note=note)
