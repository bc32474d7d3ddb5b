"""DistillNearest and DistillWeighted: distilling from similar source models to a target task
with few labels.

Borup, Phoo, Hariharan & Andersen, "Distilling from Similar Tasks for Transfer Learning on a
Budget" (ICCV 2023). A target task has a few labelled images and many unlabelled ones; S
source models were trained on other domains and come without their data. No official code
was found: the score and the weighting below are our inference (documented as such).

1. **Task similarity** (:func:`transferability`): each source embeds the labelled target
   images (its penultimate features, ``feature_path:input``) and a score function from
   :data:`TRANSFER_SCORES` rates how well those features separate the target classes. The
   default ``"probe"`` is the held-out accuracy of a linear probe (multinomial logistic
   regression, L2 ``weight_decay``) in stratified ``folds``-fold cross-validation over the
   labelled set; ``"knn"`` the held-out accuracy of a cosine k-NN vote on the same folds.
   Both read the labelled target set only, never val or test. Register your own with
   ``@TRANSFER_SCORES.register(name)``: ``fn(features (N, D), labels (N,), **params) ->
   float`` (higher = more similar).
2. **Probed teachers** (:func:`probe_sources`): each source's head is replaced by a linear
   probe fitted on all labelled target images (:func:`fit_probe`), so its logits are over
   the target's classes; this is the teacher of the KD term.
3. **DistillNearest** (``distill-nearest``), the top-scored source ``n`` only:
   ``L = CE(y, z_s) [labelled] + beta * D(W s, f_n) + gamma * T^2 KL(p_n^T || p_s^T)`` over
   every target image (labelled or not), with ``s`` the student's penultimate features,
   ``W`` a linear projector, ``f_n`` the source's features, ``D`` the L2 (``mse``) or the
   cosine distance, and ``p_n`` the probe's softmax.
4. **DistillWeighted** (``distill-weighted``), every source with its own projector:
   ``L = CE + sum_i w_i L_distill_i``, ``L_distill_i`` the bracket of (3) for source i and
   ``w_i = softmax_i(score_i / tau)`` (:func:`source_weights`; ``tau = 0.1`` on accuracies
   in [0, 1], inference).

The several sources are the distiller's named teachers (``Distiller(student, {name:
teacher})``) and each term reads one of them by ``teacher_model``: the engine's existing
multi-teacher mechanism; teachers no term reads are not run.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import METHODS, Registry
from ..schema import NonNeg, Pos, Temperature

TRANSFER_SCORES = Registry("transfer scores")
FEATURE_LOSSES = ("mse", "cosine")


# -- features, probes and scores -------------------------------------------------------------
@torch.no_grad()
def embeddings(model: nn.Module, data, *, tap: str | None = None, io=None,
               batch_size: int = 512) -> Tensor:
    """(N, D) features of ``model`` at ``tap`` (default its penultimate embedding,
    ``feature_path:input``) over ``data``, in eval mode, flattened per sample."""
    from ..data.loaders import eval_batches
    from ..taps import Capture, Tap
    from ..train.loop import eval_io
    from . import embedding_tap

    tap = tap or embedding_tap(model, "multisource.source")
    _, adapter = eval_io("classification", io)
    cap = Capture(model, {"f": Tap.parse(tap)}, "multisource.tap")
    was = model.training
    model.eval()
    out = []
    try:
        for batch, _ in eval_batches(data, batch_size):
            cap.clear()
            cap.active = True
            adapter.call(model, batch)
            cap.active = False
            out.append(cap.get("f").float().flatten(1))
    finally:
        cap.remove()
        model.train(was)
    return torch.cat(out)


def _check_xy(feats: Tensor, y: Tensor, field: str) -> None:
    if feats.dim() != 2 or y.dim() != 1 or len(feats) != len(y) or len(y) < 2:
        raise ConfigError(field, (tuple(feats.shape), tuple(y.shape)),
                          "(N, D) features and (N,) labels, N >= 2")
    if (y < 0).any():
        raise ConfigError(field, "labels < 0", "labelled samples only (drop y = -100)")


def fit_probe(feats: Tensor, y: Tensor, num_classes: int | None = None, *,
              weight_decay: float = 1e-3, steps: int = 100) -> nn.Linear:
    """A linear probe: multinomial logistic regression on (N, D) ``feats`` minimising
    ``CE + weight_decay / 2 * ||W||^2`` (bias not decayed) with full-batch L-BFGS (strong
    Wolfe line search, ``steps`` iterations) from zero weights: deterministic."""
    _check_xy(feats, y, "probe.features")
    k = int(num_classes if num_classes is not None else int(y.max()) + 1)
    if k < 2 or int(y.max()) >= k:
        raise ConfigError("probe.num_classes", num_classes,
                          f"an int > every label ({int(y.max())})")
    if not (isinstance(weight_decay, (int, float)) and 0 <= weight_decay < 1e6):
        raise ConfigError("probe.weight_decay", weight_decay, "a number >= 0")
    x = feats.detach().double()
    w = torch.zeros(k, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.t() + b, y) + 0.5 * weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    probe = nn.Linear(x.shape[1], k)
    with torch.no_grad():
        probe.weight.copy_(w.detach().float())
        probe.bias.copy_(b.detach().float())
    return probe


def stratified_folds(y: Tensor, folds: int, seed: int = 0) -> Tensor:
    """(N,) fold index per sample: each class shuffled (seeded) and dealt round-robin."""
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ConfigError("score.folds", folds, "an int >= 2")
    if folds > len(y) // 2:
        raise ConfigError("score.folds", folds,
                          f"2..{max(2, len(y) // 2)} for {len(y)} labelled samples")
    g = torch.Generator().manual_seed(int(seed))
    fold = torch.empty(len(y), dtype=torch.long)
    offset = 0
    for c in torch.unique(y):
        ids = torch.nonzero(y == c).flatten()
        ids = ids[torch.randperm(len(ids), generator=g)]
        fold[ids] = (torch.arange(len(ids)) + offset) % folds
        offset += len(ids)  # the next class continues the deal: folds stay balanced in size
    return fold


@TRANSFER_SCORES.register("probe", description="held-out linear-probe accuracy (k-fold)")
def probe_score(feats: Tensor, y: Tensor, *, folds: int = 5, seed: int = 0,
                weight_decay: float = 1e-3, steps: int = 100) -> float:
    """Mean held-out accuracy of :func:`fit_probe` over stratified ``folds``."""
    _check_xy(feats, y, "score.features")
    fold = stratified_folds(y, folds, seed)
    k = int(y.max()) + 1
    right = 0
    for f in range(folds):
        tr, te = fold != f, fold == f
        probe = fit_probe(feats[tr], y[tr], k, weight_decay=weight_decay, steps=steps)
        with torch.no_grad():
            right += int((probe(feats[te]).argmax(-1) == y[te]).sum())
    return right / len(y)


def knn_predict(train_x: Tensor, train_y: Tensor, x: Tensor, k: int = 5) -> Tensor:
    """Cosine k-NN vote; ties go to the class of the nearer neighbours (sum of similarities
    breaks them)."""
    sim = F.normalize(x.double(), dim=1) @ F.normalize(train_x.double(), dim=1).t()
    k = min(k, len(train_x))
    top, idx = sim.topk(k, dim=1)
    n_cls = int(train_y.max()) + 1
    votes = torch.zeros(len(x), n_cls, dtype=torch.float64)
    votes.scatter_add_(1, train_y[idx], torch.ones_like(top))
    votes += 1e-6 * torch.zeros_like(votes).scatter_add_(1, train_y[idx], top)  # tie-break
    return votes.argmax(1)


@TRANSFER_SCORES.register("knn", description="held-out cosine k-NN accuracy (k-fold)")
def knn_score(feats: Tensor, y: Tensor, *, k: int = 5, folds: int = 5, seed: int = 0) -> float:
    """Mean held-out accuracy of :func:`knn_predict` over stratified ``folds``."""
    _check_xy(feats, y, "score.features")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError("score.k", k, "a positive number of neighbours")
    fold = stratified_folds(y, folds, seed)
    right = 0
    for f in range(folds):
        tr, te = fold != f, fold == f
        right += int((knn_predict(feats[tr], y[tr], feats[te], k) == y[te]).sum())
    return right / len(y)


def _labelled(data, field: str):
    y = data.y
    keep = torch.nonzero(y >= 0).flatten()
    if len(keep) < 2:
        raise ConfigError(field, int(len(keep)), "a target set with at least 2 labelled samples")
    return data.subset(keep) if len(keep) < len(y) else data


def transferability(sources: Mapping[str, nn.Module], labelled, *, score: str = "probe",
                    io=None, **params) -> dict[str, float]:
    """``{name: score}`` of every source on the labelled rows of ``labelled`` (step 1)."""
    if not isinstance(sources, Mapping) or not sources:
        raise ConfigError("multisource.sources", sources, "a {name: model} mapping, >= 1 source")
    fn = TRANSFER_SCORES.get(score, "multisource.score")
    data = _labelled(labelled, "multisource.labelled")
    return {n: float(fn(embeddings(m, data, io=io), data.y, **params))
            for n, m in sources.items()}


def probed(source: nn.Module, probe: nn.Linear) -> nn.Module:
    """A copy of ``source`` whose head is ``probe`` (same ``feature_path``, so the tap
    ``feature_path:input`` is still the source's features)."""
    from ..models.mlp import replace_head

    model = copy.deepcopy(source)
    replace_head(model, lambda _: probe, "multisource.source")
    return model.eval().requires_grad_(False)


def probe_sources(sources: Mapping[str, nn.Module], labelled, *, score: str = "probe",
                  score_params: Mapping | None = None, weight_decay: float = 1e-3,
                  num_classes: int | None = None, io=None):
    """Steps 1-2: ``(teachers, scores)``: each source with a probe fitted on all labelled
    target rows as its head, and its transferability score."""
    scores = transferability(sources, labelled, score=score, io=io, **dict(score_params or {}))
    data = _labelled(labelled, "multisource.labelled")
    k = num_classes or getattr(labelled, "num_classes", None)
    teachers = {}
    for n, m in sources.items():
        probe = fit_probe(embeddings(m, data, io=io), data.y, k, weight_decay=weight_decay)
        teachers[n] = probed(m, probe)
    return teachers, scores


def source_weights(scores: Mapping[str, float], tau: float = 0.1) -> dict[str, float]:
    """``w_i = softmax_i(score_i / tau)`` (DistillWeighted's relevance weights)."""
    if not isinstance(scores, Mapping) or not scores:
        raise ConfigError("multisource.scores", scores, "a {source name: score} mapping")
    vals = list(scores.values())
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
           for v in vals):
        raise ConfigError("multisource.scores", scores, "finite numbers")
    if not (isinstance(tau, (int, float)) and tau > 0 and math.isfinite(tau)):
        raise ConfigError("distill_weighted.tau", tau, "a positive temperature")
    w = torch.softmax(torch.tensor(vals, dtype=torch.float64) / tau, 0)
    return {n: float(v) for n, v in zip(scores, w)}


