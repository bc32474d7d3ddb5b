"""Trans-Encoder: iterated self- and mutual distillation between bi- and cross-encoders.

Liu et al., "Trans-Encoder: Unsupervised sentence-pair modelling through self- and
mutual-distillations" (ICLR 2022). Starting from an unsupervised bi-encoder, with unlabelled
sentence pairs only, each cycle makes two hand-offs:

1. **bi -> cross** (Eq. 1): the bi-encoder labels every pair with ``cos(u, v)``; a
   cross-encoder learns these soft labels by BCE, each pair in both orders ``(a, b)`` and
   ``(b, a)`` (loss ``pair_bce``; targets clamped to ``[0, 1]``, see below);
2. **cross -> bi** (Eq. 2): the cross-encoder labels the pairs with ``sigmoid(z)`` (order
   ``(a, b)``, as the official ``predict`` call); the bi-encoder regresses ``cos(u, v)`` on them
   by MSE (loss ``pair_cosine_mse``).

**Mutual** (Sec. 2.3): two bi-encoders and two cross-encoders of different pretrained models
run side by side; each hand-off's label is the mean of the two teachers' scores (mean cosine,
mean sigmoid), and both receivers learn it.

The ``trans-encoder`` recipe gives one hand-off's term, the direction read from the student:
a :class:`~crossdistill.models.cross_text.CrossEncoder` student learns from bi-encoder
teachers, a :class:`~crossdistill.models.cross_text.BiEncoder` student from cross-encoder
teachers (a :class:`~crossdistill.methods.members.Members` group of them for the mutual
variant, or a teacher store of their scores). :func:`trans_encoder_cycles` runs the cycles as
a loop of ordinary distillation runs, ``Distiller`` + ``Trainer`` per receiver and hand-off.

Paper / official code (amzn/trans-encoder ``src/self_distill.py``,
``src/mutual_distill_parallel.py``) vs here:

- Raw cosines can be negative and the official code uses them as BCE targets; here targets
  are ``clamp(cos, 0, 1)`` (``clamp=False``: the official targets). In the mutual variant the
  two cosines are averaged, then clamped.
- The official ``fit`` keeps the checkpoint that scores best on the *gold-labelled* dev set
  (every 200 steps), and picks the final cycle on it too, so the "unsupervised" models are
  selected with labels. Here the caller's ``val`` split selects: in this package's benchmark
  it holds the synthetic paraphrase labels of held-out text (never test), per epoch.
- ``--init_with_new_models`` (on in the official scripts; always on in the mutual script):
  each hand-off's receiver starts again from its start checkpoint. Off, the official code
  hands the *same* transformer weights from role to role (the cross-encoder continues from the
  last bi-encoder and back); here the two roles may have different architectures, so each
  receiver continues from its own previous weights instead.
- The official code labels (and trains on) every pair of the task, test pairs included;
  here only the ``train`` split's pairs are labelled.
- Schedules: sentence-transformers' linear warm-up then linear decay is replaced by the
  trainer's warm-up then cosine decay (``schedule`` may be set in ``cross_fit`` / ``bi_fit``).
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from ..errors import ConfigError
from ..registry import METHODS
from ..schema import NonNeg

CROSS_FIT = dict(epochs=1, batch_size=32, lr=2e-5, warmup_epochs=0.1, weight_decay=0.01,
                 optimizer="adamw", schedule="cosine")  # official: 1 epoch, batch 32, 10 % warm-up
BI_FIT = dict(epochs=10, batch_size=128, lr=5e-5, warmup_epochs=0.0, weight_decay=0.01,
              optimizer="adamw", schedule="cosine")  # official: 10 epochs, batch 128, lr 5e-5


def _kind(model) -> str | None:
    from ..models.cross_text import BiEncoder, CrossEncoder
    from .members import Members

    if isinstance(model, CrossEncoder):
        return "cross"
    if isinstance(model, BiEncoder):
        return "bi"
    if isinstance(model, Members):
        kinds = {_kind(model[n]) for n in model.names}
        return kinds.pop() if len(kinds) == 1 else "mixed"
    if getattr(model, "is_store", False):
        return "store"
    return None


def _teacher_taps(teacher, direction: str) -> list[str]:
    """Each teacher's pair signal: a bi-encoder's ``[u, v]``, a cross-encoder's logit."""
    from .members import Members

    if getattr(teacher, "is_store", False):
        own = [t for t in teacher.taps if t != "logits"]
        return own or ["logits"]  # stored members' scores, else the stored score
    if isinstance(teacher, Members):
        if direction == "bi2cross":
            return [f"{n}.{side}" for n in teacher.names for side in ("a_out", "b_out")]
        return list(teacher.names)
    return ["a_out", "b_out"] if direction == "bi2cross" else ["logits"]


