"""GSSF: the structural sparse similarity (golden values, gradients), the PairDual metric head,
dot-product retrieval, the relational KD kernel, the recipes, and a tiny run on digits halves."""

import math

import pytest
import torch
import torch.nn.functional as F

import crossdistill as cd
import crossdistill.data.halves  # noqa: F401  (registers halves)
import crossdistill.losses.gssf  # noqa: F401  (registers relation_kd)
import crossdistill.methods.cprd  # noqa: F401  (registers itc)
import crossdistill.methods.gssf  # noqa: F401  (registers gssf, relation-kd)
import crossdistill.models.pair  # noqa: F401  (registers pair-dual)
from crossdistill.errors import ConfigError
from crossdistill.losses.gssf import GSSF, RelationKD, gssf_scores, relation_kd_loss
from crossdistill.methods import build
from crossdistill.tasks.retrieval import recall_at_k


def test_golden_values_by_hand():
    x, y = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0]])
    z1 = torch.zeros(1, 2, 2)
    assert gssf_scores(x, y, torch.ones(2), z1).item() == 11.0  # dot product at init
    assert gssf_scores(x, y, torch.tensor([2.0, 1.0]), z1).item() == 14.0  # 2*1*3 + 1*2*4
    one_block = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])  # K = 1: x_0 * 1 * y_1 = 4
    assert gssf_scores(x, y, torch.ones(2), one_block).item() == 15.0
    two_blocks = torch.tensor([[[0.5]], [[0.0]]])  # K = 2 groups of one channel: + 0.5*1*3
    assert gssf_scores(x, y, torch.ones(2), two_blocks).item() == 12.5


def test_module_init_is_the_dot_product_and_transform_matches():
    torch.manual_seed(0)
    m = GSSF(8, groups=4)
    x, y = torch.randn(5, 8), torch.randn(3, 8)
    assert torch.allclose(m(x, y), x @ y.T, atol=1e-6)
    with torch.no_grad():
        m.w.uniform_(0.5, 1.5)
        m.blocks.normal_()
    s = m(x, y)
    assert not torch.allclose(s, x @ y.T, atol=1e-3)
    assert torch.allclose(x @ m.transform(y).T, s, atol=1e-5)  # bilinear: x . (M y)
    assert torch.allclose(m.pair(x[:3], y), s[:3].diagonal(), atol=1e-5)
    full = torch.diag(m.w.detach()) + torch.block_diag(*m.blocks.detach())
    assert torch.allclose(s, x @ full @ y.T, atol=1e-5)


def test_gradcheck():
    torch.manual_seed(0)
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    w, b = torch.rand(4, dtype=torch.float64), torch.randn(2, 2, 2, dtype=torch.float64)
    for t in (x, y, w, b):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(gssf_scores, (x, y, w, b))
    s, t = torch.randn(4, 4, dtype=torch.float64, requires_grad=True), torch.randn(4, 4,
                                                                                  dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda s: relation_kd_loss([s], [t], [lambda a, b: a @ b.T], 0.5), (s,))


def test_relation_kd_golden_and_gssf_starts_as_cosine():
    eye = torch.eye(2)
    cos = RelationKD([(2, 2), (2, 2)], [(2, 2), (2, 2)], kernel="cosine", temperature=1.0)
    # R = I: each CE row is -log(e / (e + 1)) = log(1 + e^-1)
    assert math.isclose(cos([eye, eye], [eye, eye]).item(), math.log1p(math.exp(-1)),
                        rel_tol=1e-6)
    torch.manual_seed(0)
    s, t = [torch.randn(6, 8), torch.randn(6, 8)], [torch.randn(6, 8), torch.randn(6, 8)]
    g = RelationKD([(6, 8)] * 2, [(6, 8)] * 2, kernel="gssf", groups=4, temperature=0.1)
    c = RelationKD([(6, 8)] * 2, [(6, 8)] * 2, kernel="cosine", temperature=0.1)
    assert torch.allclose(g(s, t), c(s, t), atol=1e-5)
    assert len(list(g.parameters())) == 4 and not list(c.parameters())