def inherit_trunk(student: nn.Module, source: nn.Module) -> list[str]:
    """Copy every parameter and buffer of ``source`` into ``student`` except the head
    (``feature_path``), for fine-tuning a source of the student's architecture; returns
    the names copied. Mismatched architectures fail (ConfigError)."""
    head = getattr(student, "feature_path", None)
    s_state, t_state = student.state_dict(), source.state_dict()
    keep = {k: v for k, v in t_state.items() if not (head and k.startswith(head + "."))}
    bad = [k for k, v in keep.items() if k not in s_state or s_state[k].shape != v.shape]
    if bad or not keep:
        raise ConfigError("finetune.source", bad[:3] or type(source).__name__,
                          "a source of the student's architecture (same names and shapes)")
    student.load_state_dict(keep, strict=False)
    return list(keep)


# -- recipes --------------------------------------------------------------------------------
def _student_tap(student, feature_loss: str, student_tap: str | None) -> str:
    from . import embedding_tap

    if feature_loss not in FEATURE_LOSSES:
        raise ConfigError("multisource.feature_loss", feature_loss,
                          f"one of {', '.join(FEATURE_LOSSES)}")
    return student_tap or embedding_tap(student, "method.student")


def _named(teacher, scores, field: str) -> dict:
    if not isinstance(teacher, Mapping) or not teacher:
        raise ConfigError("method.teacher", type(teacher).__name__,
                          "named source teachers {name: probed source} (probe_sources)")
    if not isinstance(scores, Mapping):
        raise ConfigError(f"{field}.scores", scores, "a {source name: score} mapping")
    if set(scores) != set(teacher):
        raise ConfigError(f"{field}.scores", sorted(scores),
                          f"one score per teacher: {', '.join(teacher)}")
    return dict(teacher)