@METHODS.register(
    "trans-encoder",
    paper="Trans-Encoder: Unsupervised sentence-pair modelling through self- and "
    "mutual-distillations",
    year=2022,
    family="retrieval",
)
def trans_encoder(student, teacher, *, clamp: bool = True, weight: NonNeg = 1.0,
                  teacher_taps: list | None = None):
    """One Trans-Encoder hand-off (module docstring, Eq. 1-2). A cross-encoder student:
    ``pair_bce`` on the bi-encoder teachers' clamped mean cosine; a bi-encoder student:
    ``pair_cosine_mse`` on the cross-encoder teachers' mean sigmoid score. ``teacher`` is one
    model, a ``Members`` group (mutual) or a teacher store of their signals;
    ``teacher_taps`` overrides where each teacher's signal is read."""
    from ..distiller import Term
    from . import Recipe

    s_kind, t_kind = _kind(student), _kind(teacher)
    if s_kind not in ("bi", "cross"):
        raise ConfigError("method.student", type(student).__name__,
                          "a CrossEncoder (bi -> cross) or a BiEncoder (cross -> bi) from "
                          "crossdistill.models.cross_text")
    if teacher is None:
        raise ConfigError("method.teacher", None, "trans-encoder distils the other encoder "
                          "kind's pair scores: give a teacher")
    direction = "bi2cross" if s_kind == "cross" else "cross2bi"
    want = "bi" if direction == "bi2cross" else "cross"
    if t_kind not in (want, "store"):
        raise ConfigError("method.teacher", type(teacher).__name__,
                          f"a {'BiEncoder' if want == 'bi' else 'CrossEncoder'} teacher (or a "
                          f"Members group of them) for a {s_kind}-encoder student")
    taps = list(teacher_taps) if teacher_taps else _teacher_taps(teacher, direction)
    if direction == "bi2cross":
        term = Term("pair_bce", student=["logits"], teacher=taps, clamp=clamp, weight=weight)
        note = f"trans-encoder bi -> cross: BCE on clamp(mean cos) of {taps}"
    else:
        term = Term("pair_cosine_mse", student=["a_out", "b_out"], teacher=taps,
                    weight=weight)
        note = f"trans-encoder cross -> bi: MSE(cos(u, v), mean sigmoid of {taps})"
    return Recipe([term], note=note)


# -- the cycles -----------------------------------------------------------------------------
@dataclass
class HandOff:
    """One hand-off's receivers, as trained (best epoch on val) and scored on val."""

    cycle: int
    direction: str  # "bi2cross" or "cross2bi"
    models: dict[str, nn.Module]
    val_auc: dict[str, float]
    val_curve: dict[str, list[float]]
    seconds: float
    results: dict[str, dict] = field(default_factory=dict)


