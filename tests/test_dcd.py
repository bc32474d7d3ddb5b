"""DCD: candidate mining aligned between teacher and student, the dynamic weights applied
(golden values by hand), gradients, bad input, and a tiny cross-encoder run with re-ranking."""

import math

import pytest
import torch

import crossdistill as cd
import crossdistill.data.halves  # noqa: F401  (registers halves)
import crossdistill.losses.ranking  # noqa: F401  (registers dcd, pair_nce, itc)
import crossdistill.methods.cprd  # noqa: F401  (registers itc)
import crossdistill.methods.dcd  # noqa: F401  (registers dcd)
import crossdistill.models.pair  # noqa: F401  (registers pair-cross, pair-dual)
import crossdistill.tasks.rerank  # noqa: F401  (registers rerank)
from crossdistill.data.halves import candidate_lists, halves
from crossdistill.distiller import Term
from crossdistill.errors import ConfigError
from crossdistill.losses.ranking import dcd, dcd_candidates, dcd_list_loss
from crossdistill.methods import build

S = torch.tensor([[2.0, 0.0, 1.0], [1.0, 3.0, 0.0], [0.0, 2.0, 1.0]])
T = torch.tensor([[4.0, 1.0, 3.0], [0.0, 5.0, 2.0], [1.0, 0.0, 2.0]])


def softplus(x):
    return math.log1p(math.exp(x))


def by_hand(lists, alpha=0.2, dynamic=True):
    """DCD on (student list, teacher list) pairs, positive first, T = 1 (the formula)."""
    def entropy(t):
        z = [math.exp(v) for v in t]
        p = [v / sum(z) for v in z]
        return -sum(q * math.log(q) for q in p)

    b = len(lists)
    if dynamic:
        h = [entropy(t) for _, t in lists]
        w = [v / sum(h) for v in h]
        e = [math.exp((1 - v) ** 2) for v in w]
        r = [v / sum(e) for v in e]
    else:
        w = r = [1 / b] * b
    mse = [sum((x - y) ** 2 for x, y in zip(s, t)) / len(s) for s, t in lists]
    bce = [(softplus(-s[0]) + sum(softplus(x) for x in s[1:])) / len(s) for s, _ in lists]
    return alpha * sum(ri * m for ri, m in zip(r, mse)) + (1 - alpha) * sum(
        wi * c for wi, c in zip(w, bce))


# mined by hand (candidates = 2: the positive and the teacher's top negative)
ROWS = [([2, 1], [4, 3]), ([3, 0], [5, 2]), ([1, 0], [2, 1])]  # q0: j=2, q1: j=2, q2: j=0
COLS = [([2, 0], [4, 1]), ([3, 0], [5, 1]), ([1, 1], [2, 3])]  # on S^T, T^T: j=2, j=0, j=0


def test_golden_values_by_hand():
    got = dcd(S, T, candidates=2)
    assert math.isclose(got.item(), 0.5 * (by_hand(ROWS) + by_hand(COLS)), rel_tol=1e-6)
    uniform = dcd(S, T, candidates=2, weights="uniform")
    assert math.isclose(uniform.item(), 0.5 * (by_hand(ROWS, dynamic=False)
                                               + by_hand(COLS, dynamic=False)), rel_tol=1e-6)
    # no teacher: the BCE alone, random (next-in-batch) negatives: q_i against b_{i+1}
    rows = [[2, 0], [3, 0], [1, 0]]  # S[0,1], S[1,2], S[2,0]
    cols = [[2, 1], [3, 2], [1, 1]]  # S^T[0,1], S^T[1,2], S^T[2,0]
    bce = lambda ls: sum((softplus(-s[0]) + softplus(s[1])) / 2 for s in ls) / 3  # noqa: E731
    assert math.isclose(dcd(S, None, candidates=2, mine="random").item(),
                        0.5 * (bce(rows) + bce(cols)), rel_tol=1e-6)


