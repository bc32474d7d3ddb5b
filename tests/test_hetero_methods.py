"""Tiny end-to-end tests of the heterogeneous-KD recipes: ofa, pld, taid, scalekd,
collaborative, dml (digits 8x8, a few steps each)."""

import math

import pytest
import torch

import crossdistill as cd
from crossdistill import Distiller, Trainer
from crossdistill.errors import ConfigError
from crossdistill.methods import METHODS, build
from crossdistill.methods.collaborative import CollaborativePair
from crossdistill.methods.ofa import OFABranch
from crossdistill.methods.scalekd import sequential_tail

FAST = dict(epochs=1, batch_size=50, optimizer="adamw", lr=1e-3, progress=False)


@pytest.fixture
def digits(digits):
    """The shared digits slices, smaller still: these are wiring tests, not accuracy tests."""
    return {
        "train": digits["train"].subset(torch.arange(100)),
        "val": digits["val"].subset(torch.arange(50)),
        "test": digits["test"].subset(torch.arange(50)),
    }


def _models(kind_t, kind_s):
    def make(kind, seed):
        torch.manual_seed(seed)
        if kind == "cnn":
            return cd.models.create(
                "cnn", num_classes=10, in_channels=1, img_size=8, channels=(8, 16, 16)
            )
        if kind == "resnet":
            return cd.models.create("resnet", num_classes=10, in_channels=1, img_size=8, depth=8)
        if kind == "vit":
            return cd.models.create(
                "vit", num_classes=10, in_channels=1, img_size=8, patch=2, dim=16, depth=2, heads=2
            )
        if kind == "mixer":
            return cd.models.create(
                "mlp-mixer", num_classes=10, in_channels=1, img_size=8, patch=2, dim=16, depth=2
            )
        return cd.models.create("mlp", num_classes=10, in_channels=1, img_size=8, hidden=(32,))

    return make(kind_t, 0), make(kind_s, 1)


def _fit(student, teacher, recipe, digits, **kw):
    d = Distiller(student, teacher, recipe.terms, num_samples=2000, hooks=recipe.hooks)
    res = Trainer(d, digits["train"], digits["val"], digits["test"], **{**FAST, **kw}).fit()
    return d, res


def test_registered_with_papers():
    for name in ("ofa", "pld", "taid", "scalekd", "collaborative", "dml"):
        meta = METHODS.meta(name)
        assert meta["paper"] and meta["year"], name


@pytest.mark.parametrize(
    "t,s", [("cnn", "vit"), ("vit", "cnn"), ("resnet", "mixer"), ("resnet", "mlp")]
)
def test_ofa_end_to_end(digits, t, s):
    teacher, student = _models(t, s)
    recipe = build("ofa", student, teacher, gamma=1.5)
    d, res = _fit(student, teacher, recipe, digits)
    assert 0.0 <= res["test_acc"] <= 1.0
    branches = [k for k in d.projectors if k.startswith("ofa_branch")]
    assert len(branches) == len(student.stages) - 1
    assert math.isfinite(float(d.last_losses["ofa"]))
    exported = d.export()
    assert set(exported.state_dict()) == set(student.state_dict())


def test_ofa_branch_shapes_and_errors():
    assert OFABranch((8, 6, 6), (10,))(torch.randn(2, 8, 6, 6)).shape == (2, 10)
    assert OFABranch((17, 16), (10,), kind="vit")(torch.randn(2, 17, 16)).shape == (2, 10)
    assert OFABranch((16, 16), (10,), kind="mlp")(torch.randn(2, 16, 16)).shape == (2, 10)
    assert OFABranch((32,), (10,))(torch.randn(2, 32)).shape == (2, 10)
    with pytest.raises(ConfigError):
        OFABranch((8, 6, 6), (4, 10))
    teacher, student = _models("cnn", "vit")
    with pytest.raises(ConfigError, match="gamma"):
        build("ofa", student, teacher, gamma=0.9)
    with pytest.raises(ConfigError, match="unknown parameter"):
        build("ofa", student, teacher, eps=1.5)


def test_pld_and_taid_end_to_end(digits):
    teacher, student = _models("cnn", "vit")
    recipe = build("pld", student, teacher)
    assert [t.loss for t in recipe.terms] == ["pld"]  # PLD replaces CE + KD
    _, res = _fit(student, teacher, recipe, digits)
    assert 0.0 <= res["test_acc"] <= 1.0
    teacher, student = _models("vit", "cnn")
    d, _ = _fit(student, teacher, build("taid", student, teacher), digits, epochs=2)
    mod = d.loss_modules["taid"]
    assert 0.4 < float(mod.t) <= 1.0  # the schedule moved t off t_start
    assert math.isfinite(float(mod.L_prev))


class _Kill(Exception):
    pass


class _KillAfter:
    def __init__(self, n):
        self.n, self.seen = n, 0

    def on_batch_end(self, trainer, b):
        self.seen += 1
        if self.seen == self.n:
            raise _Kill


