"""ESP-MedSAM small form: stage 1 regresses the teacher encoder (MSE, unlabelled, no decoder),
stage 2 trains the decoder on labels; hand values, gradcheck, errors, a tiny two-stage fit."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import crossdistill as cd
import crossdistill.methods.esp_medsam  # noqa: F401  (registers esp_medsam)
from crossdistill.data import Dataset
from crossdistill.data.canvas import make_canvases
from crossdistill.errors import ConfigError
from crossdistill.losses import mse
from crossdistill.methods import METHODS, build
from crossdistill.methods.esp_medsam import (
    ENCODER,
    TASK,
    pipeline,
    release,
    set_trainable,
    unlabelled,
)

FAST = dict(batch_size=8, optimizer="adamw", progress=False)


def _models(seed=0):
    torch.manual_seed(seed)
    t = cd.models.create("seg-cnn", num_classes=11, img_size=32, width=8)
    s = cd.models.create("seg-cnn", num_classes=11, img_size=32, width=4)
    return t, s


def _canvases(n=16, size=32, seed=0):
    k = 20
    y = torch.arange(k) % 10
    x = torch.zeros(k, 1, 8, 6)
    x[:, :, 1:-1, 1:-1] = (0.55 + 0.045 * y).view(k, 1, 1, 1)
    img, seg = make_canvases(x, y, n, size=size, max_digits=2, seed=seed)
    return Dataset({"image": img, "seg": seg}, {"image": "image", "seg": "label_map"},
                   num_classes=11)


def _trains(model):
    return {n for n, m in model.named_children() if any(p.requires_grad for p in m.parameters())}


def test_stages_set_what_trains_and_release_restores():
    t, s = _models()
    r1 = build("esp_medsam", s, t, stage="encoder")
    assert [x.loss for x in r1.terms] == ["mse"] and r1.terms[0].projector == "conv1x1"
    assert _trains(s) == set(ENCODER)  # no CE, decoder frozen
    r2 = build("esp_medsam", s, None, stage="decoder")
    assert [x.loss for x in r2.terms] == ["ce"]
    assert _trains(s) == {"dec1", "dec2", "head"}
    assert all(bn.momentum == 0.0 for bn in s.enc1.modules()
               if isinstance(bn, torch.nn.BatchNorm2d))  # frozen encoder: BN stats too
    assert all(bn.momentum == 0.1 for bn in s.dec1.modules()
               if isinstance(bn, torch.nn.BatchNorm2d))
    build("esp_medsam", s, None, stage="decoder", train_encoder=True)
    assert _trains(s) == {"enc1", "enc2", "enc3", "dec1", "dec2", "head"}
    set_trainable(s, "decoder")
    release(s)
    assert all(p.requires_grad for p in s.parameters())
    assert all(bn.momentum == 0.1 for bn in s.modules() if isinstance(bn, torch.nn.BatchNorm2d))


def test_unlabelled_voids_every_label():
    data = _canvases(4)
    u = unlabelled(data)
    assert torch.equal(u["image"], data["image"]) and (u["seg"] == -100).all()
    assert (data["seg"] != -100).all()  # the original is untouched
    with pytest.raises(ConfigError, match="esp_medsam.data"):
        unlabelled(data, key="labels")


def test_stage1_term_hand_value():
    """encoder_mse = mean((phi(enc3_s) - enc3_t)^2); with phi's conv zeroed and BN at its
    initial statistics (eval), phi(.) = beta = 0, so the term is mean(enc3_t^2)."""
    t, s = _models()
    recipe = build("esp_medsam", s, t, stage="encoder")
    d = cd.Distiller(s, t, recipe.terms, task=TASK).eval()
    batch = _canvases(4).batch(torch.arange(4))
    d.build(batch)
    feats = {}
    hooks = [m.enc3.register_forward_hook(lambda _m, _i, o, k=k: feats.__setitem__(k, o))
             for k, m in (("s", s), ("t", t))]
    with torch.no_grad():
        value = d(batch).losses["encoder_mse"]
        proj = d.projectors["encoder_mse"]
        assert float(value) == pytest.approx(float(F.mse_loss(proj(feats["s"]), feats["t"])))
        proj.proj[0].weight.zero_()
        value = d(batch).losses["encoder_mse"]
    for h in hooks:
        h.remove()
    assert feats["t"].shape[1] == 32 and feats["s"].shape[1] == 16  # 4 x width
    assert float(value) == pytest.approx(float(feats["t"].pow(2).mean()), rel=1e-5)


def test_stage1_gradcheck_float64():
    from crossdistill.projectors import Conv1x1

    torch.manual_seed(0)
    proj = Conv1x1((3, 2, 2), (5, 2, 2)).double().eval()
    a = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 5, 2, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: mse(proj(x), target), (a,))


def test_recipe_errors():
    t, s = _models()
    with pytest.raises(ConfigError, match="esp_medsam.stage"):
        build("esp_medsam", s, t, stage="both")
    with pytest.raises(ConfigError, match="method.teacher"):
        build("esp_medsam", s, None, stage="encoder")
    with pytest.raises(ConfigError, match="esp_medsam.tap"):
        build("esp_medsam", s, t, tap="dec1")  # the decoder is not distilled
    with pytest.raises(ConfigError, match="esp_medsam.teacher_tap"):
        build("esp_medsam", s, t, teacher_tap="enc7")
    with pytest.raises(ConfigError, match="esp_medsam.feature_weight"):
        build("esp_medsam", s, t, feature_weight=0.0)
    with pytest.raises(ConfigError, match="esp_medsam.encoder"):
        build("esp_medsam", s, t, encoder=["backbone"])
    with pytest.raises(ConfigError, match="esp_medsam.train_encoder"):
        build("esp_medsam", s, None, stage="decoder", train_encoder="yes")
    with pytest.raises(ConfigError, match="method.epochs"):
        build("esp_medsam", s, t, epochs=3)
    assert "ESP-MedSAM" in METHODS.meta("esp_medsam")["paper"]


def test_two_stage_fit_is_decoupled_and_exports_clean(one_thread):
    data = _canvases(16)
    t, s = _models()
    fresh = {k: v.clone() for k, v in s.state_dict().items()}
    out = pipeline(s, t, unlabelled(data), data, data, data, encoder_epochs=4,
                   decoder_epochs=3, encoder_lr=3e-3, decoder_lr=3e-3, seed=0, **FAST)
    enc_rows = out["encoder"]
    assert "mse enc3" in enc_rows["note"] and math.isfinite(out["decoder"]["test_miou"])
    assert out["student"] is s and all(p.requires_grad for p in s.parameters())
    after = s.state_dict()
    moved = {k for k in fresh if not torch.equal(fresh[k], after[k])}
    assert any(k.startswith("enc3.") for k in moved) and any(k.startswith("dec1.") for k in moved)
    assert set(after) == set(fresh)  # no projector or teacher left in the student


def test_stage1_reads_no_labels_and_leaves_the_decoder(one_thread):
    data = unlabelled(_canvases(16))
    t, s = _models(seed=1)
    recipe = build("esp_medsam", s, t, stage="encoder")
    dec = {k: v.clone() for k, v in s.state_dict().items()
           if k.startswith(("dec", "head")) and "running" not in k and "num_batches" not in k}
    d = cd.Distiller(s, t, recipe.terms, task=TASK, seed=0)
    trainer = cd.Trainer(d, data, None, epochs=4, lr=3e-3, seed=0, **FAST)
    trainer.fit()
    rows = trainer.log.rows
    assert rows[-1]["loss_encoder_mse"] < rows[0]["loss_encoder_mse"]
    now = s.state_dict()
    assert all(torch.equal(v, now[k]) for k, v in dec.items())
    exported = d.export()
    assert set(exported.state_dict()) == set(s.state_dict())
    assert not any(m._forward_hooks for m in exported.modules())
    release(s)


def test_stage2_frozen_encoder_stays_frozen(one_thread):
    data = _canvases(16)
    t, s = _models(seed=2)
    recipe = build("esp_medsam", s, None, stage="decoder")
    enc = {k: v.clone() for k, v in s.state_dict().items() if k.startswith(ENCODER)}
    d = cd.Distiller(s, None, recipe.terms, task=TASK, seed=0)
    res = cd.Trainer(d, data, data, epochs=2, lr=3e-3, seed=0, **FAST).fit()
    now = s.state_dict()
    # weights and BN running statistics of the encoder unchanged
    assert all(torch.equal(v, now[k]) for k, v in enc.items() if "num_batches" not in k)
    assert math.isfinite(res["best_val_miou"])
    release(s)