def _named(models, ios, what: str) -> list[tuple[str, nn.Module, dict]]:
    if isinstance(models, nn.Module):
        models = {what: models}
    if not isinstance(models, Mapping) or not 1 <= len(models) <= 2:
        raise ConfigError(f"trans_encoder.{what}", type(models).__name__,
                          "one model (self-distillation) or {name: model} of two (mutual)")
    ios = ios if isinstance(ios, Mapping) and set(ios) <= set(models) else {
        n: ios for n in models}
    out = []
    for n, m in models.items():
        kind = _kind(m)
        if kind != what:
            raise ConfigError(f"trans_encoder.{what}.{n}", type(m).__name__,
                              f"a {'BiEncoder' if what == 'bi' else 'CrossEncoder'}")
        io = ios.get(n) or m.io()
        out.append((n, m, io))
    return out


def _group(entries):
    """One teacher (a frozen copy) and its adapter: the model itself, or a Members group."""
    from .members import Members

    if len(entries) == 1:
        _, m, io = entries[0]
        return copy.deepcopy(m), io
    members = {n: copy.deepcopy(m) for n, m, _ in entries}
    reads = {n: list(io["inputs"].values()) for n, _, io in entries}
    out = "mean" if _kind(entries[0][1]) == "cross" else entries[0][0]
    g = Members(members, reads=reads, output=out)
    return g, g.io()


def _fit(student, s_io, teacher, t_io, train, val, fit_kw: dict, seed: int, clamp: bool):
    from ..distiller import Distiller
    from ..train.loop import Trainer
    from . import build

    recipe = build("trans-encoder", student, teacher, clamp=clamp)
    d = Distiller(student, teacher, recipe.terms, task={"name": "pair_auc"}, io=s_io,
                  teacher_io=t_io, seed=seed)
    kw = {"progress": False, **fit_kw, "seed": seed}
    kw["warmup_epochs"] = kw.get("warmup_epochs", 0.0) * kw.get("epochs", 1)
    t = Trainer(d, train, val, **kw)
    res = t.fit()
    model = d.clean_student()
    d.close()
    curve = [float(r["val_auc"]) for r in t.log.rows if "val_auc" in r]
    return model, res, curve


def _store(teacher, io, data, taps, out_dir):
    from ..adapters import ModelIO
    from ..teachers import TeacherStore, cache_teacher

    path = cache_teacher(teacher, data, out_dir, io=ModelIO.parse(io, "teacher"), taps=taps,
                         dtype="float32", progress=False)
    return TeacherStore(path)


def _check_val(val) -> None:
    from ..data.dataset import IGNORE_INDEX

    y = val["y"] if "y" in val else None
    ok = y is not None and ((y == 1).any() and (y == 0).any())
    if not ok:
        raise ConfigError("trans_encoder.val", getattr(val, "name", "val"),
                          "a split with positive and negative labelled pairs (y 1 / 0) to "
                          f"select checkpoints on (unlabelled rows carry {IGNORE_INDEX})")