def test_taid_state_survives_resume(tmp_path, digits):
    settings = dict(FAST, epochs=2, batch_size=20, checkpoint_every=2)

    def make():
        teacher, student = _models("cnn", "vit")
        return Distiller(student, teacher, build("taid", student, teacher, alpha=0.05).terms)

    ref = make()
    Trainer(ref, digits["train"], digits["val"], out_dir=tmp_path / "a", **settings).fit()
    d = make()
    with pytest.raises(_Kill):  # 100/20 = 5 batches per epoch: die inside epoch 2
        Trainer(
            d,
            digits["train"],
            digits["val"],
            out_dir=tmp_path / "b",
            callbacks=[_KillAfter(7)],
            **settings,
        ).fit()
    d2 = make()
    Trainer(d2, digits["train"], digits["val"], out_dir=tmp_path / "b", **settings).fit(resume=True)
    a, b = ref.loss_modules["taid"], d2.loss_modules["taid"]
    for k in ("t", "m", "L_prev"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    for (k, x), y in zip(ref.trainable_state().items(), d2.trainable_state().values()):
        assert torch.equal(x, y), k


@pytest.mark.parametrize("t,s", [("vit", "cnn"), ("resnet", "vit"), ("vit", "mlp")])
def test_scalekd_end_to_end_teacher_untouched(digits, t, s):
    teacher, student = _models(t, s)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    recipe = build("scalekd", student, teacher, input_shape=(1, 8, 8))
    d = Distiller(student, teacher, recipe.terms, hooks=recipe.hooks)
    trainer = Trainer(d, digits["train"], digits["val"], **FAST)
    trainer.fit()
    # teacher weights and BN statistics unchanged; none of them trained or checkpointed
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    opt_ids = {id(p) for g in trainer.opt.param_groups for p in g["params"]}
    assert not opt_ids & {id(p) for p in teacher.parameters()}
    assert not any(k.startswith("teachers.") for k in d.trainable_state())
    assert set(d.export().state_dict()) == set(student.state_dict())
    # one shared cross-attention projector feeds the three feature terms
    projs = d.projectors
    assert projs["scalekd_spatial"] is projs["scalekd_frequency"]
    assert projs["scalekd_perception"].proj is projs["scalekd_spatial"]
    for name in ("scalekd_spatial", "scalekd_frequency", "scalekd_perception", "kd", "ce"):
        assert math.isfinite(float(d.last_losses[name])), name


def test_sequential_tail_reproduces_teacher():
    teacher, _ = _models("vit", "cnn")
    teacher.eval()
    x = torch.randn(3, 1, 8, 8)
    seen = {}
    h = teacher.get_submodule("blocks.1").register_forward_pre_hook(
        lambda m, a: seen.setdefault("x", a[0])
    )
    ref = teacher(x)
    h.remove()
    out = seen["x"]
    for m in sequential_tail(teacher, "blocks.1"):
        out = m(out)
    assert torch.allclose(out, ref, atol=1e-6)


def test_collaborative_and_dml_end_to_end(digits):
    a, b = _models("cnn", "vit")
    pair = CollaborativePair(a, b)
    for name in ("collaborative", "dml"):
        recipe = build(name, pair, None)
        d = Distiller(pair, None, recipe.terms)
        trainer = Trainer(d, digits["train"], digits["val"], **FAST)
        trainer.fit()
        ids = {id(p) for g in trainer.opt.param_groups for p in g["params"]}
        assert {id(p) for p in a.parameters()} <= ids and {id(p) for p in b.parameters()} <= ids
        for k in ("ce_a", "ce_b"):
            assert math.isfinite(float(d.last_losses[k]))
        assert 0.0 <= cd.evaluate(pair.a, digits["test"])["acc"] <= 1.0
        assert 0.0 <= cd.evaluate(pair.b, digits["test"])["acc"] <= 1.0
    assert "hfd" in build("collaborative", pair, None).terms[2].loss
    x = digits["val"].x[:4]
    pair.output = "a"
    assert torch.equal(pair(x), a(x))
    pair.output = "mean"
    assert torch.allclose(pair(x), (a(x) + b(x)) / 2)


@pytest.mark.parametrize(
    "mode,losses",
    [
        ("sample", ["ce", "ce", "hfd", "bsd"]),
        ("region", ["ce", "ce", "hfd", "bsd_region_heads"]),
        ("both", ["ce", "ce", "hfd", "bsd", "bsd_region_heads"]),
    ],
)
def test_collaborative_bsd_modes(mode, losses):
    a, b = _models("resnet", "vit")
    recipe = build("collaborative", CollaborativePair(a, b), None, bsd=mode, regions=3)
    assert [t.loss for t in recipe.terms] == losses
    if mode != "sample":  # region taps default to each member's last stage
        term = recipe.terms[-1]
        assert [str(x) for x in term.student] == ["a.layer3", "b.blocks.1", "a", "b"]
        assert term.params["grid"] == 3 and term.name == "bsd_region"


def test_collaborative_region_bsd_end_to_end(digits):
    a, b = _models("resnet", "vit")
    pair = CollaborativePair(a, b)
    recipe = build("collaborative", pair, None, bsd="both", temperature=2.0)
    d = Distiller(pair, None, recipe.terms)
    trainer = Trainer(d, digits["train"], digits["val"], **FAST)  # 100 / 50: two steps
    trainer.fit()
    for k in ("ce_a", "ce_b", "hfd", "bsd", "bsd_region"):
        assert math.isfinite(float(d.last_losses[k])), k
    heads = d.loss_modules["bsd_region"]
    assert heads.a(torch.randn(2, 64, 2, 2)).shape == (2, 4, 10)  # resnet layer3: 64 x 2x2
    assert heads.b(torch.randn(2, 17, 16)).shape == (2, 4, 10)  # vit: cls + 4x4 tokens
    ids = {id(p) for g in trainer.opt.param_groups for p in g["params"]}
    assert {id(p) for p in heads.parameters()} <= ids
    d.train()
    d.zero_grad(set_to_none=True)
    batch = {"x": digits["train"].x[:8], "y": digits["train"].y[:8]}
    d(batch).losses["bsd_region"].backward()
    for name, p in heads.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
    for model in (a, b):  # the region loss reaches both backbones
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert any(k.startswith("loss_modules.bsd_region.") for k in d.trainable_state())
    assert set(d.export().state_dict()) == set(pair.state_dict())


def test_collaborative_input_errors():
    a, b = _models("cnn", "vit")
    with pytest.raises(ConfigError, match="CollaborativePair"):
        build("collaborative", b, None)
    with pytest.raises(ConfigError, match="no teacher"):
        build("dml", CollaborativePair(a, b), a)
    with pytest.raises(ConfigError, match="collaborative.output"):
        CollaborativePair(a, b, output="both")
    with pytest.raises(ConfigError, match="collaborative.bsd"):
        build("collaborative", CollaborativePair(a, b), None, bsd="pixel")
    with pytest.raises(ConfigError, match="collaborative.regions"):
        build("collaborative", CollaborativePair(a, b), None, bsd="region", regions=0)


@pytest.fixture(scope="module")
def mnist4():
    try:
        return cd.data.load("mnist", "val", limit=4)
    except ConfigError:  # a checkout without ../shared/data
        pytest.skip("MNIST IDX files not present (../shared/data/mnist-t10k)")


@pytest.mark.parametrize(
    "name", ["ofa_vit", "pld_vit", "taid_vit", "scalekd_resnet"], ids=lambda n: n.split("_")[0]
)
def test_hetero_configs_build(name, mnist4):
    """The shipped YAML recipes validate and build (fresh teacher weights, 4 MNIST images)."""
    from pathlib import Path

    import yaml

    from crossdistill.build import make_model
    from crossdistill.config import validate

    path = Path(__file__).resolve().parents[1] / f"configs/hetero_{name}_mnist.yaml"
    cfg = validate(yaml.safe_load(path.read_text()))
    data = mnist4
    teacher = make_model(cfg.teacher, "teacher", data, checkpoint=False)
    student = make_model(cfg.student, "student", data)
    recipe = build(cfg.method.name, student, teacher, **cfg.method.kwargs())
    d = Distiller(student, teacher, recipe.terms, num_samples=10000)
    out = d({"x": data.x, "y": data.y, "idx": data.idx})
    assert torch.isfinite(out.total)


def test_collaborative_default_bsd_is_both_and_works_with_an_mlp_peer(digits):
    a, b = _models("resnet", "mlp")  # the MLP's last stage is a vector: one region for all
    pair = CollaborativePair(a, b)
    recipe = build("collaborative", pair, None)
    assert [t.loss for t in recipe.terms][-2:] == ["bsd", "bsd_region_heads"]
    d = Distiller(pair, None, recipe.terms)
    Trainer(d, digits["train"], digits["val"], **FAST).fit()
    assert math.isfinite(float(d.last_losses["bsd_region"]))


def test_best_members_keeps_each_members_own_best_epoch(digits):
    from crossdistill.methods.collaborative import BestMembers

    a, b = _models("cnn", "mlp")
    pair = CollaborativePair(a, b)
    recipe = build("dml", pair, None)
    keep = BestMembers(pair, digits["val"])
    seen = {"a": [], "b": []}

    class Spy:  # records each member's val accuracy after every epoch
        def on_epoch_end(self, trainer, row):
            for n in ("a", "b"):
                seen[n].append(cd.evaluate(getattr(pair, n), digits["val"])["acc"])

    Trainer(
        Distiller(pair, None, recipe.terms),
        digits["train"],
        digits["val"],
        callbacks=[keep, Spy()],
        **{**FAST, "epochs": 3},
    ).fit()
    best = keep.restore()
    for n in ("a", "b"):
        acc, epoch = best[n]
        assert acc == max(seen[n]) and epoch == seen[n].index(acc)
        assert cd.evaluate(getattr(pair, n), digits["val"])["acc"] == acc  # weights restored


def test_rkl_recipe_end_to_end(digits):
    teacher, student = _models("cnn", "mlp")
    recipe = build("rkl", student, teacher)
    assert [t.loss for t in recipe.terms] == ["ce", "rkl"]
    d, res = _fit(student, teacher, recipe, digits)
    assert math.isfinite(float(d.last_losses["rkl"])) and 0.0 <= res["test_acc"] <= 1.0
