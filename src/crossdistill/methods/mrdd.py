"""MRDD: multi-view representations by distilled disentangling, with its own two-stage loop.

Paper: Ke, Yu, Chao, Wang et al., "Rethinking Multi-view Representation Learning via
Distilled Disentangling", CVPR 2024 (code: Guanzhou-Ke/MRDD). Views: MNIST and its Sobel
edge map (:func:`~crossdistill.models.mrdd.edge_views`), or any paired keys.

* Stage 1 (:func:`fit_consistency`): the masked cross-view VAE learns the view-consistent
  latent ``c``: ``recon + 1.0 * KL`` with patch masking (ratio 0.7, patch 2).
* Stage 2 (:func:`fit_specific`): with ``c`` frozen, each view's VAE learns ``v``:
  ``recon + 0.5 * KL + lam * CLUB(v; c)``. Per batch and view, first the CLUB estimator
  ``q(c | v)`` takes its *own* optimiser step on its log-likelihood (``v`` detached, only
  its parameters), then the view's VAE steps on the loss above with the estimator frozen,
  minimising the upper bound ``E_pos log q(c|v) - E_neg log q(c|v)``: the information
  about ``c`` is *distilled out* of ``v``.
* Output ``[c, v]`` (:func:`extract`; ``v`` of ``best_view``), scored by a linear probe
  (:func:`linear_probe`: fit on train, C chosen on val, test once) and k-means accuracy.

Official-code bug (crossmodal.md): the released ``MRDD.get_loss`` returns only
``lam * (-log q(c | v))`` (recon and KL commented out), stepped by one optimiser over the
encoder and the estimator together, so the encoder learns to make ``c`` *more* predictable
from ``v`` -- the reverse of disentangling -- and the CLUB bound is never used; its config
names the weight ``disent.alpha`` while the code reads ``disent.lam`` (default 1 here), and
disent.yaml says c_dim 10 where the consistency stage trains 20. ``disentangle="released"``
reproduces that objective for comparison; the default ``"club"`` is the paper's.

Why a loop of its own: the two models of stage 2 need two optimiser steps per batch on two
objectives, and neither stage has a classifier for the Trainer to validate; the loop reuses
the Trainer's seeded :class:`~crossdistill.data.dataset.Batches` and ``lr_at`` schedule
(``train/`` is unchanged).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..data.dataset import Batches, Dataset
from ..errors import ConfigError
from ..losses.disentangle import ClubEstimator, gaussian_loglik, vae_kl
from ..models.mrdd import ConsistencyVAE, SpecificVAE, recon_error
from ..train.schedule import lr_at

DISENTANGLE = ("club", "released", "none")


class MRDD(nn.Module):
    """The consistency VAE, one specific VAE and one CLUB estimator per view.
    ``shapes``: each view's per-sample (C, H, W). Defaults c_dim 20, v_dim 10 (EdgeMNIST's
    consist.yaml / disent.yaml), CLUB hidden 100 (disent.hidden_size)."""

    def __init__(self, shapes: Sequence[Sequence[int]], c_dim: int = 20, v_dim: int = 10,
                 width: int = 16, hidden: int = 256, club_hidden: int = 100,
                 best_view: int = 0):
        super().__init__()
        self.consistency = ConsistencyVAE(shapes, c_dim, width, hidden)
        self.specific = nn.ModuleList([SpecificVAE(s, v_dim, c_dim, width, hidden)
                                       for s in shapes])
        self.club = nn.ModuleList([ClubEstimator(v_dim, c_dim, club_hidden) for _ in shapes])
        if not 0 <= best_view < len(shapes):
            raise ConfigError("mrdd.best_view", best_view, f"a view index below {len(shapes)}")
        self.best_view = best_view

    @torch.no_grad()
    def c(self, views) -> Tensor:
        """The frozen consistency code: the posterior mean from the unmasked views."""
        was = self.consistency.training
        self.consistency.eval()
        mu, _ = self.consistency.encode(views)
        self.consistency.train(was)
        return mu


def _views(batch: dict, keys: Sequence[str]) -> list[Tensor]:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ConfigError("mrdd.keys", missing[0], f"batch keys: {', '.join(sorted(batch))}")
    return [batch[k].float() for k in keys]


def _steps(data: Dataset, batch_size: int, epochs: int, seed: int):
    batches = Batches(data, batch_size, shuffle=True, seed=seed, drop_last=len(data) > batch_size)
    total = max(1, epochs * len(batches))
    return batches, total


def _set_lr(opts, step: int, total: int, lr: float) -> None:
    lr_now = lr_at(step, total, base=lr, schedule="cosine")
    for opt in opts:
        for g in opt.param_groups:
            g["lr"] = lr_now


def fit_consistency(
    model: MRDD, data: Dataset, keys: Sequence[str] = ("x", "edge"), *, epochs: int = 10,
    batch_size: int = 256, lr: float = 5e-4, mask_ratio: float = 0.7, patch: int = 2,
    kl_weight: float = 1.0, seed: int = 0,
) -> list[dict]:
    """Stage 1: the masked cross-view VAE (AdamW, cosine schedule, as consist.yaml; our
    epochs). Returns one row of mean losses per epoch."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    vae = model.consistency.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    batches, total = _steps(data, batch_size, epochs, seed)
    rows, step = [], 0
    for epoch in range(epochs):
        sums = {"loss": 0.0, "recon": 0.0, "kl": 0.0}
        for batch in batches.epoch(epoch):
            _set_lr([opt], step, total, lr)
            loss, parts = vae.loss(_views(batch, keys), mask_ratio=mask_ratio, patch=patch,
                                   kl_weight=kl_weight, generator=gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            for k, v in (("loss", float(loss.detach())), *parts.items()):
                sums[k] += v / len(batches)
        rows.append({"epoch": epoch + 1, **sums})
    vae.eval()
    return rows


def disentangle_step(
    v: Tensor, c: Tensor, club: ClubEstimator, club_opt, mode: str = "club", club_steps: int = 1
) -> Tensor:
    """The disentangling term of one view for its encoder's loss.

    ``"club"`` (the paper): the estimator first takes its own step on
    ``-log q(c | sg(v))`` (``club_opt`` holds only its parameters), then the returned term is
    the CLUB bound with the estimator frozen (gradient to ``v`` only); ``club_steps`` > 1
    fits the estimator longer on each batch (a bound is only as tight as q is good).
    ``"released"`` (the
    official code): ``-log q(c | v)`` with gradients to both ``v`` and the estimator (the
    caller steps ``club_opt`` with the encoder). ``"none"``: 0."""
    if mode == "none":
        return v.new_zeros(())
    if mode == "released":
        mu, logvar = club(v)
        return -gaussian_loglik(mu, logvar, c.detach()).mean()
    if mode != "club":
        raise ConfigError("mrdd.disentangle", mode, f"one of {', '.join(DISENTANGLE)}")
    for _ in range(max(1, int(club_steps))):
        club_opt.zero_grad(set_to_none=True)
        club.learning_loss(v, c).backward()
        club_opt.step()
    return club.bound(v, c)


def fit_specific(
    model: MRDD, data: Dataset, keys: Sequence[str] = ("x", "edge"), *, epochs: int = 10,
    batch_size: int = 256, lr: float = 5e-4, kl_weight: float = 0.5, lam: float = 1.0,
    disentangle: str = "club", club_steps: int = 1, seed: int = 0,
) -> list[dict]:
    """Stage 2: per view ``recon(x | v, c) + kl_weight * KL(v) + lam * disentangle`` with the
    consistency VAE frozen (see :func:`disentangle_step`). Returns per-epoch mean losses."""
    if disentangle not in DISENTANGLE:
        raise ConfigError("mrdd.disentangle", disentangle, f"one of {', '.join(DISENTANGLE)}")
    torch.manual_seed(seed)
    model.consistency.eval().requires_grad_(False)
    vae_opts = [torch.optim.AdamW(s.parameters(), lr=lr) for s in model.specific]
    club_opts = [torch.optim.AdamW(q.parameters(), lr=lr) for q in model.club]
    batches, total = _steps(data, batch_size, epochs, seed)
    rows, step = [], 0
    for epoch in range(epochs):
        model.specific.train()
        sums = {"loss": 0.0, "recon": 0.0, "kl": 0.0, "disent": 0.0}
        for batch in batches.epoch(epoch):
            _set_lr([*vae_opts, *club_opts], step, total, lr)
            views = _views(batch, keys)
            c = model.c(views)
            for i, x in enumerate(views):
                x_hat, mu, logvar, v = model.specific[i](x, c)
                recon, kl = recon_error(x_hat, x).mean(), vae_kl(mu, logvar).mean()
                dis = disentangle_step(v, c, model.club[i], club_opts[i], disentangle, club_steps)
                loss = recon + kl_weight * kl + lam * dis
                opts = [vae_opts[i]] + ([club_opts[i]] if disentangle == "released" else [])
                for o in opts:
                    o.zero_grad(set_to_none=True)
                loss.backward()
                for o in opts:
                    o.step()
                n = len(batches) * len(views)
                for k, val in (("loss", loss), ("recon", recon), ("kl", kl), ("disent", dis)):
                    sums[k] += float(val.detach()) / n
            step += 1
        rows.append({"epoch": epoch + 1, **sums})
    model.eval()
    return rows


@torch.no_grad()
def extract(model: MRDD, data: Dataset, keys: Sequence[str] = ("x", "edge"),
            batch_size: int = 1024) -> dict[str, Tensor]:
    """Frozen features of every sample: ``c``, ``v<i>`` (posterior means), ``cv`` =
    ``[c, v_best]`` (the paper's output), and ``y``."""
    model.eval()
    out: dict[str, list] = {"c": [], "cv": [], "y": []}
    for i in range(len(model.specific)):
        out[f"v{i}"] = []
    for start in range(0, len(data), batch_size):
        batch = data.batch(torch.arange(start, min(start + batch_size, len(data))))
        views = _views(batch, keys)
        c = model.c(views)
        vs = [s.encode(x)[0] for s, x in zip(model.specific, views)]
        out["c"].append(c)
        out["cv"].append(torch.cat([c, vs[model.best_view]], -1))
        for i, v in enumerate(vs):
            out[f"v{i}"].append(v)
        out["y"].append(batch["y"])
    return {k: torch.cat(v) for k, v in out.items()}


def linear_probe(train: tuple, val: tuple, test: tuple,
                 cs: Sequence[float] = (0.01, 0.1, 1.0, 10.0), seed: int = 0) -> dict:
    """Logistic regression on frozen features: standardised by the train statistics, fit on
    ``train`` for each inverse regularisation ``C`` in ``cs``, the best on ``val`` scored
    once on ``test``. Each split is ``(features, labels)``."""
    from sklearn.linear_model import LogisticRegression

    (xtr, ytr), (xva, yva), (xte, yte) = [(x.double(), y.long()) for x, y in (train, val, test)]
    mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-8)
    norm = lambda x: ((x - mean) / std).numpy()  # noqa: E731
    best = None
    for c in cs:
        clf = LogisticRegression(C=c, max_iter=2000, random_state=seed)
        clf.fit(norm(xtr), ytr.numpy())
        acc = float((clf.predict(norm(xva)) == yva.numpy()).mean())
        if best is None or acc > best[0]:
            best = (acc, c, clf)
    acc, c, clf = best
    test_acc = float((clf.predict(norm(xte)) == yte.numpy()).mean())
    return {"val_acc": acc, "C": c, "test_acc": test_acc}


