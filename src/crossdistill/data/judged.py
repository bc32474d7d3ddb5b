"""Human-judged text for scoring sentence encoders, read at run time from the files that the
installed gensim package ships in ``gensim/test/test_data`` (never copied into this repo), or
from a user's files in the same formats.

- Lee: 50 short news documents (``lee.cor``, one a line) and a 50 x 50 matrix of their mean
  human similarity (``similarities0-1.txt``: tab-separated, upper triangle filled, 1 on the
  diagonal). Lee, Pincombe & Welsh, "An Empirical Evaluation of Models of Text Document
  Similarity" (CogSci 2005).
- WordSim353 (``wordsim353.tsv``; Finkelstein et al., 2002) and SimLex-999
  (``simlex999.txt``; Hill, Reichart & Korhonen, 2015): ``word1<TAB>word2<TAB>mean score``
  lines, ``#`` comments.
- Pang & Lee polarity (``pang_lee_polarity.cor``): 200 ``__label__pos|neg sentence`` lines
  (Pang & Lee, 2004/2005 movie-review sentences).

Every reader checks its file and names the file, line and what was expected.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from ..errors import ConfigError

FILES = {
    "lee": "lee.cor",
    "lee_similarities": "similarities0-1.txt",
    "wordsim353": "wordsim353.tsv",
    "simlex999": "simlex999.txt",
    "polarity": "pang_lee_polarity.cor",
}
WORD_SETS = ("wordsim353", "simlex999")


def gensim_data_dir() -> Path:
    """``gensim/test/test_data`` of the installed gensim, found without importing it."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "data.judged", "gensim",
            "the human-judged text sets are read from the gensim package's test data: "
            "pip install 'crossdistill[text]' (or gensim), or give the files' paths",
        )
    return Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data"


def _file(key: str, path) -> Path:
    p = Path(path) if path is not None else gensim_data_dir() / FILES[key]
    if not p.is_file():
        raise ConfigError(f"data.judged.{key}", str(p), f"a file in the format of {FILES[key]}")
    return p


def _bad(p: Path, line: int, text: str, want: str) -> ConfigError:
    return ConfigError(f"data.judged[{p.name}:{line}]", text[:60], want)


def lee(docs=None, similarities=None) -> tuple[list[str], np.ndarray]:
    """(documents, (N, N) symmetric human similarity) of the Lee corpus."""
    dp, sp = _file("lee", docs), _file("lee_similarities", similarities)
    texts = [t.strip() for t in dp.read_text(encoding="utf-8", errors="replace").splitlines()]
    texts = [t for t in texts if t]
    rows = []
    for i, line in enumerate(sp.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append([float(v) for v in line.split()])
        except ValueError:
            raise _bad(sp, i, line, "tab-separated numbers") from None
    n = len(texts)
    if len(rows) != n or any(len(r) != n for r in rows):
        raise ConfigError(f"data.judged[{sp.name}]", f"{len(rows)} rows",
                          f"a {n} x {n} matrix: one row and column per document of {dp.name}")
    m = np.array(rows)
    upper = np.triu(m)
    return texts, upper + np.triu(m, 1).T  # the upper triangle holds the judgements


def word_pairs(name: str = "wordsim353", path=None) -> list[tuple[str, str, float]]:
    """``(word1, word2, human score)`` of WordSim353 or SimLex-999."""
    if name not in WORD_SETS:
        raise ConfigError("data.judged.name", name, f"one of {', '.join(WORD_SETS)}")
    p = _file(name, path)
    out = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("\t")
        try:
            out.append((parts[0].strip(), parts[1].strip(), float(parts[2])))
        except (IndexError, ValueError):
            raise _bad(p, i, line, "word1<TAB>word2<TAB>score") from None
    if len(out) < 3:
        raise ConfigError(f"data.judged[{p.name}]", len(out), "three or more scored pairs")
    return out


def polarity(path=None) -> tuple[list[str], np.ndarray]:
    """(sentences, labels: 1 positive, 0 negative) of the Pang & Lee sentences."""
    p = _file("polarity", path)
    texts, labels = [], []
    for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        tag, _, text = line.strip().partition(" ")
        if tag not in ("__label__pos", "__label__neg") or not text:
            raise _bad(p, i, line, "__label__pos or __label__neg, a space, the sentence")
        texts.append(text)
        labels.append(int(tag == "__label__pos"))
    y = np.array(labels)
    if len(set(labels)) < 2 or min(np.bincount(y)) < 2:
        raise ConfigError(f"data.judged[{p.name}]", np.bincount(y).tolist(),
                          "two or more sentences of each label")
    return texts, y
