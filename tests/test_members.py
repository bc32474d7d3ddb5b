"""Members: several models as one student, each reading its own batch keys."""

import math

import pytest
import torch
from av_helpers import tiny_av as _av

import crossdistill as cd
from crossdistill import Distiller, Term, Trainer
from crossdistill.errors import ConfigError
from crossdistill.methods.collaborative import BestMembers
from crossdistill.methods.members import Members


def _group(output="mean"):
    torch.manual_seed(0)
    image = cd.models.create("cnn", num_classes=4, in_channels=1, img_size=8, channels=(4, 8))
    audio = cd.models.create("audio-cnn", num_classes=4, img_size=(6, 10), channels=(8,))
    return Members({"image": image, "audio": audio},
                   reads={"image": "image", "audio": ["audio"]}, output=output)


def test_routes_each_key_to_its_member():
    g = _group()
    d = _av(6, 0)
    b = {k: d.tensors[k] for k in ("image", "audio")}
    z = g.logits(**b)
    assert torch.equal(z["image"], g["image"](b["image"]))
    assert torch.equal(z["audio"], g["audio"](b["audio"]))
    assert torch.allclose(g(**b), (z["image"] + z["audio"]) / 2)
    g.output = "audio"
    assert torch.equal(g(**b), z["audio"])
    assert g.io() == {"inputs": {"image": "image", "audio": "audio"}}
    assert g.member_io("audio") == {"inputs": ["audio"]}
    assert g.stages[0].startswith("image.") and g.stages[-1].startswith("audio.")


def test_errors_name_the_field():
    with pytest.raises(ConfigError, match="members.reads"):
        Members({"a": torch.nn.Linear(2, 2)}, reads={"b": "x"})
    with pytest.raises(ConfigError, match="members.output"):
        Members({"a": torch.nn.Linear(2, 2)}, output="c")
    with pytest.raises(ConfigError, match="identifiers"):
        Members({"a.b": torch.nn.Linear(2, 2)})
    g = _group()
    with pytest.raises(ConfigError, match="members.reads.audio"):
        g(image=torch.zeros(1, 1, 8, 8))
    with pytest.raises(ConfigError, match="by name"):
        g(torch.zeros(1, 1, 8, 8))


def test_cotraining_two_modalities_end_to_end():
    g = _group()
    terms = [
        Term("ce", student="image", name="ce_image"),
        Term("ce", student="audio", name="ce_audio"),
        Term("dml", student=["image", "audio"], teacher=None, weight=1.0),
    ]
    d = Distiller(g, None, terms, io=g.io())
    train, val = _av(64, 1), _av(32, 2)
    keep = BestMembers(g, val)
    res = Trainer(d, train, val, epochs=2, batch_size=16, lr=3e-3, optimizer="adamw",
                  progress=False, callbacks=[keep]).fit()
    assert all(math.isfinite(float(v)) for v in d.last_losses.values())
    assert 0.0 <= res["best_val_acc"] <= 1.0
    best = keep.restore()
    assert set(best) == {"image", "audio"}
    acc = cd.evaluate(g["audio"], val, io=g.member_io("audio"))["acc"]
    assert 0.0 <= acc <= 1.0
    assert set(d.export().state_dict()) == set(g.state_dict())
