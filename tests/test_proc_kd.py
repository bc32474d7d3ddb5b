"""ProC-KD: prototype assignment / reconstruction / fitting / attention (golden values,
gradient checks), the augmented student, the recipe, a tiny cross-task run, bad input."""

import math

import pytest
import torch

import crossdistill as cd
import crossdistill.methods.proc_kd as PK
from crossdistill.data.multisource import class_subset
from crossdistill.errors import ConfigError
from crossdistill.losses import prototypes as LP
from crossdistill.methods import build


def _cnn(seed=0, channels=(4, 8), classes=5):
    torch.manual_seed(seed)
    return cd.models.create("cnn", num_classes=classes, in_channels=1, img_size=8,
                            channels=channels)


def test_soft_assign_and_reconstruct_golden():
    x = torch.tensor([[0.0, 0.0]])
    p = torch.tensor([[0.0, 0.0], [2.0, 0.0]])  # squared distances / D: 0 and 4 / 2 = 2
    a = LP.soft_assign(x, p, tau=1.0)
    want = torch.tensor([1.0, math.exp(-2.0)]) / (1 + math.exp(-2.0))
    assert torch.allclose(a[0], want, atol=1e-6)
    r = LP.reconstruct(x, p, tau=1.0)
    assert torch.allclose(r[0], torch.tensor([2 * want[1], 0.0]), atol=1e-6)
    assert LP.fit_loss(x, p, 1.0).item() == pytest.approx(float((2 * want[1]) ** 2 / 2))
    # a feature on a prototype, with a sharp assignment, reconstructs to itself
    assert torch.allclose(LP.reconstruct(p, p, tau=1e-3), p, atol=1e-6)


def test_attend_golden():
    q = torch.tensor([[1.0, 0.0]])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    values = torch.tensor([[10.0], [20.0]])
    e = math.exp(1 / math.sqrt(2))
    w = torch.tensor([e, 1.0]) / (e + 1)
    assert LP.attend(q, keys, values).item() == pytest.approx(float(w @ values[:, 0]))


def test_proto_distill_golden_and_targets():
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0]]).t().reshape(1, 2, 1, 1)  # one position, on prototype 0
    s = torch.zeros(1, 2, 1, 1)
    # r(t) ~ p_0 with a sharp assignment: ||0 - p_0||^2 / 2 = 0.5
    assert LP.proto_distill(s, t, p, tau=1e-3).item() == pytest.approx(0.5, abs=1e-6)
    # FitNet's target would be t itself; with a soft assignment r(t) lies inside the hull
    r = LP.reconstruct(torch.tensor([[1.0, 0.0]]), p, tau=1.0)
    want = float(r.pow(2).mean())
    assert LP.proto_distill(s, t, p, tau=1.0).item() == pytest.approx(want, rel=1e-6)
    # "self": the student's own reconstruction (constant); s on a prototype -> 0
    s2 = torch.tensor([0.0, 1.0]).reshape(1, 2, 1, 1)
    assert LP.proto_distill(s2, None, p, tau=1e-3, target="self").item() == pytest.approx(0.0,
                                                                                          abs=1e-6)
    # per-sample values over (B, N, D) tokens
    v = LP.proto_distill(torch.zeros(3, 4, 2), torch.ones(3, 4, 2), p, 0.1)
    assert v.shape == (3,)


def test_gradchecks():
    torch.manual_seed(0)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    p = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: LP.reconstruct(a, b, 0.5), (x, p))
    assert torch.autograd.gradcheck(lambda a, b: LP.fit_loss(a, b, 0.5), (x, p))
    q = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(LP.attend, (q, k, v))
    s = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    pc = p.detach().clone()
    assert torch.autograd.gradcheck(lambda a: LP.proto_distill(a, t, pc, 0.5), (s,))


def test_fit_prototypes_finds_the_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]])
    x = torch.cat([c + 0.1 * torch.randn(50, 2, generator=g) for c in centres])
    init = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:3]]
    p = LP.fit_prototypes(x, 3, tau=0.05, steps=150, lr=0.1, seed=0)
    assert LP.fit_loss(x, p, 0.05) <= LP.fit_loss(x, init, 0.05) + 1e-6
    d = torch.cdist(centres, p).min(1).values
    assert d.max() < 0.3  # every centre has a prototype near it
    assert torch.equal(p, LP.fit_prototypes(x, 3, tau=0.05, steps=150, lr=0.1, seed=0))
    with pytest.raises(ConfigError, match="prototypes.k"):
        LP.fit_prototypes(x, 0)
    with pytest.raises(ConfigError, match="prototypes.tau"):
        LP.fit_prototypes(x, 2, tau=0.0)


