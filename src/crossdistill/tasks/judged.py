"""Scores of a text encoder against human judgements (:mod:`crossdistill.data.judged`).

An encoder is any callable ``encode(texts: list[str]) -> (N, D)`` tensor or array. Each score
is the usual protocol of its set, with nothing tuned on the data it reports:

- ``lee``: Spearman correlation, over the 1,225 document pairs, between the human
  similarity and the cosine of the two documents' embeddings.
- ``wordsim353`` / ``simlex999``: Spearman between the human score and the cosine of the two
  words' embeddings (each word encoded as a one-word text).
- ``polarity``: linear-probe accuracy, stratified 5-fold cross-validation; inside each
  training fold a logistic regression's C is chosen by an inner 5-fold cross-validation
  (scikit-learn's ``LogisticRegressionCV``), so the reported folds are never used to tune.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy.stats import spearmanr

from ..data import judged as J

SETS = ("lee", "wordsim353", "simlex999", "polarity")


def _embed(encode, texts: list[str]) -> np.ndarray:
    e = encode(list(texts))
    e = e.detach().float().cpu().numpy() if isinstance(e, torch.Tensor) else np.asarray(e, float)
    if e.ndim != 2 or len(e) != len(texts):
        raise ValueError(f"encode returned shape {e.shape}, expected ({len(texts)}, D)")
    n = np.linalg.norm(e, axis=1, keepdims=True)
    return e / np.clip(n, 1e-12, None)


def lee_spearman(encode, docs=None, similarities=None) -> float:
    texts, human = J.lee(docs, similarities)
    e = _embed(encode, texts)
    iu = np.triu_indices(len(texts), 1)
    return float(spearmanr(human[iu], (e @ e.T)[iu]).statistic)


def word_spearman(encode, name: str = "wordsim353", path=None) -> float:
    pairs = J.word_pairs(name, path)
    words = sorted({w for a, b, _ in pairs for w in (a, b)})
    e = dict(zip(words, _embed(encode, words)))
    cos = [float(e[a] @ e[b]) for a, b, _ in pairs]
    return float(spearmanr([s for *_, s in pairs], cos).statistic)


def polarity_probe(encode, path=None, folds: int = 5, seed: int = 0) -> float:
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    texts, y = J.polarity(path)
    x = _embed(encode, texts)
    k = int(min(folds, np.bincount(y).min()))
    accs = []
    for tr, te in StratifiedKFold(k, shuffle=True, random_state=seed).split(x, y):
        inner = int(min(5, np.bincount(y[tr]).min()))
        with warnings.catch_warnings():  # scikit-learn's notices of its coming defaults
            warnings.simplefilter("ignore", FutureWarning)
            clf = LogisticRegressionCV(Cs=10, cv=inner, max_iter=2000, scoring="accuracy")
            clf.fit(x[tr], y[tr])
        accs.append(float((clf.predict(x[te]) == y[te]).mean()))
    return float(np.mean(accs))


def judged_scores(encode, sets=SETS, paths: dict | None = None) -> dict[str, float]:
    """``{set: score}`` for each of ``sets``; ``paths`` overrides files by the keys of
    :data:`crossdistill.data.judged.FILES`."""
    p = dict(paths or {})
    out = {}
    for s in sets:
        if s == "lee":
            out[s] = lee_spearman(encode, p.get("lee"), p.get("lee_similarities"))
        elif s in J.WORD_SETS:
            out[s] = word_spearman(encode, s, p.get(s))
        elif s == "polarity":
            out[s] = polarity_probe(encode, p.get("polarity"))
        else:
            from ..errors import ConfigError

            raise ConfigError("eval.judged", s, f"one of {', '.join(SETS)}")
    return out
