"""segformer-tiny: shapes, any input size, taps (tokens vs maps), the fast bilinear resize,
bad arguments, a tiny fit on canvases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import crossdistill as cd
import crossdistill.models.segformer as SF
from crossdistill.data import Dataset
from crossdistill.data.canvas import make_canvases
from crossdistill.errors import ConfigError

TASK = {"name": "segmentation", "target": "seg"}


def _model(**kw):
    torch.manual_seed(0)
    return cd.models.create("segformer-tiny", **{"widths": (8, 16, 16, 32), **kw})


def test_shapes_and_stage_grids():
    m = _model()
    x = torch.randn(2, 1, 56, 56)
    assert m(x).shape == (2, 11, 56, 56)
    maps = m.features(x)  # MiT's strides 4, 2, 2, 2
    assert [tuple(f.shape) for f in maps] == [(2, 8, 14, 14), (2, 16, 7, 7), (2, 16, 4, 4),
                                              (2, 32, 2, 2)]
    fine = _model(strides=(2, 2, 2, 2))
    assert [f.shape[-1] for f in fine.features(x)] == [28, 14, 7, 4]
    assert fine(x).shape == (2, 11, 56, 56)
    assert m.stages == ["encoder.0", "encoder.1", "encoder.2", "encoder.3", "decoder"]
    assert m.embed_taps == [f"patch_embeds.{i}" for i in range(4)]
    assert m.feature_path == "head" and m.family == "seg"
    assert "segformer-tiny" in cd.models.names()


@pytest.mark.parametrize("hw", [(37, 23), (8, 8), (1, 5), (64, 48)])
def test_any_input_size(hw):
    m = _model()
    assert m(torch.randn(1, 1, *hw)).shape == (1, 11, *hw)
    three = _model(widths=(8, 16, 24), heads=(1, 2, 3), sr_ratios=4, strides=(4, 2, 2),
                   in_channels=2, num_classes=3, depths=(1, 2, 1))
    assert three(torch.randn(2, 2, *hw)).shape == (2, 3, *hw)


def test_taps_tokens_and_maps():
    """patch_embeds.<i> fire tokens (B, N_i, C_i) (LayerNorm-ed), encoder.<i> maps
    (B, C_i, h_i, w_i) with N_i = h_i w_i; the Distiller resolves them."""
    m = _model()
    got = {}
    hooks = [m.get_submodule(p).register_forward_hook(
        lambda mod, i, o, p=p: got.__setitem__(p, o)) for p in [*m.embed_taps, *m.stages]]
    m(torch.randn(2, 1, 56, 56))
    for h in hooks:
        h.remove()
    for i, (c, side) in enumerate(zip((8, 16, 16, 32), (14, 7, 4, 2))):
        tok, fmap = got[f"patch_embeds.{i}"], got[f"encoder.{i}"]
        assert tok.shape == (2, side * side, c) and fmap.shape == (2, c, side, side)
        assert torch.allclose(tok.mean(-1), torch.zeros(()), atol=1e-5)  # LayerNorm output
    assert got["decoder"].shape == (2, 64, 14, 14)
    t = _model(widths=(16, 32, 32, 64))
    d = cd.Distiller(m, t, [
        cd.Term("mse", student="patch_embeds.1", teacher="patch_embeds.1", projector="linear"),
        cd.Term("mse", student="encoder.2", teacher="encoder.2", projector="conv1x1",
                name="maps"),
    ], task=TASK)
    d.build({"image": torch.randn(2, 1, 56, 56), "seg": torch.zeros(2, 56, 56, dtype=torch.long)})
    with pytest.raises(ConfigError, match="encoder.7"):
        cd.Distiller(m, t, [cd.Term("mse", student="encoder.7", teacher="encoder.1")], task=TASK)


def test_resize_bilinear_matches_interpolate():
    g = torch.Generator().manual_seed(0)
    for shape, size in [((2, 3, 7, 5), (14, 13)), ((1, 2, 14, 14), (56, 56)),
                        ((1, 1, 9, 6), (4, 3)), ((1, 1, 1, 1), (3, 2))]:
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        ref = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        assert torch.allclose(SF.resize_bilinear(x, size), ref, atol=1e-12)
    x = torch.randn(1, 1, 3, 3)
    assert SF.resize_bilinear(x, (3, 3)) is x


def test_efficient_attention_reduction_pads_to_any_size():
    attn = SF.EfficientAttention(8, 2, sr=4)
    for hw in [(5, 3), (8, 8), (1, 1)]:
        x = torch.randn(2, hw[0] * hw[1], 8)
        assert attn(x, hw).shape == x.shape


def test_bad_arguments():
    with pytest.raises(ConfigError, match="model.heads"):
        cd.models.create("segformer-tiny", widths=(8, 16), heads=(3, 1))
    with pytest.raises(ConfigError, match="model.depths"):
        cd.models.create("segformer-tiny", widths=(8, 16), depths=(1, 1, 1))
    with pytest.raises(ConfigError, match="model.widths"):
        cd.models.create("segformer-tiny", widths=())
    with pytest.raises(ConfigError, match="model.strides"):
        cd.models.create("segformer-tiny", widths=(8, 16), strides=(2, 0))
    with pytest.raises(ConfigError, match="model.mlp_ratio"):
        cd.models.create("segformer-tiny", mlp_ratio=0.0)
    with pytest.raises(ConfigError, match="model.decoder_dim"):
        cd.models.create("segformer-tiny", decoder_dim=0)
    with pytest.raises(ConfigError, match="model.patch"):
        cd.models.create("segformer-tiny", patch=4)


def canvases(n=16, size=32):
    k = 20
    y = torch.arange(k) % 10
    x = torch.zeros(k, 1, 8, 6)
    x[:, :, 1:-1, 1:-1] = (0.55 + 0.045 * y).view(k, 1, 1, 1)
    img, seg = make_canvases(x, y, n, size=size, max_digits=2, seed=0)
    return Dataset({"image": img, "seg": seg}, {"image": "image", "seg": "label_map"},
                   num_classes=11)


def test_tiny_fit_on_canvases(one_thread):
    data = canvases()
    m = _model(decoder_dim=16)
    trainer = cd.Trainer(cd.Distiller(m, None, [cd.Term("ce")], task=TASK, seed=0), data, data,
                         epochs=6, seed=0, batch_size=4, lr=1e-2, optimizer="adamw",
                         progress=False)
    res = trainer.fit()
    rows = trainer.log.rows
    assert rows[0]["train_loss"] < 1.05 * math.log(11)  # the small head init: near uniform
    assert rows[-1]["train_loss"] < 0.6 * rows[0]["train_loss"]
    assert math.isfinite(res["best_val_miou"]) and 0 <= res["best_val_miou"] <= 1