def kmeans_accuracy(x: Tensor, y: Tensor, k: int | None = None, seed: int = 0) -> float:
    """Clustering accuracy: k-means (k = number of classes) on standardised features, the
    clusters matched to classes by the Hungarian assignment (the usual multi-view metric)."""
    from scipy.optimize import linear_sum_assignment
    from sklearn.cluster import KMeans

    y = y.long().numpy()
    k = int(k or y.max() + 1)
    z = ((x - x.mean(0)) / x.std(0).clamp_min(1e-8)).double().numpy()
    pred = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(z)
    count = torch.zeros(k, int(y.max()) + 1)
    for p, t in zip(pred, y):
        count[p, t] += 1
    rows, cols = linear_sum_assignment(-count.numpy())
    return float(count[rows, cols].sum() / len(y))


def linear_predictability(v: Tensor, c: Tensor) -> float:
    """An MI proxy: the R^2 of the least-squares linear prediction of ``c`` from ``[v, 1]``
    (1 = c is a linear function of v, 0 = no linear information), averaged over c's dims."""
    v, c = v.double(), c.double()
    a = torch.cat([v, torch.ones(len(v), 1, dtype=v.dtype)], 1)
    w = torch.linalg.lstsq(a, c).solution
    sse = (a @ w - c).pow(2).sum(0)
    sst = (c - c.mean(0)).pow(2).sum(0).clamp_min(1e-12)
    return float((1 - sse / sst).mean())


