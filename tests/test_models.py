"""The model zoo contract: shapes, tap paths, errors, determinism and size."""

from __future__ import annotations

import pytest
import torch

from crossdistill.errors import ConfigError
from crossdistill.models import MODELS, create, names, tap_paths

ALL = names()
AUDIO = [n for n in ALL if MODELS.meta(n).get("family") == "audio"]
# dense (seg), two-input (fusion), sequence (seq2seq), two-domain (bida) and dual-encoder
# models have their own contracts, in test_canvas / test_av / test_libs / test_bida / test_dual;
# detectors (dict outputs) and EZAD's text-aligned crop encoder in test_detection / test_ezad
OTHER = [n for n in ALL if MODELS.meta(n).get("family") in ("seg", "fusion", "seq", "dual", "vlm",
                                                            "det")
         or n == "bida" or n.startswith(("pair-", "ezad-"))]  # pair-*: two halves (test_cprd)
IMAGE = [n for n in ALL if n not in AUDIO and n not in OTHER]
# Standard teacher-sized architectures; everything else must stay CPU-small.
LARGE = {"resnet32x4": 8_000_000, "vgg11": 10_000_000, "vgg": 4_000_000, "vgg8": 4_000_000,
         "dual-encoder": 5_000_000,  # 3.9 M of it: MiniLM's 30,522-token embedding table
         "cross-encoder": 5_000_000}  # the same table


def check_model(model, x, num_classes):
    out = model(x)
    assert out.shape == (x.shape[0], num_classes)
    modules = dict(model.named_modules())
    assert model.stages and all(s in modules for s in model.stages)
    assert model.feature_path in modules
    assert isinstance(model.family, str) and model.family
    out.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_zoo_is_registered():
    expected = {
        "mlp",
        "cnn",
        "resnet",
        "resnet8x4",
        "resnet20",
        "resnet32x4",
        "resnet56",
        "vgg",
        "vgg8",
        "vgg11",
        "vit",
        "mlp-mixer",
        "mixer",
        "convnet",
        "convnet3",
        "convnet4",
        "audio-cnn",
        "gru",
    }
    assert expected <= set(ALL)
    assert set(AUDIO) == {"audio-cnn", "gru", "audio-cnn2d"}


@pytest.mark.parametrize("name", IMAGE)
@pytest.mark.parametrize("in_channels,img_size", [(1, 28), (3, 32)])
def test_image_forward_backward(name, in_channels, img_size):
    torch.manual_seed(0)
    model = create(name, num_classes=7, in_channels=in_channels, img_size=img_size)
    check_model(model, torch.randn(2, in_channels, img_size, img_size), 7)


@pytest.mark.parametrize("name", ["cnn", "resnet", "vgg", "vit", "mlp-mixer", "convnet"])
def test_rectangular_and_crossed_sizes(name):
    model = create(name, num_classes=5, in_channels=3, img_size=(28, 32))
    check_model(model, torch.randn(2, 3, 28, 32), 5)
    model = create(name, num_classes=5, in_channels=1, img_size=32)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)


@pytest.mark.parametrize("name", AUDIO)
def test_audio_forward_backward(name):
    torch.manual_seed(0)
    model = create(name, num_classes=12, in_channels=1, img_size=(20, 32))
    check_model(model, torch.randn(2, 1, 20, 32), 12)


@pytest.mark.parametrize("name", AUDIO)
def test_audio_rejects_multichannel(name):
    with pytest.raises(ConfigError, match="in_channels"):
        create(name, in_channels=3)


def test_resnet_depth_error():
    with pytest.raises(ConfigError, match="depth") as e:
        create("resnet", depth=7)
    assert "6n+2" in str(e.value)


def test_unknown_kwarg_names_it_and_lists_accepted():
    with pytest.raises(ConfigError, match="bogus") as e:
        create("resnet", bogus=1)
    assert "depth" in str(e.value) and "width" in str(e.value)
    # variants have their fixed arguments removed
    with pytest.raises(ConfigError, match="depth"):
        create("resnet8x4", depth=20)


def test_field_prefix_and_unknown_name():
    with pytest.raises(ConfigError, match=r"student\.depth"):
        create("resnet", field="student", depth=9)
    with pytest.raises(ConfigError, match="resnet"):
        create("resnett")


@pytest.mark.parametrize("name", ["vit", "mlp-mixer"])
def test_patch_must_divide_img_size(name):
    with pytest.raises(ConfigError, match="img_size"):
        create(name, img_size=30, patch=4)
    with pytest.raises(ConfigError, match="img_size"):
        create(name, img_size=(32, 30))


def test_bad_img_size_and_convnet_depth():
    with pytest.raises(ConfigError, match="img_size"):
        create("cnn", img_size=(32, 32, 3))
    with pytest.raises(ConfigError, match="depth"):
        create("convnet", img_size=8, depth=4)
    with pytest.raises(ConfigError, match="norm"):
        create("convnet", norm="layernorm")


def test_vit_tokens_have_cls_first():
    model = create("vit", img_size=32, patch=4, dim=32, depth=2, heads=2)
    seen = {}
    model.blocks[1].register_forward_hook(lambda m, i, o: seen.setdefault("t", o))
    model(torch.randn(2, 3, 32, 32))
    assert seen["t"].shape == (2, 64 + 1, 32)
    assert model.stages[-1] == "blocks.1"


def test_convnet_embed_matches_classifier_input():
    model = create("convnet", img_size=32)
    x = torch.randn(2, 3, 32, 32)
    seen = {}
    model.classifier.register_forward_hook(lambda m, i, o: seen.setdefault("f", i[0]))
    model(x)
    assert torch.equal(model.embed(x), seen["f"])
    assert seen["f"].shape == (2, 128 * 4 * 4)
    assert isinstance(model.features[0].norm, torch.nn.GroupNorm)


def test_resnet_paths():
    model = create("resnet", depth=8)
    paths = tap_paths(model)
    assert "" not in paths
    assert {"conv1", "bn1", "layer1", "layer3.0.conv2", "layer3.0.shortcut", "pool", "fc"} <= set(
        paths
    )
    assert len(model.layer1) == 1 and len(create("resnet56").layer2) == 9


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_weights(name):
    torch.manual_seed(123)
    a = create(name).state_dict()
    torch.manual_seed(123)
    b = create(name).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ALL)
def test_default_param_count_is_small(name):
    n = sum(p.numel() for p in create(name).parameters())
    assert n < LARGE.get(name, 3_000_000), f"{name}: {n} parameters"
