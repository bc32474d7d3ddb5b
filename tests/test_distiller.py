import pytest
import torch
from safetensors.torch import load_file

import crossdistill as cd
from crossdistill import ConfigError, Distiller, Term


def _batch(n=4):
    g = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(n, 1, 8, 8, generator=g),
        "y": torch.arange(n) % 10,
        "idx": torch.arange(n),
    }


def test_terms_losses_total_and_frozen_teacher(tiny_cnn, tiny_vit):
    d = Distiller(
        tiny_vit,
        tiny_cnn,
        [
            Term("ce"),
            Term("kd", weight=0.5),
            Term("mse", student="blocks.1", teacher="stage3", projector="auto", weight=2.0),
        ],
    )
    out = d(_batch())
    assert set(out.losses) == {"ce", "kd", "mse"}
    expect = out.losses["ce"] + 0.5 * out.losses["kd"] + 2.0 * out.losses["mse"]
    assert torch.allclose(out.total, expect)
    out.total.backward()
    assert all(p.grad is None for p in d.teachers.parameters())
    assert not d.teachers["teacher"].training
    d.train()
    assert not d.teachers["teacher"].training and d.student.training
    assert type(d.projectors["mse"]).__name__ == "TokensToMap"


def test_duplicate_term_names_are_suffixed(tiny_cnn):
    d = Distiller(tiny_cnn, tiny_cnn, [Term("kd"), Term("kd", temperature=1.0)])
    assert [t.name for t in d.terms] == ["kd", "kd_2"]


def test_unknown_loss_param_is_an_error():
    with pytest.raises(ConfigError, match="temprature"):
        Term("kd", temprature=2.0)


def test_teacherless_term_needs_teacher(tiny_cnn):
    with pytest.raises(ConfigError, match="needs a teacher"):
        Distiller(tiny_cnn, None, [Term("kd")])


def test_projector_shapes_checked_at_build(tiny_cnn, tiny_vit):
    d = Distiller(
        tiny_vit, tiny_cnn, [Term("mse", student="head", teacher="stage3", projector="auto")]
    )
    with pytest.raises(ConfigError, match="no projector can bridge"):
        d.build(_batch())


def test_warmup_weight(tiny_cnn):
    t = Term("dkd", warmup=10, weight=2.0)
    assert t.weight_at(0) == 0 and t.weight_at(5) == 1.0 and t.weight_at(20) == 2.0


def test_export_is_clean_and_keys_match(tmp_path, tiny_cnn, tiny_vit):
    d = Distiller(
        tiny_vit,
        tiny_cnn,
        [Term("ce"), Term("mse", student="blocks.1", teacher="stage3", projector="auto")],
    )
    d(_batch())
    student = d.export(tmp_path / "s.safetensors")
    saved = load_file(tmp_path / "s.safetensors")
    assert set(saved) == set(tiny_vit.state_dict())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in student.modules())
    assert not any(k.startswith(("teachers", "projectors")) for k in saved)
    for k, v in tiny_vit.state_dict().items():
        assert torch.equal(saved[k], v)
    d(_batch())  # the distiller still works after export (its hooks were reinstalled)


def test_multi_teacher_selection(tiny_cnn):
    torch.manual_seed(3)
    t2 = cd.models.create("mlp", num_classes=10, in_channels=1, img_size=8)
    s = cd.models.create("mlp", num_classes=10, in_channels=1, img_size=8, hidden=(16,))
    with pytest.raises(ConfigError, match="teacher_model"):
        Distiller(s, {"a": tiny_cnn, "b": t2}, [Term("kd")])
    d = Distiller(
        s, {"a": tiny_cnn, "b": t2}, [Term("kd", teacher_model="a"), Term("kd", teacher_model="b")]
    )
    out = d(_batch())
    assert set(out.losses) == {"kd", "kd_2"}
