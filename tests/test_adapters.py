"""ModelIO adapters: how a model is called on a batch and where its logits are."""

import pytest
import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput, SequenceClassifierOutput

import crossdistill as cd
from crossdistill import ConfigError, Distiller, Term, Trainer
from crossdistill.adapters import ModelIO, describe, find_logits, select
from crossdistill.data import Dataset

B, D_IN, K = 4, 5, 3


class Core(nn.Module):
    """A linear head whose forward returns its logits in one of several layouts."""

    def __init__(self, kind: str, d_in: int = D_IN, k: int = K):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(d_in, k)
        self.feat = nn.Linear(d_in, 2)
        self.kind = kind

    def wrap(self, x):
        z, h = self.fc(x), self.feat(x)
        if self.kind == "tensor":
            return z
        if self.kind == "tuple":
            return (z, h)
        if self.kind == "dict":
            return {"features": h, "logits": z}
        if self.kind == "hf_seq":
            return SequenceClassifierOutput(logits=z, hidden_states=(h,))
        if self.kind == "hf_causal":
            return CausalLMOutput(logits=z)
        if self.kind == "odd":  # no "logits" key; logits nested one level down as well
            return {"features": h, "scores": z, "heads": (h, z)}
        if self.kind == "odd_tuple":  # features first: auto-detection would take the wrong one
            return (h, z)
        raise AssertionError(self.kind)


class Positional(Core):
    def forward(self, x):
        return self.wrap(x)


class Keyword(Core):
    def forward(self, *, input_ids):
        return self.wrap(input_ids)


def _batch(key="x"):
    g = torch.Generator().manual_seed(1)
    return {key: torch.randn(B, D_IN, generator=g), "y": torch.tensor([0, 1, 2, -100])}


AUTO_KINDS = ["tensor", "tuple", "dict", "hf_seq", "hf_causal"]


@pytest.mark.parametrize("kind", AUTO_KINDS)
@pytest.mark.parametrize("call", ["positional", "keyword"])
def test_logits_found_without_selector(kind, call):
    if call == "positional":
        model, key, io = Positional(kind), "x", {"inputs": ["x"]}
    else:
        model, key, io = Keyword(kind), "tokens", {"inputs": {"input_ids": "tokens"}}
    batch = _batch(key)
    d = Distiller(model, None, [Term("ce")], io=io).build(batch)
    out = d(batch)
    expected = model.fc(batch[key])
    assert torch.allclose(out.logits, expected)
    # ce over the three labelled samples only (-100 is left out)
    ref = nn.functional.cross_entropy(expected[:3], batch["y"][:3])
    assert torch.allclose(out.losses["ce"], ref, atol=1e-6)


def test_odd_layout_fails_at_build_showing_structure():
    model, batch = Positional("odd"), _batch()
    d = Distiller(model, None, [Term("ce")])
    with pytest.raises(ConfigError) as err:
        d.build(batch)
    msg = str(err.value)
    assert "student.logits" in msg
    assert "no logits found" in msg
    # the structure of the output: its keys and their shapes
    assert "'features': tensor (4, 2)" in msg and "'scores': tensor (4, 3)" in msg
    assert "'heads'" in msg


def test_odd_layout_fails_for_keyword_call_too():
    d = Distiller(Keyword("odd"), None, [Term("ce")], io={"inputs": {"input_ids": "tokens"}})
    with pytest.raises(ConfigError, match="no logits found.*'scores': tensor"):
        d.build(_batch("tokens"))


@pytest.mark.parametrize(
    "kind,selector",
    [
        ("odd", "scores"),
        ("odd", "heads.1"),
        ("odd", ["heads", 1]),
        ("odd", "heads.-1"),
        ("odd_tuple", 1),
        ("hf_seq", "logits"),
        ("tuple", 0),
    ],
)
def test_selector_picks_the_logits(kind, selector):
    model, batch = Positional(kind), _batch()
    d = Distiller(model, None, [Term("ce")], io={"logits": selector}).build(batch)
    assert torch.allclose(d(batch).logits, model.fc(batch["x"]))