def run(
    train: Dataset, val: Dataset, test: Dataset, keys: Sequence[str] = ("x", "edge"), *,
    mask_ratio: float = 0.7, patch: int = 2, c_dim: int = 20, v_dim: int = 10,
    epochs_consistency: int = 10, epochs_specific: int = 10, batch_size: int = 256,
    lr: float = 5e-4, lam: float = 1.0, disentangle: str = "club", club_steps: int = 1,
    width: int = 16,
    hidden: int = 256, seed: int = 0, kmeans: bool = True,
) -> dict:
    """Both stages, then the linear probe on ``c``, ``v`` (best view) and ``cv`` and the
    k-means accuracy of each on test. Returns the scores, the training rows and the model."""
    shapes = [tuple(train[k].shape[1:]) for k in keys]
    torch.manual_seed(seed)
    model = MRDD(shapes, c_dim=c_dim, v_dim=v_dim, width=width, hidden=hidden)
    rows1 = fit_consistency(model, train, keys, epochs=epochs_consistency,
                            batch_size=batch_size, lr=lr, mask_ratio=mask_ratio, patch=patch,
                            seed=seed)
    rows2 = fit_specific(model, train, keys, epochs=epochs_specific, batch_size=batch_size,
                         lr=lr, lam=lam, disentangle=disentangle, club_steps=club_steps,
                         seed=seed)
    feats = {s: extract(model, d, keys) for s, d in (("train", train), ("val", val),
                                                     ("test", test))}
    v = f"v{model.best_view}"
    out: dict = {"stage1": rows1, "stage2": rows2, "model": model}
    for name in ("c", v, "cv"):
        probe = linear_probe(*[(feats[s][name], feats[s]["y"]) for s in ("train", "val", "test")],
                             seed=seed)
        out[f"{name}_probe"] = probe
        if kmeans:
            out[f"{name}_kmeans"] = kmeans_accuracy(feats["test"][name], feats["test"]["y"],
                                                    seed=seed)
    out["mi_proxy"] = linear_predictability(feats["test"][v], feats["test"]["c"])
    return out