def trans_encoder_cycles(
    bi,
    cross,
    train,
    val,
    *,
    train_cross=None,
    cycles: int = 3,
    bi_io=None,
    cross_io=None,
    init_with_new_models: bool = True,
    clamp: bool = True,
    cross_fit: dict | None = None,
    bi_fit: dict | None = None,
    seed: int = 0,
    on_handoff=None,
) -> list[HandOff]:
    """Run ``cycles`` Trans-Encoder cycles (module docstring); returns every hand-off.

    ``bi`` / ``cross``: one model each (self-distillation) or ``{name: model}`` of two each
    (mutual), ``bi_io`` / ``cross_io`` their adapters (default ``model.io()``; a dict by name
    for two). ``train``: the unlabelled pairs in one order (the bi-encoders' training data);
    ``train_cross``: the same pairs in both orders for the cross-encoders (default ``train``).
    Both must hold every input key the four models read. ``val``: labelled pairs that select
    each run's best epoch (pair AUC). ``cross_fit`` / ``bi_fit``: trainer settings over
    :data:`CROSS_FIT` / :data:`BI_FIT` (``warmup_epochs`` as a fraction of the run).
    ``init_with_new_models``: every receiver starts from its start weights each hand-off.
    The cross -> bi teachers are run once per hand-off into a teacher store (their scores
    do not change while the bi-encoders train). ``on_handoff(handoff)`` is called after each.
    """
    if isinstance(cycles, bool) or not isinstance(cycles, int) or cycles < 1:
        raise ConfigError("trans_encoder.cycles", cycles, "an integer >= 1")
    bis, crosses = _named(bi, bi_io, "bi"), _named(cross, cross_io, "cross")
    if len(bis) != len(crosses):
        raise ConfigError("trans_encoder.cross", len(crosses),
                          f"as many cross-encoders as bi-encoders ({len(bis)})")
    for name, fit in (("cross_fit", cross_fit), ("bi_fit", bi_fit)):
        if fit is not None and not isinstance(fit, Mapping):
            raise ConfigError(f"trans_encoder.{name}", fit, "a dict of trainer settings")
    _check_val(val)
    train_cross = train if train_cross is None else train_cross
    c_kw, b_kw = {**CROSS_FIT, **(cross_fit or {})}, {**BI_FIT, **(bi_fit or {})}
    start_bi = {n: copy.deepcopy(m) for n, m, _ in bis}
    start_cross = {n: copy.deepcopy(m) for n, m, _ in crosses}
    cur_bi = [(n, m, io) for n, m, io in bis]
    cur_cross = [(n, m, io) for n, m, io in crosses]
    out: list[HandOff] = []
    for cycle in range(1, cycles + 1):
        # bi -> cross: the bi-encoders' (mean) cosine labels every pair, both orders
        t0 = time.time()
        teacher, t_io = _group(cur_bi)
        new, h = [], HandOff(cycle, "bi2cross", {}, {}, {}, 0.0)
        for k, (n, m, io) in enumerate(cur_cross):
            student = copy.deepcopy(start_cross[n] if init_with_new_models else m)
            s = seed * 1000 + cycle * 10 + k
            model, res, curve = _fit(student, io, teacher, t_io, train_cross, val, c_kw, s, clamp)
            new.append((n, model, io))
            h.models[n], h.val_auc[n], h.val_curve[n], h.results[n] = (
                model, res["best_val_auc"], curve, res)
        cur_cross = new
        h.seconds = time.time() - t0
        out.append(h)
        if on_handoff is not None:
            on_handoff(h)
        # cross -> bi: the cross-encoders' (mean) sigmoid score labels every pair, order (a, b)
        t0 = time.time()
        group, g_io = _group(cur_cross)
        taps = [] if len(cur_cross) == 1 else list(group.names)
        new, h = [], HandOff(cycle, "cross2bi", {}, {}, {}, 0.0)
        with tempfile.TemporaryDirectory(prefix="trans-encoder-") as tmp:
            store = _store(group, g_io, train, taps, tmp)
            for k, (n, m, io) in enumerate(cur_bi):
                start = start_bi[n] if init_with_new_models else m
                student = copy.deepcopy(start)
                s = seed * 1000 + cycle * 10 + 5 + k
                model, res, curve = _fit(student, io, store, None, train, val, b_kw, s, clamp)
                new.append((n, model, io))
                h.models[n], h.val_auc[n], h.val_curve[n], h.results[n] = (
                    model, res["best_val_auc"], curve, res)
        cur_bi = new
        h.seconds = time.time() - t0
        out.append(h)
        if on_handoff is not None:
            on_handoff(h)
    return out


def best_on_val(handoffs: Sequence[HandOff], direction: str, name: str) -> HandOff:
    """The hand-off whose receiver ``name`` scored best on val (the official final pick,
    made here on the caller's val split)."""
    cands = [h for h in handoffs if h.direction == direction and name in h.val_auc]
    if not cands:
        raise ConfigError("trans_encoder.best", (direction, name), "a receiver of the cycles")
    return max(cands, key=lambda h: h.val_auc[name])