def test_selector_keyword_model_and_modelio_instance():
    model, batch = Keyword("odd"), _batch("tokens")
    io = ModelIO({"input_ids": "tokens"}, "heads.1")
    d = Distiller(model, None, [Term("ce")], io=io).build(batch)
    assert torch.allclose(d(batch).logits, model.fc(batch["tokens"]))


def test_odd_tuple_without_selector_takes_first_item():
    """The HF return_dict=False convention: the first tuple item. Documented, so a model with
    features first needs a selector; check the auto-detection does what it says."""
    model, batch = Positional("odd_tuple"), _batch()
    out = model(batch["x"])
    assert find_logits(out) is out[0]


@pytest.mark.parametrize(
    "selector,fragment",
    [("nope", "'nope'"), ("heads.5", "5"), (7, "7")],
)
def test_bad_selector_fails_at_build_with_structure(selector, fragment):
    d = Distiller(Positional("odd"), None, [Term("ce")], io={"logits": selector})
    with pytest.raises(ConfigError) as err:
        d.build(_batch())
    msg = str(err.value)
    assert "student.logits" in msg and fragment in msg
    assert "not in the model's output" in msg and "'scores': tensor (4, 3)" in msg


def test_selector_of_a_non_tensor_fails():
    d = Distiller(Positional("odd"), None, [Term("ce")], io={"logits": "heads"})
    with pytest.raises(ConfigError, match="selects a tuple, not a tensor"):
        d.build(_batch())


@pytest.mark.parametrize(
    "io,model",
    [
        ({"inputs": ["image"]}, Positional("tensor")),
        ({"inputs": {"input_ids": "tokens"}}, Keyword("tensor")),
    ],
)
def test_missing_batch_key_fails_at_build_listing_keys(io, model):
    d = Distiller(model, None, [Term("ce")], io=io)
    with pytest.raises(ConfigError) as err:
        d.build(_batch("x"))
    msg = str(err.value)
    assert "student.inputs" in msg
    assert "the batch has: idx, x, y" in msg or "the batch has: x, y" in msg


def test_missing_teacher_key_names_the_teacher():
    s, t = Positional("tensor"), Positional("tensor")
    d = Distiller(s, t, [Term("kd")], teacher_io={"inputs": ["feats"]})
    with pytest.raises(ConfigError, match=r"teachers\.teacher\.inputs.*'feats'.*x, y"):
        d.build(_batch())


def test_modelio_rejects_non_string_inputs():
    with pytest.raises(ConfigError, match="batch keys"):
        ModelIO([0, 1])
    with pytest.raises(ConfigError):
        Distiller(Positional("tensor"), None, [Term("ce")], io=42)


def test_student_and_teacher_read_different_keys_and_train():
    torch.manual_seed(0)
    n = 24
    a = torch.randn(n, 4)
    b = torch.randn(n, 6)
    y = torch.randint(0, K, (n,))
    data = Dataset({"a": a, "b": b, "y": y}, {"a": "value", "b": "value", "y": "label"})
    student = Positional("tensor", d_in=4)
    teacher = Positional("dict", d_in=6)
    seen = {}

    def record(name):
        def hook(module, args, out):
            seen[name] = args[0].shape  # returns None: the output is left alone

        return hook

    teacher.register_forward_hook(record("t"))
    student.register_forward_hook(record("s"))
    d = Distiller(
        student,
        teacher,
        [Term("ce", weight=0.5), Term("kd", weight=0.5)],
        io={"inputs": ["a"]},
        teacher_io={"inputs": ["b"]},
    )
    before = {k: v.clone() for k, v in student.state_dict().items()}
    res = Trainer(d, data, epochs=2, batch_size=8, lr=0.05, progress=False).fit()
    assert seen["s"][-1] == 4 and seen["t"][-1] == 6
    after = student.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for v in teacher.parameters():  # frozen
        assert not v.requires_grad
    assert res["best_epoch"] in (0, 1)
    assert set(d.last_losses) == {"ce", "kd"}
    assert all(torch.isfinite(v) for v in d.last_losses.values())