def _distill_terms(name: str | None, student_tap: str, teacher, teacher_tap: str | None,
                   feature_loss: str, w: float, feature_weight: float, kd_weight: float,
                   temperature: float) -> list:
    from ..distiller import Term
    from . import embedding_tap

    t_tap = teacher_tap or embedding_tap(teacher, "method.teacher")
    sfx = f"_{name}" if name else ""
    terms = []
    if feature_weight > 0:
        terms.append(Term(feature_loss, student=student_tap, teacher=t_tap, projector="linear",
                          weight=w * feature_weight, teacher_model=name, name=f"feat{sfx}"))
    if kd_weight > 0:
        terms.append(Term("kd", weight=w * kd_weight, temperature=temperature,
                          teacher_model=name, name=f"kd{sfx}"))
    return terms


@METHODS.register(
    "distill-nearest",
    paper="Distilling from Similar Tasks for Transfer Learning on a Budget",
    year=2023,
    family="multi-source",
    teachers="named",
)
def distill_nearest(student, teacher, *, scores: dict[str, float] | None = None,
                    feature_loss: Literal["mse", "cosine"] = "mse",
                    feature_weight: NonNeg = 1.0, kd_weight: NonNeg = 1.0,
                    temperature: Temperature = 4.0, ce_weight: NonNeg = 1.0,
                    student_tap: str | None = None, teacher_tap: str | None = None):
    """DistillNearest (module docstring, step 3). ``teacher``: one probed source, or named
    probed sources with their ``scores`` (the top one is used; ties: the first)."""
    from ..distiller import Term
    from . import Recipe

    s_tap = _student_tap(student, feature_loss, student_tap)
    if teacher is None:
        raise ConfigError("method.teacher", None, "distill-nearest distils a probed source")
    name = None
    if isinstance(teacher, Mapping) or scores is not None:
        teachers = _named(teacher, scores, "distill_nearest")
        source_weights(scores)  # finite numbers
        name = max(teachers, key=lambda n: (scores[n], -list(teachers).index(n)))
        teacher = teachers[name]
    terms = [Term("ce", weight=ce_weight)]
    terms += _distill_terms(name, s_tap, teacher, teacher_tap, feature_loss, 1.0,
                            feature_weight, kd_weight, temperature)
    return Recipe(terms, note=f"distill-nearest: source {name or 'teacher'}"
                  + (f" (score {scores[name]:.3f})" if name else ""))


