"""CPRD and its baselines: the halves data, the pair models, the rerank task, the ranking
losses (golden values by hand, gradients, bad input) and tiny runs on digits halves."""

import math

import pytest
import torch

import crossdistill as cd
import crossdistill.data.halves  # noqa: F401  (registers halves)
import crossdistill.losses.ranking  # noqa: F401  (registers itc, cprd, rank_kd, score_kd, ...)
import crossdistill.methods.cprd  # noqa: F401  (registers itc, cprd, score-kd, rank-kd)
import crossdistill.models.pair  # noqa: F401  (registers pair-dual, pair-cross)
import crossdistill.tasks.rerank  # noqa: F401  (registers rerank)
from crossdistill.data.halves import candidate_lists, halves
from crossdistill.distiller import Term
from crossdistill.errors import ConfigError
from crossdistill.losses.ranking import cprd, itc, pair_nce, partial_rank, rank_kd, score_kd
from crossdistill.methods import build

L = lambda d: math.log1p(math.exp(d))  # noqa: E731  -log(e^x / (e^x + e^(x + d)))


def _emb(S):
    """Embeddings whose dot-product matrix is S (a = I, b = S^T)."""
    return [torch.eye(len(S)), torch.as_tensor(S, dtype=torch.float32).T.contiguous()]


S3 = [[5.0, 2.0, 1.0], [0.0, 5.0, 3.0], [4.0, 1.0, 5.0]]
T3 = [[9.0, 0.0, 5.0], [1.0, 9.0, 2.0], [3.0, 1.0, 9.0]]


def test_cprd_golden_value_by_hand():
    # n = 3, k = 2: each query's two negatives, in the teacher's order; one term each
    # rows:  q0 negs {1: 2, 2: 1}, teacher 2 > 1 -> s = (1, 2) -> log(1 + e^1)
    #        q1 negs {0: 0, 2: 3}, teacher 2 > 0 -> s = (3, 0) -> log(1 + e^-3)
    #        q2 negs {0: 4, 1: 1}, teacher 0 > 1 -> s = (4, 1) -> log(1 + e^-3)
    rows = (L(1) + L(-3) + L(-3)) / 3
    # columns (S^T, T^T): q0 {1: 0, 2: 4}, t 2 > 1 -> (4, 0); q1 {0: 2, 2: 1}, t 2 > 0 -> (1, 2)
    #                     q2 {0: 1, 1: 3}, t 0 > 1 -> (1, 3)
    cols = (L(-4) + L(1) + L(2)) / 3
    got = cprd(_emb(S3), torch.tensor(T3), k=2, temperature=1.0, similarity="dot")
    assert math.isclose(got.item(), 0.5 * (rows + cols), rel_tol=1e-5)
    # the positive and the teacher's own scale play no part: only its order among hard negatives
    T_other = torch.tensor(T3) * 10 - 50
    T_other.diagonal().fill_(-100.0)
    assert math.isclose(cprd(_emb(S3), T_other, k=2, temperature=1.0, similarity="dot").item(),
                        got.item(), rel_tol=1e-6)


def test_cprd_uses_only_the_students_top_k():
    # k = 2 of 3 negatives: the student's easiest negative is left out whatever the teacher says
    S = torch.tensor([[9.0, 3.0, 2.0, -5.0], [3.0, 9.0, 1.0, 0.0], [0.0, 4.0, 9.0, 2.0],
                      [1.0, 0.0, 5.0, 9.0]])
    T = S.clone()
    T[0] = torch.tensor([0.0, 1.0, 2.0, 100.0])
    # q0: hard {1: 3, 2: 2}, teacher 2 > 1 -> s = (2, 3); q1: {0: 3, 2: 1} -> (3, 1);
    # q2: {1: 4, 3: 2} -> (4, 2); q3: {2: 5, 0: 1} -> (5, 1) (teacher = student order)
    want = (L(1) + L(-2) + L(-2) + L(-4)) / 4
    assert math.isclose(partial_rank(S, T, 2).item(), want, rel_tol=1e-6)


def test_itc_rank_score_golden_values():
    eye = torch.eye(2)
    # S = I (dot, tau 1): each CE row is -log(e / (e + 1))
    assert math.isclose(itc([eye, eye], temperature=1.0, similarity="dot").item(),
                        L(-1), rel_tol=1e-6)
    assert math.isclose(pair_nce(eye).item(), L(-1), rel_tol=1e-6)
    # ListNet: teacher uniform, student softmax([1, 0]): KL = log(1/2) - 1/2 (1 - 2 log(1 + e))
    kl = -math.log(2) - 0.5 + math.log1p(math.e)
    assert math.isclose(rank_kd([eye, eye], torch.zeros(2, 2), temperature=1.0,
                                similarity="dot").item(), kl, rel_tol=1e-6)
    # score KD: tau^2 mean (S - T)^2 = (1 + 4 + 0 + 1) / 4 at tau = 1; S = I / 0.5 at tau = 0.5
    T = torch.tensor([[0.0, -2.0], [0.0, 0.0]])
    assert math.isclose(score_kd([eye, eye], T, temperature=1.0, similarity="dot").item(),
                        1.5, rel_tol=1e-6)
    want = 0.25 * ((2 - 0) ** 2 + (0 + 2) ** 2 + 0 + (2 - 0) ** 2) / 4
    assert math.isclose(score_kd([eye, eye], T, temperature=0.5, similarity="dot").item(),
                        want, rel_tol=1e-6)
    # cosine: rows are normalised first (a scaled copy gives the same losses)
    a, b = torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    assert math.isclose(itc([a * torch.tensor([[2.0], [7.0]]), b]).item(), itc([a, b]).item(),
                        rel_tol=1e-5)


