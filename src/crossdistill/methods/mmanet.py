"""MMANet: margin-aware distillation and modality-aware regularisation for incomplete
multimodal learning.

Paper: Wei, Luo & Luo, "MMANet: Margin-aware Distillation and Modality-aware Regularization
for Incomplete Multimodal Learning", CVPR 2023; official code shicaiwei123/MMANet-CVPR2023
(``classification/loss/kd/mad.py``, ``lib/model_develop.py``). Maths: ``mad`` and ``mar`` in
``losses/crossmodal.py``.

The teacher is the full multimodal network trained on complete data; the deployment network
(the student) has the same architecture and trains with random modality dropout (the
``modality_dropout`` prepare stage zeroes whole inputs per sample and writes
``present_<key>``); the regularisation network is a set of unimodal auxiliary heads (in the
``mar`` loss) trained only on the samples whose dropout pattern is a *weak* combination.
``L = CE(fusion) + mar_weight * MAR + mad_weight * MAD``, MAD and MAR switched on after
``begin_epoch`` epochs of CE alone (the official code: 5 of 100; it also skips epoch 0).

The teacher must see the *complete* batch while the student sees the dropped one: the
``modality_dropout`` stage with ``teacher="complete"`` is student-only (the teachers read
the inputs as they were before it).

Weak combinations: the official code mines them during the first epochs from the student's
own predicted-label histograms (Eq. 9-13). Here they are a parameter (``weak=[["audio"]]``:
the samples where only the audio survived) or mined once on the val split before training by
:func:`mine_weak` (lowest accuracy of a probe model, by default the teacher, per combination;
``criterion="kl"`` uses the paper's label-histogram divergence instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from typing import Literal

import torch

from ..adapters import ModelIO
from ..distiller import Distiller, Term
from ..errors import ConfigError
from ..registry import METHODS
from ..schema import NonNeg
from ..taps import LOGITS
from . import Recipe, build, embedding_tap


@METHODS.register(
    "mmanet",
    paper="MMANet: Margin-aware Distillation and Modality-aware Regularization for "
    "Incomplete Multimodal Learning",
    year=2023,
    family="multimodal",
)
def mmanet(
    student,
    teacher,
    *,
    weak: list[list[str]] | None = None,
    modalities: list[str] = ("image", "audio"),
    mad_weight: NonNeg = 1.0,
    mar_weight: NonNeg = 1.0,
    begin_epoch: NonNeg = 1.0,
    relation: Literal["mad", "sp"] = "mad",
    weighting: Literal["row", "column"] = "row",
    student_tap: str | None = None,
    teacher_tap: str | None = None,
    branch_taps: list[str] | None = None,
) -> Recipe:
    """``CE + mar_weight * MAR + mad_weight * MAD`` (MAR and MAD from ``begin_epoch`` on).

    MAD compares ``student_tap`` / ``teacher_tap`` (default: each model's penultimate
    embedding, for ``fusion`` the fused vector ``fc:input``: the last stage before the head);
    ``relation="sp"`` puts plain SP on the same taps instead (MAD's unweighted baseline, same
    scale). MAR's heads read ``branch_taps`` (default ``<modality>_branch``, the zoo fusion
    model's per-modality embeddings); ``weak`` is required when ``mar_weight > 0`` (see
    :func:`mine_weak`). Train it with the ``modality_dropout`` stage at ``teacher="complete"``
    (:func:`mmanet_distill` does).

    Scale: our MAD (row-weighted, mean over j) equals SP at uniform weights; the official
    code's column-weighted sum is about B times larger (AV digits, B = 64, a 2-epoch fusion
    teacher: 0.47 vs 0.0071; SP 0.0087), so ``mad_weight=1`` (the paper's lambda) is a much
    weaker MAD than the official run's, and ``mad_weight=B`` matches its strength."""
    if teacher is None:
        raise ConfigError("method.teacher", None, "mmanet distils from a multimodal teacher")
    mods = list(modalities)
    s_tap = student_tap or embedding_tap(student)
    t_tap = teacher_tap or embedding_tap(teacher)
    terms = [Term("ce")]
    if relation == "mad":
        terms.append(Term("mad", begin=begin_epoch, student=[s_tap], teacher=[t_tap, LOGITS],
                              weight=mad_weight, weighting=weighting))
    elif relation == "sp":
        terms.append(Term("sp", begin=begin_epoch, student=s_tap, teacher=t_tap,
                              weight=mad_weight))
    else:
        raise ConfigError("method.relation", relation, "mad or sp")
    if mar_weight > 0:
        if weak is None:
            raise ConfigError(
                "method.weak", None, "the weak modality combinations, e.g. [[audio]] (mine "
                "them with crossdistill.methods.mmanet.mine_weak), or mar_weight: 0",
            )
        branches = list(branch_taps) if branch_taps else [f"{m}_branch" for m in mods]
        if len(branches) != len(mods):
            raise ConfigError("method.branch_taps", branches, f"one per modality: {mods}")
        terms.append(Term("mar", begin=begin_epoch, student=[*branches, LOGITS],
                              teacher=None, weight=mar_weight, modalities=mods,
                              weak=[list(w) for w in weak]))
    return Recipe(terms, note=f"mmanet: {relation} on {s_tap} <- {t_tap}, weak={weak}")


# --------------------------------------------------------------------------------------
# weak-combination mining
# --------------------------------------------------------------------------------------
def combination_scores(
    model, data, *, modalities: Sequence[str] = ("image", "audio"), inputs=None,
    batch_size: int = 256, device="cpu",
) -> dict[tuple[str, ...], dict]:
    """Per combination of present modalities (every non-empty subset): the accuracy of
    ``model`` on ``data`` with the other modalities zeroed, and its predicted-label
    histogram. ``inputs``: the model's batch keys (default ``modalities``)."""
    from ..data.loaders import eval_batches

    mods = list(modalities)
    io = ModelIO(list(inputs or mods), field="mmanet.inputs")
    combos = [c for r in range(len(mods), 0, -1) for c in combinations(mods, r)]
    out = {c: {"correct": 0.0, "n": 0, "hist": None} for c in combos}
    was = model.training
    model.eval()
    with torch.no_grad():
        for batch, _ in eval_batches(data, batch_size):
            batch = {k: v.to(device) for k, v in batch.items()}
            for c in combos:
                view = {k: torch.zeros_like(v) if k in mods and k not in c else v
                        for k, v in batch.items()}
                z = io.logits(io.call(model, view))
                pred, y = z.argmax(-1), batch["y"]
                ok = y != -100
                rec = out[c]
                rec["correct"] += float((pred == y)[ok].sum())
                rec["n"] += int(ok.sum())
                h = torch.bincount(pred[ok].cpu(), minlength=z.shape[-1])
                rec["hist"] = h if rec["hist"] is None else rec["hist"] + h
    model.train(was)
    for rec in out.values():
        rec["acc"] = rec["correct"] / max(rec["n"], 1)
    return out


def mine_weak(
    model, data, *, modalities: Sequence[str] = ("image", "audio"), inputs=None,
    criterion: Literal["acc", "kl"] = "acc", expand: bool = True, batch_size: int = 256,
    device="cpu",
) -> list[list[str]]:
    """The weak modality combination(s) for MAR, mined on ``data`` (the val split) with a
    probe ``model`` (the teacher, or a student trained with dropout for a few epochs).

    Candidates are the incomplete combinations (the full one is the reference). ``"acc"``:
    the one with the lowest accuracy; ``"kl"``: the one whose predicted-label histogram is
    farthest from the full combination's, ``KL(h_c || h_full)`` (the paper's Eq. 9-13; the
    official code soft-maxes the histograms first, we compare them directly, smoothed by
    1e-6). With ``expand`` (as the official code) each single modality of the weak
    combination is added too: ``[[a, b], [a], [b]]``.
    """
    mods = list(modalities)
    if len(mods) < 2:
        raise ConfigError("mmanet.modalities", mods, "two or more modalities")
    if criterion not in ("acc", "kl"):
        raise ConfigError("mmanet.criterion", criterion, "acc or kl")
    scores = combination_scores(model, data, modalities=mods, inputs=inputs,
                                batch_size=batch_size, device=device)
    full = tuple(mods)
    candidates = [c for c in scores if c != full]
    if criterion == "acc":
        weakest = min(candidates, key=lambda c: scores[c]["acc"])
    else:
        def div(c):
            h = scores[c]["hist"].double() + 1e-6
            f = scores[full]["hist"].double() + 1e-6
            h, f = h / h.sum(), f / f.sum()
            return float((h * (h / f).log()).sum())

        weakest = max(candidates, key=div)
    out = [list(weakest)]
    if expand and len(weakest) > 1:
        out += [[m] for m in weakest]
    return out


# --------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------
def mmanet_distill(
    teacher,
    student,
    train,
    val,
    test=None,
    *,
    method: str = "mmanet",
    modalities: Sequence[str] = ("image", "audio"),
    rate: float = 0.3,
    views: dict | None = None,
    weak: list[list[str]] | None = None,
    epochs: int = 8,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    trainer_kw: dict | None = None,
    **params,
) -> dict:
    """Train ``student`` (reads ``modalities``) with modality dropout at ``rate`` from the
    complete-input ``teacher`` with recipe ``method`` (``"mmanet"``; ``"scratch"`` is the
    plain CE + dropout baseline, run without the teacher), evaluated with every modality and
    each one alone (``views``, default ``{"image_only": ["audio"], "audio_only":
    ["image"]}``). For ``mmanet`` without ``weak`` (and ``mar_weight`` not 0), the weak
    combinations are mined on ``val`` with the teacher first (:func:`mine_weak`).
    ``params`` go to the recipe. Returns ``{"student"`` (the best epoch's weights, a clean
    copy without tap hooks), ``"weak", "results", "distiller"}``.
    """
    from ..train import Trainer

    mods = list(modalities)
    if views is None:
        views = {f"{m}_only": [o for o in mods if o != m] for m in mods}
    task = {"name": "classification", "inputs": mods, "views": views}
    if method == "mmanet":
        if weak is None and params.get("mar_weight", 1.0) > 0:
            weak = mine_weak(teacher, val, modalities=mods,
                             device=next(teacher.parameters()).device)
        params.update(weak=weak, modalities=mods)
    use_teacher = teacher if method != "scratch" else None
    recipe = build(method, student, use_teacher, **params)
    io = {"inputs": mods}
    d = Distiller(
        student, use_teacher, recipe.terms, io=io, teacher_io=io if use_teacher else None,
        task=task, hooks=recipe.hooks, seed=seed,
        prepare=[{"name": "modality_dropout", "keys": mods, "rate": rate, "teacher": "complete"}],
    )
    kw = dict(epochs=epochs, batch_size=batch_size, lr=lr, optimizer="adamw",
              weight_decay=0.0, progress=False, seed=seed)
    kw.update(trainer_kw or {})
    res = Trainer(d, train, val, test, **kw).fit()
    return {"student": d.export(), "weak": weak, "results": res, "distiller": d}