@METHODS.register(
    "distill-weighted",
    paper="Distilling from Similar Tasks for Transfer Learning on a Budget",
    year=2023,
    family="multi-source",
    teachers="named",
)
def distill_weighted(student, teacher, *, scores: dict[str, float] | None = None,
                     tau: Pos = 0.1, feature_loss: Literal["mse", "cosine"] = "mse",
                     feature_weight: NonNeg = 1.0, kd_weight: NonNeg = 1.0,
                     temperature: Temperature = 4.0, ce_weight: NonNeg = 1.0,
                     student_tap: str | None = None, teacher_tap: str | None = None):
    """DistillWeighted (module docstring, step 4) over named probed sources ``teacher`` with
    their ``scores``: per source a projector, a feature term and a KD term, both weighted by
    ``w_i = softmax(score_i / tau)``."""
    from ..distiller import Term
    from . import Recipe

    s_tap = _student_tap(student, feature_loss, student_tap)
    teachers = _named(teacher, scores, "distill_weighted")
    w = source_weights(scores, tau)
    terms = [Term("ce", weight=ce_weight)]
    for n, m in teachers.items():
        terms += _distill_terms(n, s_tap, m, teacher_tap, feature_loss, w[n], feature_weight,
                                kd_weight, temperature)
    shown = ", ".join(f"{n} {w[n]:.2f}" for n in teachers)
    return Recipe(terms, note=f"distill-weighted: w = softmax(score / {tau}): {shown}")


__all__ = ["FEATURE_LOSSES", "TRANSFER_SCORES", "distill_nearest", "distill_weighted",
           "embeddings", "fit_probe", "inherit_trunk", "knn_predict", "knn_score",
           "probe_score", "probe_sources", "probed", "source_weights", "stratified_folds",
           "transferability"]