def test_pair_dual_gssf_metric_and_dot_retrieval():
    torch.manual_seed(0)
    m = cd.models.create("pair-dual", img_size=8, channels=(8,), dim=16, metric="gssf",
                         groups=4).eval()
    assert m.similarity == "dot" and m.taps == ["tower_a.fc", "tower_b.fc"]
    xa, xb = torch.randn(12, 1, 4, 8), torch.randn(12, 1, 4, 8)
    with torch.no_grad():
        m.gssf.blocks.normal_()
        qa, gb = m(xa, xb)
        ea, eb = F.normalize(m.tower_a(xa), dim=-1), F.normalize(m.tower_b(xb), dim=-1)
    assert torch.allclose(qa @ gb.T, m.gssf(ea, eb), atol=1e-5)
    r_dot = recall_at_k(qa, gb, (1, 5), "dot")
    sim = m.gssf(ea, eb).detach()
    rank = (sim > sim.diagonal()[:, None]).sum(1)
    assert r_dot["r@1"] == float((rank < 1).float().mean())
    task = cd.tasks.build({"name": "retrieval", "similarity": "dot", "ks": [1, 5]})
    assert task.similarity == "dot"


def test_bad_inputs():
    with pytest.raises(ConfigError, match="gssf.groups"):
        GSSF(10, groups=3)
    with pytest.raises(ConfigError, match="gssf.inputs"):
        gssf_scores(torch.zeros(2, 4), torch.zeros(2, 3), torch.ones(4), torch.zeros(1, 4, 4))
    with pytest.raises(ConfigError, match="relation_kd.kernel"):
        RelationKD([(4, 8)], [(4, 8)], kernel="euclid")
    with pytest.raises(ConfigError, match="relation_kd.student.0"):
        RelationKD([(4, 8)], [(4, 16)])
    with pytest.raises(ConfigError, match="model.metric"):
        cd.models.create("pair-dual", img_size=8, metric="l2")
    with pytest.raises(ConfigError, match="task.similarity"):
        cd.tasks.build({"name": "retrieval", "similarity": "l1"})
    cosine_student = cd.models.create("pair-dual", img_size=8, channels=(8,), dim=16)
    with pytest.raises(ConfigError, match="method.student"):
        build("gssf", cosine_student, None)
    with pytest.raises(ConfigError, match="method.teacher"):
        build("relation-kd", cosine_student, None)


@pytest.fixture(scope="module")
def digits():
    return [cd.data.load_split("halves", s, images="digits", limit=n)
            for s, n in (("train", 600), ("val", 200))]


def _fit(student, recipe, tr, va, teacher=None, epochs=5, similarity="cosine"):
    io = student.io()
    task = {"name": "retrieval", "inputs": io["inputs"], "similarity": similarity}
    d = cd.Distiller(student, teacher, recipe.terms, io=io, teacher_io=io if teacher else None,
                     task=task)
    t = cd.Trainer(d, tr, va, epochs=epochs, batch_size=50, lr=1e-2, optimizer="adamw",
                   weight_decay=0.0, progress=False)
    return t, t.fit()


def test_tiny_runs_gssf_metric_and_kernel(digits):
    tr, va = digits
    torch.manual_seed(0)
    s = cd.models.create("pair-dual", img_size=8, channels=(8, 16), dim=16, metric="gssf",
                         groups=4)
    before = cd.evaluate(s, va, io=s.io(), task={"name": "retrieval", "similarity": "dot"})
    t, res = _fit(s, build("gssf", s, None, temperature=0.1), tr, va, similarity="dot")
    assert res["best_val_mean_recall"] > before["mean_recall"] + 0.1
    assert not torch.allclose(s.gssf.w.detach(), torch.ones(16))  # the metric trained
    # as a KD kernel: a dual-encoder teacher, one GSSF per side inside the loss
    torch.manual_seed(1)
    teacher = cd.models.create("pair-dual", img_size=8, channels=(8, 16), dim=16)
    _fit(teacher, build("itc", teacher, None, temperature=0.1), tr, va, epochs=3)
    torch.manual_seed(0)
    s2 = cd.models.create("pair-dual", img_size=8, channels=(8, 16), dim=16)
    recipe = build("gssf", s2, teacher, groups=4, temperature=0.1)
    assert [t.loss for t in recipe.terms] == ["itc", "relation_kd"]
    t2, res2 = _fit(s2, recipe, tr, va, teacher=teacher, epochs=2)
    kd = t2.distiller.loss_modules["relation_kd"]
    assert kd.kernel == "gssf" and len(kd.metrics) == 2
    assert not torch.allclose(kd.metrics[0].w.detach(), torch.ones(16))  # the kernel trained
    assert res2["best_val_mean_recall"] > before["mean_recall"]