def test_gradchecks():
    torch.manual_seed(0)
    S = torch.randn(5, 5, dtype=torch.float64, requires_grad=True)
    T = torch.randn(5, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: partial_rank(s, T, 3), (S,))
    a = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t4 = torch.randn(4, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: cprd([a, b], t4, k=2, temperature=0.5), (a, b))
    assert torch.autograd.gradcheck(lambda a, b: rank_kd([a, b], t4, temperature=0.5), (a, b))
    assert torch.autograd.gradcheck(lambda a, b: score_kd([a, b], t4, temperature=0.5), (a, b))
    assert torch.autograd.gradcheck(lambda a, b: itc([a, b], temperature=0.5), (a, b))


def test_bad_inputs():
    e = torch.eye(4)
    with pytest.raises(ConfigError, match="cprd.k"):
        cprd([e, e], torch.zeros(4, 4), k=1)
    # a short last batch ranks all its negatives: k = 8 on 4 rows is k = 3
    a, b, t = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 4)
    assert torch.equal(cprd([a, b], t, k=8), cprd([a, b], t, k=3))
    with pytest.raises(ConfigError, match="cprd.teacher"):
        cprd([e, e], torch.zeros(4, 3), k=2)
    with pytest.raises(ConfigError, match="cprd.student"):
        cprd(e, torch.zeros(4, 4), k=2)
    with pytest.raises(ConfigError, match="itc.similarity"):
        itc([e, e], similarity="l2")
    with pytest.raises(ConfigError, match="method.teacher"):
        build("cprd", cd.models.create("pair-dual", img_size=8), None)
    with pytest.raises(ConfigError, match="terms.cprd.k"):
        Term("cprd", student=["output[0]", "output[1]"], k=0)
    with pytest.raises(ConfigError, match="data.images"):
        halves("train", images="cifar")
    with pytest.raises(ConfigError, match="data.limit"):
        halves("train", images="digits", limit=5)
    with pytest.raises(ConfigError, match="model.img_size"):
        cd.models.create("pair-cross", img_size=9)
    with pytest.raises(ConfigError, match="model.xb"):
        cd.models.create("pair-cross", img_size=8, patch=2)(torch.zeros(2, 1, 4, 8),
                                                            torch.zeros(2, 1, 8, 8))


def test_halves_and_candidate_lists():
    tr = cd.data.load_split("halves", "train", images="digits")
    full = cd.data.load("digits", "train")
    assert tr["xa"].shape == (1077, 1, 4, 8) and tr["xb"].shape == (1077, 1, 4, 8)
    assert torch.equal(torch.cat([tr["xa"], tr["xb"]], 2), full.x)  # the same split, cut
    assert torch.equal(tr["idx"], full.idx) and torch.equal(tr["y"], full.y)
    te = halves("test", images="digits", limit=50)
    assert len(te) == 50 and set(te["idx"].tolist()) <= set(cd.data.load("digits", "test").idx
                                                           .tolist())
    # candidate lists from embeddings that rank the match 2nd for every query
    n = len(te)
    ea = torch.eye(n)
    eb = torch.eye(n) + 2 * torch.roll(torch.eye(n), 1, 0)  # b_j closest to a_{j-1}... and a_j
    lists = candidate_lists(te, ea, eb, k=3, similarity="dot")
    assert lists["xa"].shape == (2 * n, 3, 1, 4, 8) and lists["pos"].shape == (2 * n,)
    assert torch.equal(lists["xa"][0, 1], te["xa"][0])  # a -> b: the query repeated
    first = lists["xb"][0, 0]
    assert any(torch.equal(first, te["xb"][j]) for j in range(n))
    hit = lists["pos"][:n]
    assert (hit == 1).all()  # a_i: b_{i+1} (score 2) first, then its own b_i (score 1)
    assert lists.info["first_stage_recall"] == 1.0
    with pytest.raises(ConfigError, match="candidates.k"):
        candidate_lists(te, ea, eb, k=n + 1)


