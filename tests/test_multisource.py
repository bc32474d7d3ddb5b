"""DistillNearest / DistillWeighted: transferability scores, probes, source weights, the two
recipes (golden total loss, gradient check, a tiny run), the data module, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import crossdistill as cd
import crossdistill.methods.multisource as M
from crossdistill.data import multisource as MS
from crossdistill.errors import ConfigError
from crossdistill.losses.features import mse
from crossdistill.losses.logits import kd
from crossdistill.methods import build


class Src(nn.Module):
    """A deterministic 'source': embedding = a fixed map of the image, head ``fc``."""

    def __init__(self, kind: str, dim_in: int = 64, classes: int = 10):
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(dim_in if kind == "pixels" else 1, classes)
        self.feature_path = "fc"

    def forward(self, x):
        f = x.flatten(1)
        emb = f if self.kind == "pixels" else f.mean(1, keepdim=True)
        return self.fc(emb)


def _cnn(seed=0, channels=(8, 16), classes=10):
    torch.manual_seed(seed)
    return cd.models.create("cnn", num_classes=classes, in_channels=1, img_size=8,
                            channels=channels)


# -- weights, folds, scores, probes --------------------------------------------------------------
def test_source_weights_golden():
    w = M.source_weights({"a": 0.5, "b": 0.7}, tau=0.1)
    e2 = math.exp(2.0)
    assert w["a"] == pytest.approx(1 / (1 + e2)) and w["b"] == pytest.approx(e2 / (1 + e2))
    assert M.source_weights({"a": 0.3, "b": 0.3}, 1.0) == {"a": 0.5, "b": 0.5}
    for bad in ({}, {"a": float("nan")}, {"a": "high"}):
        with pytest.raises(ConfigError, match="multisource.scores"):
            M.source_weights(bad)
    with pytest.raises(ConfigError, match="tau"):
        M.source_weights({"a": 1.0}, tau=0.0)


def test_stratified_folds_are_balanced():
    y = torch.arange(10).repeat_interleave(10)
    fold = M.stratified_folds(y, 5, seed=3)
    assert torch.bincount(fold).tolist() == [20] * 5
    for c in range(10):
        assert torch.bincount(fold[y == c], minlength=5).tolist() == [2] * 5
    assert torch.equal(fold, M.stratified_folds(y, 5, seed=3))
    with pytest.raises(ConfigError, match="score.folds"):
        M.stratified_folds(y, 1)
    with pytest.raises(ConfigError, match="score.folds"):
        M.stratified_folds(y[:6], 4)


def test_knn_predict_golden():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    ty = torch.tensor([0, 0, 1])
    x = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    assert M.knn_predict(train, ty, x, k=1).tolist() == [0, 1]
    assert M.knn_predict(train, ty, x, k=3).tolist() == [0, 0]  # majority of all three
    # a 1-1 tie (k=2) goes to the nearer neighbour's class
    assert M.knn_predict(train[1:], ty[1:], torch.tensor([[0.2, 1.0]]), k=2).tolist() == [1]


def test_scores_separate_informative_from_useless_features():
    torch.manual_seed(0)
    y = torch.arange(4).repeat_interleave(8)
    good = F.one_hot(y, 4).float() + 0.05 * torch.randn(32, 4)
    bad = torch.randn(32, 4)
    for fn in (M.probe_score, M.knn_score):
        assert fn(good, y, folds=4) == 1.0
        assert fn(bad, y, folds=4) < 0.6
    assert sorted(M.TRANSFER_SCORES.names()) == ["knn", "probe"]


def test_fit_probe_is_the_regularised_optimum():
    torch.manual_seed(1)
    x, y, wd = torch.randn(40, 5), torch.randint(0, 3, (40,)), 0.1
    p = M.fit_probe(x, y, 3, weight_decay=wd)
    w = p.weight.detach().double().requires_grad_(True)
    b = p.bias.detach().double().requires_grad_(True)
    loss = F.cross_entropy(x.double() @ w.t() + b, y) + 0.5 * wd * w.pow(2).sum()
    gw, gb = torch.autograd.grad(loss, (w, b))
    assert gw.abs().max() < 1e-4 and gb.abs().max() < 1e-4  # first-order optimality
    with pytest.raises(ConfigError, match="labelled samples only"):
        M.fit_probe(x, torch.full((40,), -100))
    with pytest.raises(ConfigError, match="probe.num_classes"):
        M.fit_probe(x, y, 2)


def test_transferability_ranks_and_probes(digits):
    lab = digits["train"]
    sources = {"mean": Src("mean"), "pixels": Src("pixels")}
    scores = M.transferability(sources, lab, score="knn", folds=4)
    assert scores["pixels"] > 0.8 > 0.4 > scores["mean"]
    teachers, s2 = M.probe_sources(sources, lab, score="probe", score_params={"folds": 4})
    assert s2["pixels"] > s2["mean"]
    assert cd.evaluate(teachers["pixels"], digits["test"])["acc"] > 0.85
    assert all(not p.requires_grad for p in teachers["pixels"].parameters())
    assert teachers["pixels"].fc.out_features == 10
    with pytest.raises(ConfigError, match="transfer score"):
        M.transferability(sources, lab, score="cka")
    with pytest.raises(ConfigError, match="multisource.sources"):
        M.transferability({}, lab)
    unl = cd.data.load("digits", "train", limit=50, labelled=1)
    with pytest.raises(ConfigError, match="multisource.labelled"):
        M.transferability(sources, unl)


# -- recipes ----------------------------------------------------------------------------------
def _probed(seed: int):
    src = _cnn(seed, (8, 16))
    return M.probed(src, nn.Linear(16, 10))


def test_nearest_picks_the_top_source_and_weighted_weighs_all():
    s = _cnn(0, (4, 8))
    t = {"a": _probed(1), "b": _probed(2), "c": _probed(3)}
    scores = {"a": 0.2, "b": 0.9, "c": 0.9}  # tie: the first of the top
    r = build("distill-nearest", s, t, scores=scores)
    assert [x.name for x in r.terms] == ["ce", "feat_b", "kd_b"]
    assert {x.teacher_model for x in r.terms[1:]} == {"b"}
    assert r.terms[1].loss == "mse" and r.terms[1].projector == "linear"
    assert [str(x) for x in r.terms[1].student] == ["fc:input"]
    r = build("distill-weighted", s, t, scores=scores, tau=0.5, feature_loss="cosine",
              feature_weight=2.0, kd_weight=0.5)
    w = M.source_weights(scores, 0.5)
    got = {x.name: x.weight for x in r.terms}
    for n in t:
        assert got[f"feat_{n}"] == pytest.approx(2.0 * w[n])
        assert got[f"kd_{n}"] == pytest.approx(0.5 * w[n])
    assert {x.loss for x in r.terms if x.name.startswith("feat")} == {"cosine"}
    one = build("distill-nearest", s, t["a"])  # one probed source: no names, no scores
    assert [x.name for x in one.terms] == ["ce", "feat", "kd"]


def test_weighted_total_matches_hand_computation(digits):
    s = _cnn(0, (4, 8))
    t = {"a": _probed(1), "b": _probed(2)}
    scores = {"a": 0.4, "b": 0.6}
    r = build("distill-weighted", s, t, scores=scores, tau=0.2, temperature=2.0)
    d = cd.Distiller(s, t, r.terms)
    batch = digits["train"].batch(torch.arange(16))
    batch["y"][::2] = -100  # half unlabelled
    d.build(batch)
    d.eval()  # BatchNorm in eval: the hand computation sees the same numbers
    out = d(batch)
    w = M.source_weights(scores, 0.2)
    feats = {}
    hook = s.fc.register_forward_pre_hook(lambda m, a: feats.__setitem__("s", a[0]))
    with torch.no_grad():
        z = s(batch["x"])
        hook.remove()
        keep = batch["y"] != -100
        want = F.cross_entropy(z[keep], batch["y"][keep])
        for n, m in t.items():
            got: dict = {}
            h = m.fc.register_forward_pre_hook(lambda mod, a, got=got: got.__setitem__("f", a[0]))
            zt = m(batch["x"])
            h.remove()
            proj = d.projectors[f"feat_{n}"]
            want = want + w[n] * (mse(proj(feats["s"]), got["f"]) + kd(z, zt, temperature=2.0)
                                  .mean())
    assert float(out.total.detach()) == pytest.approx(float(want), rel=1e-5)


def test_gradcheck_weighted_distillation():
    torch.manual_seed(0)
    s = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    z = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    W = [torch.randn(6, 4, dtype=torch.float64) for _ in range(2)]
    f = [torch.randn(3, 6, dtype=torch.float64) for _ in range(2)]
    zt = [torch.randn(3, 5, dtype=torch.float64) for _ in range(2)]
    w = list(M.source_weights({"a": 0.3, "b": 0.8}, 0.25).values())

    def total(s, z):
        return sum(w[i] * (mse(s @ W[i].t(), f[i]) + kd(z, zt[i], temperature=2.0).mean())
                   for i in range(2))

    assert torch.autograd.gradcheck(total, (s, z))


def test_tiny_end_to_end(digits, one_thread):
    tr = cd.data.load("digits", "train", limit=200, labelled=30)
    sources = {}
    for i, name in enumerate(("plain", "flipped")):
        m = _cnn(10 + i, (8, 16))
        data = digits["train"] if name == "plain" else cd.data.Dataset.classification(
            digits["train"].x.flip(-1), digits["train"].y)
        cd.Trainer(cd.Distiller(m, None, [cd.Term("ce")]), data, epochs=2, batch_size=64,
                   lr=0.05, progress=False).fit()
        sources[name] = m
    teachers, scores = M.probe_sources(sources, MS.labelled_part(tr), num_classes=10,
                                       score_params={"folds": 3})
    train = MS.oversample_labelled(tr, 7.0)
    for method in ("distill-nearest", "distill-weighted"):
        s = _cnn(0, (4, 8))
        r = build(method, s, teachers, scores=scores)
        d = cd.Distiller(s, teachers, r.terms)
        res = cd.Trainer(d, train, digits["val"], digits["test"], epochs=2, batch_size=64,
                         lr=3e-3, optimizer="adamw", progress=False).fit()
        assert 0.0 < res["test_acc"] <= 1.0
        assert all(math.isfinite(float(v)) for v in d.last_losses.values())
    # fine-tuning a source of the student's architecture
    s = _cnn(5, (8, 16))
    copied = M.inherit_trunk(s, sources["plain"])
    assert "stage1.0.weight" in copied and not any(k.startswith("fc.") for k in copied)
    assert torch.equal(s.stage1[0].weight, sources["plain"].stage1[0].weight)


def test_recipe_bad_input():
    s = _cnn(0, (4, 8))
    t = {"a": _probed(1), "b": _probed(2)}
    with pytest.raises(ConfigError, match="distill_weighted.scores"):
        build("distill-weighted", s, t, scores={"a": 0.1})
    with pytest.raises(ConfigError, match="distill_weighted.scores"):
        build("distill-weighted", s, t)
    with pytest.raises(ConfigError, match="method.teacher"):
        build("distill-weighted", s, t["a"], scores={"a": 1.0})
    with pytest.raises(ConfigError, match="method.teacher"):
        build("distill-nearest", s, None)
    with pytest.raises(ConfigError, match="multisource.feature_loss"):
        build("distill-nearest", s, t, scores={"a": 0.1, "b": 0.2}, feature_loss="l1")
    with pytest.raises(ConfigError, match="multisource.scores"):
        build("distill-nearest", s, t, scores={"a": float("inf"), "b": 0.2})
    with pytest.raises(ConfigError, match="tau"):
        build("distill-weighted", s, t, scores={"a": 0.1, "b": 0.2}, tau=-1.0)
    with pytest.raises(ConfigError, match="method.tau"):
        build("distill-nearest", s, t, tau=1.0)  # not a parameter of nearest
    with pytest.raises(ConfigError, match="finetune.source"):
        M.inherit_trunk(s, _cnn(1, (8, 16)))


# -- data ---------------------------------------------------------------------------------------
def test_data_module():
    halves = MS.mnist_halves()
    assert len(set(halves["source"]) & set(halves["target"])) == 0
    plain = MS.source_domain("mnist", "val")
    inv, rot = MS.source_domain("inverted", "val"), MS.source_domain("rotated", "val")
    mean, std = plain.info["mean"], plain.info["std"]
    assert torch.allclose(inv.x * std + mean, 1 - (plain.x * std + mean), atol=1e-5)
    assert torch.allclose(rot.x, torch.rot90(plain.x, 1, dims=(-2, -1)), atol=1e-5)
    assert torch.equal(inv.y, plain.y) and len(plain) == MS.SOURCE_VAL
    assert not set(plain.idx.tolist()) & set(MS.target_split("train").idx.tolist())
    tr = MS.target_split("train", labelled=50, classes=[5, 6, 7, 8, 9])
    assert tr.num_classes == 5 and int((tr.y >= 0).sum()) == 50
    assert set(tr.y[tr.y >= 0].tolist()) == {0, 1, 2, 3, 4}
    per = torch.bincount(tr.y[tr.y >= 0])
    assert per.min() >= 9 and per.max() <= 11  # stratified in proportion to the classes' sizes
    over = MS.oversample_labelled(tr, 7.0)
    n_u = int((tr.y < 0).sum())
    copies = round(n_u / 7.0 / 50)
    assert len(over) == len(tr) + 50 * (copies - 1) and int((over.y >= 0).sum()) == 50 * copies
    for call, field in [
        (lambda: MS.source_domain("sketch"), "source.domain"),
        (lambda: MS.source_domain("rotated", "test"), "source.split"),
        (lambda: MS.source_domain("rotated", angle=float("nan")), "source.angle"),
        (lambda: MS.target_split("train", labelled=3), "target.labelled"),
        (lambda: MS.target_split("dev"), "target.split"),
        (lambda: MS.class_subset(plain, [1, 1]), "data.classes"),
        (lambda: MS.oversample_labelled(tr, 0), "target.ratio"),
    ]:
        with pytest.raises(ConfigError, match=field):
            call()