def test_teacher_io_per_teacher_name():
    s = Positional("tensor", d_in=4)
    t1, t2 = Positional("tensor", d_in=6), Positional("odd", d_in=4)
    batch = {"a": torch.randn(B, 4), "b": torch.randn(B, 6), "y": torch.tensor([0, 1, 2, 0])}
    d = Distiller(
        s,
        {"one": t1, "two": t2},
        [Term("kd", teacher_model="one", name="kd1"), Term("kd", teacher_model="two", name="kd2")],
        io={"inputs": ["a"]},
        teacher_io={"one": {"inputs": ["b"]}, "two": {"inputs": ["a"], "logits": "scores"}},
    ).build(batch)
    out = d(batch)
    assert set(out.losses) == {"kd1", "kd2"}
    assert torch.isfinite(out.total)


class Dense(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, K, 1)

    def forward(self, image):
        return self.conv(image)


def test_class_dim_moves_class_axis_last():
    model = Dense()
    x = torch.randn(2, 2, 4, 5)
    raw = model(x)
    assert raw.shape == (2, K, 4, 5)
    io = ModelIO(["image"], class_dim=1)
    z = io.check(raw)
    assert z.shape == (2, 4, 5, K)
    assert torch.equal(z, raw.permute(0, 2, 3, 1))
    assert torch.equal(ModelIO(["image"], class_dim=-1).logits(raw), raw)  # already last
    with pytest.raises(ConfigError, match="class_dim.*4 dims"):
        ModelIO(["image"], class_dim=4).check(raw)


def test_class_dim_through_distiller_and_segmentation_default():
    model = Dense()
    seg = torch.randint(0, K, (2, 4, 5))
    seg[0, 0, 0] = -100
    batch = {"image": torch.randn(2, 2, 4, 5), "seg": seg}
    d = Distiller(model, None, [Term("ce")], task="segmentation").build(batch)
    out = d(batch)
    raw = model(batch["image"])
    assert out.logits.shape == (2, 4, 5, K)
    assert torch.allclose(out.logits, raw.movedim(1, -1))
    ok = seg != -100
    ref = nn.functional.cross_entropy(raw, seg, ignore_index=-100)
    assert torch.allclose(out.losses["ce"], ref, atol=1e-6)
    assert ok.sum() == 39
    # an explicit class_dim overrides the task's
    d2 = Distiller(Dense(), None, [Term("ce")], task="segmentation", io={"class_dim": 1})
    assert d2.io.class_dim == 1 and d2.io.inputs == ["image"]


class HFLike(Core):
    """Takes the HF flags the distiller passes when a tap selects hidden states."""

    def forward(self, x, output_hidden_states=False):
        self.flag = output_hidden_states
        return self.wrap(x)


def test_output_tap_hidden_states():
    model = HFLike("hf_seq")
    teacher = HFLike("hf_seq")
    with torch.no_grad():
        teacher.feat.weight.add_(0.5)
    batch = _batch()
    d = Distiller(
        model,
        teacher,
        [Term("mse", student="output.hidden_states[-1]", teacher="output.hidden_states[0]")],
    ).build(batch)
    out = d(batch)
    assert model.flag and teacher.flag
    h_s, h_t = model.feat(batch["x"]), teacher.feat(batch["x"])
    ref = ((h_s - h_t) ** 2).mean()
    assert ref > 0.01 and torch.allclose(out.losses["mse"], ref, atol=1e-6)


def test_describe_structure():
    z = torch.zeros(2, 3)
    assert describe(z) == "tensor (2, 3)"
    assert "[0] tensor (2, 3)" in describe((z, z))
    assert "'a': tensor (2, 3)" in describe({"a": z})
    assert describe(SequenceClassifierOutput(logits=z)).startswith("SequenceClassifierOutput")
    assert select({"a": (z, {"b": z})}, "a.1.b", "f") is z
    with pytest.raises(ConfigError):
        select({"a": z}, "b", "f")


def test_default_io_of_tasks():
    assert cd.Distiller(Positional("tensor"), None, [Term("ce")]).io.keys == ["x"]
    d = cd.Distiller(Keyword("tensor"), None, [Term("ce")], task="lm")
    assert d.io.inputs == {"input_ids": "input_ids"}