def test_candidates_are_aligned_and_weights_act():
    idx = dcd_candidates(3, 2, T, "teacher")
    assert idx.tolist() == [[0, 2], [1, 2], [2, 0]]
    assert dcd_candidates(3, 3, None, "random").tolist() == [[0, 1, 2], [1, 2, 0], [2, 0, 1]]
    # a relabelled batch (the same permutation of rows and columns) gives the same loss:
    # the student's and the teacher's lists are gathered at one index list
    p = torch.tensor([2, 0, 1])
    assert math.isclose(dcd(S[p][:, p], T[p][:, p], candidates=2).item(),
                        dcd(S, T, candidates=2).item(), rel_tol=1e-6)
    # the per-query distillation weights are not inert (the official scalar MSE makes them so)
    s = torch.tensor([[0.0, 0.0], [5.0, -5.0]])
    t = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    dyn = dcd_list_loss(s, t, alpha=1.0, temperature=1.0, weights="dynamic")
    uni = dcd_list_loss(s, t, alpha=1.0, temperature=1.0, weights="uniform")
    assert not math.isclose(dyn.item(), uni.item(), rel_tol=1e-4)


def test_gradcheck():
    torch.manual_seed(0)
    s = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda s: dcd_list_loss(s, t, alpha=0.2, temperature=2.0, weights="dynamic"), (s,))
    m = torch.randn(5, 5, dtype=torch.float64, requires_grad=True)
    tm = torch.randn(5, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda m: dcd(m, tm, candidates=3), (m,))


def test_bad_inputs():
    with pytest.raises(ConfigError, match="dcd.mine"):
        dcd(S, T, mine="best")
    with pytest.raises(ConfigError, match="dcd.weights"):
        dcd(S, T, weights="focal")
    with pytest.raises(ConfigError, match="dcd.mine"):
        dcd(S, None, mine="teacher")
    with pytest.raises(ConfigError, match="dcd.candidates"):
        dcd(S, T, candidates=1)
    # a short last batch lists every negative it has: 8 candidates on 3 rows are 3
    assert torch.equal(dcd(S, T, candidates=8), dcd(S, T, candidates=3))
    with pytest.raises(ConfigError, match="dcd.teacher"):
        dcd(S, T[:2])
    with pytest.raises(ConfigError, match="terms.dcd.alpha"):
        Term("dcd", alpha=1.5)
    with pytest.raises(ConfigError, match="dcd.weights"):
        build("dcd", torch.nn.Identity(), torch.nn.Identity(), weights="entropy")


def test_tiny_dcd_run_with_reranking():
    tr, va = halves("train", images="digits", limit=320), halves("val", images="digits", limit=60)
    io = {"inputs": {"xa": "xa", "xb": "xb"}}
    # a first-stage retriever for the evaluation lists, and a cross-encoder teacher
    torch.manual_seed(0)
    dual = cd.models.create("pair-dual", img_size=8, channels=(8, 16), dim=16)
    d = cd.Distiller(dual, None, build("itc", dual, None, temperature=0.1).terms, io=io,
                     task={"name": "retrieval", "inputs": io["inputs"]})
    cd.Trainer(d, tr, epochs=2, batch_size=40, lr=1e-2, optimizer="adamw",
               progress=False).fit()
    with torch.no_grad():
        ea, eb = dual.eval()(va["xa"], va["xb"])
    lists = candidate_lists(va, ea, eb, k=10)
    assert lists.info["first_stage_recall"] > 0.2
    cross = dict(img_size=8, patch=2, heads=2)
    torch.manual_seed(1)
    teacher = cd.models.create("pair-cross", dim=16, depth=2, **cross)
    d = cd.Distiller(teacher, None, [Term("pair_nce", teacher=None)], io=io, task="rerank")
    cd.Trainer(d, tr, epochs=1, batch_size=16, lr=2e-3, optimizer="adamw",
               progress=False).fit()
    torch.manual_seed(2)
    student = cd.models.create("pair-cross", dim=16, depth=1, **cross)
    recipe = build("dcd", student, teacher)
    assert recipe.terms[0].params["mine"] == "teacher"
    d = cd.Distiller(student, teacher, recipe.terms, io=io, teacher_io=io, task="rerank")
    t = cd.Trainer(d, tr, lists, epochs=2, batch_size=16, lr=2e-3, optimizer="adamw",
                   progress=False)
    res = t.fit()
    losses = [r["train_loss"] for r in t.log.rows]
    assert losses[-1] < losses[0]
    assert res["teacher_val_mean_recall"] >= 0  # the cross-encoder teacher scored on lists
    for r in (build("dcd", student, None), build("dcd", student, teacher, mine="random",
                                                 weights="uniform")):
        out = cd.Distiller(student, teacher if r.terms[0].teacher else None, r.terms, io=io,
                           teacher_io=io, task="rerank")(tr.batch(torch.arange(16)))
        assert torch.isfinite(out.total)