def test_augmented_student_starts_as_the_plain_one():
    base = _cnn(0)
    ref = _cnn(0)
    protos = torch.randn(6, 16)
    s = PK.ProtoAugmented(base, protos, dim=8)
    x = torch.randn(3, 1, 8, 8)
    s.eval(), ref.eval()
    with torch.no_grad():
        assert torch.allclose(s(x), ref(x), atol=1e-6)  # W_v = 0 at init
    assert s.local_path == "net.stage2.body" and s.stages == ["net.stage1", "net.stage2"]
    assert s.feature_path == "net.fc" and torch.equal(s.prototypes, protos)
    assert not any(p is s.prototypes for p in s.parameters())  # a buffer: frozen


def test_recipe_terms_and_bad_input():
    teacher = _cnn(1, (4, 16))
    s = PK.ProtoAugmented(_cnn(0), torch.randn(6, 16))
    r = build("proc-kd", s, teacher)
    assert [t.loss for t in r.terms] == ["ce", "proc_kd"]
    assert [str(x) for x in r.terms[1].student] == ["net.stage2.body"]
    assert [str(x) for x in r.terms[1].teacher] == ["stage2"]
    with pytest.raises(ConfigError, match="ProtoAugmented"):
        build("proc-kd", _cnn(0), teacher)
    with pytest.raises(ConfigError, match="method.teacher"):
        build("proc-kd", s, None)
    with pytest.raises(ConfigError, match="target"):
        build("proc-kd", s, teacher, target="both")
    with pytest.raises(ConfigError, match="proc_kd.at"):
        PK.ProtoAugmented(_cnn(0), torch.randn(6, 16), at="stage9")
    with pytest.raises(ConfigError, match="proc_kd.prototypes"):
        PK.ProtoAugmented(_cnn(0), torch.randn(6))
    # prototypes of another width than the teacher's features: refused at build time
    bad = PK.ProtoAugmented(_cnn(0), torch.randn(6, 7))
    d = cd.Distiller(bad, teacher, build("proc-kd", bad, teacher).terms)
    batch = {"x": torch.randn(4, 1, 8, 8), "y": torch.tensor([0, 1, -100, 2]),
             "idx": torch.arange(4)}
    with pytest.raises(ConfigError, match="prototypes"):
        d.build(batch)


def test_tiny_cross_task_run(one_thread):
    tr_all, va_all = cd.data.load("digits", "train"), cd.data.load("digits", "val")
    t_tr = class_subset(tr_all, [0, 1, 2, 3, 4])
    teacher = _cnn(1, (8, 16))
    cd.Trainer(cd.Distiller(teacher, None, [cd.Term("ce")]), t_tr, epochs=2, batch_size=64,
               lr=0.05, progress=False).fit()
    s_tr = class_subset(tr_all, [5, 6, 7, 8, 9])
    s_tr.tensors["y"] = torch.where(torch.arange(len(s_tr)) % 4 == 0, s_tr.y, -100)
    s_va = class_subset(va_all, [5, 6, 7, 8, 9])
    protos = PK.fit_to_teacher(teacher, s_tr, k=8, steps=30)
    assert protos.shape == (8, 16)
    s = PK.ProtoAugmented(_cnn(0, (4, 8)), protos, dim=8)
    r = build("proc-kd", s, teacher)
    d = cd.Distiller(s, teacher, r.terms)
    before = s.prototypes.clone()
    res = cd.Trainer(d, s_tr, s_va, s_va, epochs=2, batch_size=64, lr=3e-3,
                     optimizer="adamw", progress=False).fit()
    assert 0.0 < res["test_acc"] <= 1.0
    assert torch.equal(s.prototypes, before)  # frozen
    att = s.net.stage2.augment
    assert att.value.weight.abs().sum() > 0  # the augmentation learnt something
    assert torch.equal(d.loss_modules["proc_kd"].prototypes, before)
    assert all(math.isfinite(float(v)) for v in d.last_losses.values())
