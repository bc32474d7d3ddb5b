"""Digit images with captions from templates and attributes measured on each image."""

import numpy as np
import pytest
import torch

import crossdistill as cd
from crossdistill.data.captions import (
    NAMES,
    TEMPLATES,
    caption_pairs,
    class_captions,
    cut_points,
    measure,
    words,
)
from crossdistill.errors import ConfigError


def _bar(width: int, shear: int = 0, size: int = 12, dx: int = 0) -> torch.Tensor:
    """A vertical bar ``width`` pixels wide in a 28 x 28 frame; ``shear``: columns the top
    moves right of the bottom."""
    x = torch.zeros(28, 28)
    top = 14 - size // 2
    for r in range(size):
        c = 14 + dx + round(shear * (size - 1 - r) / max(size - 1, 1)) - width // 2
        x[top + r, c:c + width] = 1.0
    return x


def test_measure_golden_values():
    a = measure(torch.stack([_bar(2), _bar(6), _bar(2, shear=6), _bar(2, dx=8)]))
    # a 2 x 12 bar: area 24, every pixel on the border: thickness 2 * 24 / 24 = 2
    assert a["thickness"][0] == pytest.approx(2.0)
    # a 6 x 12 bar: area 72, interior 4 x 10 = 40, border 32: thickness 2 * 72 / 32 = 4.5
    assert a["thickness"][1] == pytest.approx(4.5)
    assert a["size"][0] == pytest.approx(24 / 784)
    assert a["slant"][0] == pytest.approx(0.0, abs=1e-6)
    assert a["slant"][2] > 0.3  # the top leans right
    assert a["position_x"][3] > a["position_x"][0] + 0.2  # moved 8 pixels right
    assert a["position_y"][0] == pytest.approx((13.5 - 13.5) / 28, abs=0.02)


def test_words_follow_the_train_cut_points():
    train = {"thickness": np.array([1.0, 2, 3, 4, 5, 6]), "size": np.array([1.0, 2, 3, 4, 5, 6]),
             "slant": np.linspace(-1, 1, 6), "position_x": np.zeros(6),
             "position_y": np.zeros(6)}
    cuts = cut_points(train)
    probe = {"thickness": np.array([0.5, 9.0]), "size": np.array([9.0, 0.5]),
             "slant": np.array([-2.0, 2.0]), "position_x": np.array([0.0, 0.3]),
             "position_y": np.array([0.0, -0.3])}
    w = words(probe, cuts)
    assert w[0] == {"thickness": "thin", "size": "large", "slant": "leaning left",
                    "position": "in the centre"}
    assert w[1]["thickness"] == "thick" and w[1]["slant"] == "leaning right"
    assert w[1]["position"] == "to the right and high in the frame"


def test_caption_pairs_seeded_and_from_the_image():
    data, texts, ws, _ = caption_pairs("val", images="digits", captions=3)
    assert len(texts) == len(data) and all(len(t) == 3 == len(set(t)) for t in texts)
    for t, w, y in zip(texts[:50], ws, data.y.tolist()):
        assert all(NAMES[y] in c for c in t)  # every caption names the digit
        for c in t:  # attribute phrases come from this image's own words
            if "stroke" in c:
                assert w["thickness"] in c
    again = caption_pairs("val", images="digits", captions=3)[1]
    other = caption_pairs("val", images="digits", captions=3, seed=1)[1]
    assert again == texts and other != texts
    with pytest.raises(ConfigError, match="data.captions"):
        caption_pairs("val", images="digits", captions=len(TEMPLATES) + 1)
    with pytest.raises(ConfigError, match="data.images"):
        caption_pairs("val", images="cifar")


def test_zero_shot_splits():
    tr, _, _, _ = caption_pairs("train", images="digits", zero_shot=True)
    te, _, _, _ = caption_pairs("test", images="digits", zero_shot=True)
    assert set(tr.y.tolist()) == set(range(5)) and set(te.y.tolist()) == set(range(5, 10))
    assert class_captions(range(5, 7)) == ["a handwritten five", "a handwritten six"]


def test_zero_shot_needs_images_of_every_class():
    with pytest.raises(ConfigError, match="data.zero_shot"):
        caption_pairs("test", images="digits", zero_shot=True, limit=3)


def test_source_tokenizes_captions(tmp_path):
    d = cd.data.load_split("digit_captions", "val", images="digits", tokenizer="char",
                           max_tokens=40, cache_dir=str(tmp_path))
    assert d["caption_ids"].shape == (len(d), 3, 40) and d["x"].shape[1:] == (1, 8, 8)
    assert d.kinds["caption_ids"] == "tokens" and d["thickness"].shape == (len(d),)
    assert abs(float(d["x"].mean())) < 0.2  # standardised with the train split's statistics
    assert len(d.texts) == len(d) and len(d.words) == len(d)