def test_rerank_task_golden():
    task = cd.tasks.build({"name": "rerank", "ks": [1, 2]})
    sums = {}
    z = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.8, 0.3], [0.1, 0.2, 0.3], [0.5, 0.4, 0.0]])
    batch = {"pos": torch.tensor([0, 2, 2, -1]), "dir": torch.tensor([0, 0, 1, 1])}
    task.update(sums, z, batch, keep=torch.ones(4, dtype=torch.bool))
    m = task.compute(sums)
    # q2g: row 0 rank 0 (hit@1), row 1 rank 1 (hit@2); g2q: row 2 rank 0, row 3 not retrieved
    assert m["q2g_r@1"] == 0.5 and m["q2g_r@2"] == 1.0
    assert m["g2q_r@1"] == 0.5 and m["g2q_r@2"] == 0.5 and m["n"] == 4
    with pytest.raises(ConfigError, match="task.ks"):
        cd.tasks.build({"name": "rerank", "ks": [5]}).update({}, z, batch)


def test_cross_encoder_matrix_equals_lists():
    torch.manual_seed(0)
    m = cd.models.create("pair-cross", img_size=8, patch=2, dim=16, heads=2, stem=[4]).eval()
    xa, xb = torch.randn(3, 1, 4, 8), torch.randn(5, 1, 4, 8)
    with torch.no_grad():
        mat = m(xa, xb)
        lists = m(xa[:, None].expand(-1, 5, -1, -1, -1), xb[None].expand(3, -1, -1, -1, -1))
    assert mat.shape == (3, 5) and torch.allclose(mat, lists, atol=1e-5)
    m.chunk = 4  # chunking does not change the scores
    with torch.no_grad():
        assert torch.allclose(m(xa, xb), mat, atol=1e-5)


@pytest.fixture(scope="module")
def digits():
    return [halves(s, images="digits", limit=n) for s, n in (("train", 600), ("val", 200))]


def test_tiny_cprd_run_from_a_cross_encoder(digits):
    tr, va = digits
    io = {"inputs": {"xa": "xa", "xb": "xb"}}
    torch.manual_seed(0)
    teacher = cd.models.create("pair-cross", img_size=8, patch=2, dim=16, heads=2)
    d = cd.Distiller(teacher, None, [Term("pair_nce", teacher=None)], io=io, task="rerank")
    d.build(tr.batch(torch.arange(16)))  # the matrix output passes the dry run
    torch.manual_seed(0)
    student = cd.models.create("pair-dual", img_size=8, channels=(8, 16), dim=16)
    task = {"name": "retrieval", "inputs": io["inputs"]}
    before = cd.evaluate(student, va, io=io, task=task)
    recipe = build("cprd", student, teacher, k=4, temperature=0.1)
    assert [t.loss for t in recipe.terms] == ["itc", "cprd"]
    d = cd.Distiller(student, teacher, recipe.terms, io=io, teacher_io=io, task=task)
    t = cd.Trainer(d, tr, va, epochs=4, batch_size=32, lr=1e-2, optimizer="adamw",
                   weight_decay=0.0, progress=False)
    res = t.fit()
    # an untrained teacher's order is noise here: the run must still learn to retrieve
    assert res["best_val_mean_recall"] > before["mean_recall"] + 0.04
    assert d.last_losses["cprd"] > 0
    # the retrieval task cannot read the teacher's score matrix: noted, the run stands
    assert res["teacher_val_not_scored"].startswith("task.query")
    t.distiller.task.for_io = lambda io: (_ for _ in ()).throw(ConfigError("data.x", 1, "x"))
    with pytest.raises(ConfigError, match="data.x"):  # any other error is not swallowed
        t._teacher_val()
    for name in ("score-kd", "rank-kd"):  # the baselines build and run one step
        r = build(name, student, teacher)
        d2 = cd.Distiller(student, teacher, r.terms, io=io, teacher_io=io, task=task)
        out = d2(tr.batch(torch.arange(32)))
        assert torch.isfinite(out.total)


def test_fusion_cross_encoder_starts_as_the_towers_cosine():
    import copy

    torch.manual_seed(0)
    dual = cd.models.create("pair-dual", img_size=8, channels=(8, 16), dim=16).eval()
    m = cd.models.create("pair-fusion", img_size=8, channels=(8, 16), emb=16, dim=16,
                         grid=(1, 2), freeze_towers=True)
    missing, unexpected = m.load_state_dict(dual.state_dict(), strict=False)
    assert not unexpected and not any(k.startswith("tower") for k in missing)
    m.train()
    assert not m.tower_a.training and m.blocks.training  # frozen towers stay in eval mode
    assert not any(p.requires_grad for p in m.tower_a.parameters())
    xa, xb = torch.randn(3, 1, 4, 8), torch.randn(4, 1, 4, 8)
    m.eval()
    with torch.no_grad():
        ea, eb = dual(xa, xb[:3])
        cos = torch.nn.functional.normalize(ea, dim=-1) @ torch.nn.functional.normalize(
            dual.tower_b(xb), dim=-1).T
        mat = m(xa, xb)
        assert torch.allclose(mat, 20 * cos, atol=1e-4)  # the fusion head starts at zero
        m.head.weight.normal_()
        mat = m(xa, xb)
        lists = m(xa[:, None].expand(-1, 4, -1, -1, -1), xb[None].expand(3, -1, -1, -1, -1))
        assert torch.allclose(mat, lists, atol=1e-4)
        assert torch.allclose(copy.deepcopy(m)(xa, xb), mat, atol=1e-5)
