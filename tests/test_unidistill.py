"""UniDistill (losses/unidistill.py, methods/unidistill.py): keypoints and their sampling on a
known map (no half-pixel shift), hand values of the four terms, float64 gradchecks, errors,
the recipe's terms and adapters, and a tiny cross-view run of every variant."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_detection import FAST, fake_digits

import crossdistill.methods.unidistill as U
import crossdistill.models.detect  # noqa: F401  (registers centernet-tiny)
from crossdistill import Distiller, Trainer
from crossdistill.data import Dataset
from crossdistill.data.detection import degrade, detection_canvases
from crossdistill.errors import ConfigError
from crossdistill.losses.unidistill import (
    box_keypoints,
    gaussian_mask,
    keypoint_relations,
    sample_points,
    unidistill_feature,
    unidistill_heatmap,
    unidistill_regression,
    unidistill_relation,
)
from crossdistill.methods import build
from crossdistill.models import create


def ramp(h: int, w: int, dtype=torch.float32) -> torch.Tensor:
    """(1, 2, h, w): channel 0 = the cell's x, channel 1 = its y."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=dtype), torch.arange(w, dtype=dtype),
                            indexing="ij")
    return torch.stack([xs, ys])[None]


def boxes_batch(boxes, labels, hw=(8, 8), key="image"):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32),
            "box_labels": torch.tensor(labels), key: torch.zeros(len(boxes), 1, *hw)}


# -- keypoints and sampling -------------------------------------------------------------------
def test_box_keypoints_golden():
    pts = box_keypoints(torch.tensor([[2.0, 4.0, 10.0, 8.0]]), stride=(4.0, 2.0))  # (sy, sx)
    x = [1, 5, 5, 1, 3, 3, 5, 3, 1]  # x1 = 1, x2 = 5, cx = 3 (cells of 2 px)
    y = [1, 1, 2, 2, 1.5, 1, 1.5, 2, 1.5]  # y1 = 1, y2 = 2 (cells of 4 px)
    assert pts.shape == (1, 9, 2)
    assert torch.equal(pts[0], torch.tensor([x, y], dtype=torch.float32).T)


def test_sampling_reads_the_cell_coordinate_exactly():
    """A bilinear sample of a linear ramp is the point's own coordinate: no half-pixel
    shift. The official normalisation ((x - w/2) / (w/2), align_corners=False) reads
    x - 1/2 instead."""
    h, w = 5, 7
    m = ramp(h, w)
    pts = torch.tensor([[[[0.0, 0.0], [2.25, 1.5], [6.0, 4.0], [3.7, 0.9]]]])  # (1, 1, 4, 2)
    got = sample_points(m, pts)[0, 0]
    assert torch.allclose(got, pts[0, 0], atol=1e-6)
    official = torch.stack([(pts[..., 0] - w / 2) / (w / 2),
                            (pts[..., 1] - h / 2) / (h / 2)], -1)
    shifted = F.grid_sample(m, official, align_corners=False, padding_mode="border")
    shifted = shifted.permute(0, 2, 3, 1)[0, 0]
    inner = torch.tensor([False, True, True, True])  # away from the clamped border
    assert torch.allclose(shifted[inner], pts[0, 0][inner] - 0.5, atol=1e-6)
    # past the last cell: the border cell (a box touching the right / bottom edge)
    edge = sample_points(m, torch.tensor([[[[7.0, 5.0]]]]))[0, 0, 0]
    assert torch.allclose(edge, torch.tensor([6.0, 4.0]))


# -- feature and relation terms ---------------------------------------------------------------
def test_feature_golden():
    # 8x8 image, 4x4 maps (stride 2). Teacher channel 0 = x ramp, channel 1 = 0; student 0.
    t = torch.zeros(2, 2, 4, 4)
    t[:, 0] = ramp(4, 4)[0, 0]
    s = torch.zeros_like(t)
    batch = boxes_batch([[[0, 0, 4, 4], [2, 2, 6, 6], [0, 0, 0, 0]],
                         [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]],
                        [[3, 1, -1], [-1, -1, -1]])
    # box 1: x in cells {0, 1, 2}, mean over its 9 points 1 -> mean over 2 channels 0.5;
    # box 2: x in {1, 2, 3}, mean 2 -> 1.0; the padding rows and the empty image are skipped
    assert float(unidistill_feature(s, t, batch=batch)) == pytest.approx((0.5 + 1.0) / 2)
    # each box counts once whatever its size: a duplicate of box 2 moves the mean to it
    batch["boxes"][1, 0] = torch.tensor([2.0, 2, 6, 6])
    batch["box_labels"][1, 0] = 0
    assert float(unidistill_feature(s, t, batch=batch)) == pytest.approx((0.5 + 2.0) / 3)
    # no boxes at all: 0, with a gradient path
    none = boxes_batch([[[0, 0, 0, 0]]] * 2, [[-1], [-1]])
    z = unidistill_feature(s.requires_grad_(), t, batch=none)
    assert float(z.detach()) == 0.0 and z.requires_grad


def test_relation_golden_widths_may_differ():
    # box [0, 0, 4, 4] at stride 2: keypoints on cells x, y in {0, 1, 2}, all integer.
    s = torch.zeros(1, 2, 4, 4)
    s[:, 1] = 1.0
    s[:, :, :, 0] = torch.tensor([1.0, 0.0])[:, None]  # column 0: (1, 0); elsewhere (0, 1)
    t = torch.ones(1, 3, 4, 4)  # every cosine 1
    batch = boxes_batch([[[0, 0, 4, 4]]], [[5]])
    # 3 keypoints on column 0 (two corners + the left midpoint), 6 elsewhere: the student's
    # cosines are 0 across the groups (2 * 3 * 6 = 36 of 81 entries), 1 within
    assert float(unidistill_relation(s, t, batch=batch)) == pytest.approx(36 / 81)
    assert float(unidistill_relation(t, t, batch=batch)) == pytest.approx(0.0, abs=1e-6)
    f = torch.tensor([[[3.0, 4.0], [4.0, 3.0]]])
    assert torch.allclose(keypoint_relations(f), torch.tensor([[[1.0, 0.96], [0.96, 1.0]]]))


def test_feature_and_relation_gradcheck():
    torch.manual_seed(0)
    batch = boxes_batch([[[1, 1, 7, 5], [0, 2, 3, 8]], [[2, 0, 8, 8], [0, 0, 0, 0]]],
                        [[1, 2], [0, -1]])
    batch["boxes"] = batch["boxes"].double()
    t = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: unidistill_feature(z, t, batch=batch), (x,))
    y = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: unidistill_relation(z, t, batch=batch), (y,))


# -- response terms ----------------------------------------------------------------------------
def _mask_case():
    """Box [0, 0, 16, 16] in a 16x16 image, 4x4 grid (stride 4): 4x4 cells, CenterNet radius
    floor(1.09) = 1 (gaussian_radius's third case), sigma = 0.5, centre cell (2, 2): 1 there,
    e^-2 beside it, e^-4 on the diagonals, 0 further out."""
    want = torch.zeros(4, 4)
    want[1:4, 1:4] = math.exp(-4)
    want[2, 1:4] = want[1:4, 2] = math.exp(-2)
    want[2, 2] = 1.0
    return boxes_batch([[[0, 0, 16, 16]]], [[7]], hw=(16, 16)), want


def test_gaussian_mask_golden():
    batch, want = _mask_case()
    m = gaussian_mask(batch["boxes"], batch["box_labels"], (4, 4), 4.0)
    assert torch.allclose(m[0], want, atol=1e-6)


def test_heatmap_golden_same_activation_both_sides():
    batch, want = _mask_case()
    s = torch.zeros(1, 2, 4, 4)  # probability 0.5 everywhere
    t = torch.zeros(1, 2, 4, 4)
    t[0, 1, 2, 2] = math.log(3.0)  # sigmoid = 0.75 at the centre cell
    v = unidistill_heatmap(s, t, batch=batch)
    assert float(v) == pytest.approx(0.25 / float(want.sum()), rel=1e-5)
    # identical heatmaps score 0 (the official sigmoid(hm / 2) on one side only would not)
    assert float(unidistill_heatmap(t, t, batch=batch)) == 0.0
    # the max over classes: a second class below the first changes nothing
    t2 = t.clone()
    t2[0, 0, 2, 2] = 0.5
    assert float(unidistill_heatmap(s, t2, batch=batch)) == pytest.approx(float(v), rel=1e-5)


def test_regression_golden():
    batch, want = _mask_case()
    size_s, off_s = torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4)
    size_t, off_t = torch.full((1, 2, 4, 4), 2.0), torch.zeros(1, 2, 4, 4)
    # |diff| mean over the 4 channels = 1 everywhere -> the weighted mean is 1
    v = unidistill_regression([size_s, off_s], [size_t, off_t], batch=batch)
    assert float(v) == pytest.approx(1.0)
    off_t = torch.zeros(1, 2, 4, 4)
    off_t[0, 0, 2, 1] = 4.0  # one cell beside the centre (weight e^-2), 1 of 4 channels
    v = unidistill_regression([size_s, off_s], [size_s, off_t], batch=batch)
    assert float(v) == pytest.approx(math.exp(-2) * 1.0 / float(want.sum()), rel=1e-5)
    far = torch.zeros(1, 2, 4, 4)
    far[0, 0, 0, 0] = 9.0  # outside the Gaussian: no weight
    assert float(unidistill_regression([size_s, off_s], [size_s, far], batch=batch)) == 0.0


def test_response_gradcheck_and_empty_batch():
    torch.manual_seed(0)
    batch = boxes_batch([[[1, 1, 9, 7], [4, 8, 16, 16]], [[0, 0, 6, 6], [0, 0, 0, 0]]],
                        [[1, 2], [0, -1]], hw=(16, 16))
    batch["boxes"] = batch["boxes"].double()
    t = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: unidistill_heatmap(z, t, batch=batch), (x,))
    r_t = [torch.randn(2, 2, 4, 4, dtype=torch.float64) for _ in range(2)]
    a = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda p, q: unidistill_regression([p, q], r_t, batch=batch), (a, b))
    none = boxes_batch([[[0, 0, 0, 0]]], [[-1]], hw=(16, 16))
    assert float(unidistill_heatmap(x[:1].detach().float(), t[:1].float(), batch=none)) == 0.0


def test_loss_errors():
    batch = boxes_batch([[[0, 0, 4, 4]]], [[1]])
    s, t = torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4)
    with pytest.raises(ConfigError, match="projector"):
        unidistill_feature(s, t, batch=batch)
    with pytest.raises(ConfigError, match="a batch key"):
        unidistill_feature(s, s, batch={"boxes": batch["boxes"]})
    with pytest.raises(ConfigError, match="image"):
        unidistill_relation(s, t, batch=batch, image="image_blur")
    with pytest.raises(ConfigError, match="grid"):
        unidistill_relation(s, torch.zeros(1, 3, 2, 2), batch=batch)
    with pytest.raises(ConfigError, match="feature map"):
        unidistill_feature(torch.zeros(1, 4, 2), t, batch=batch)
    with pytest.raises(ConfigError, match="heatmap"):
        unidistill_heatmap(s, t, batch=batch)
    with pytest.raises(ConfigError, match="regression"):
        unidistill_regression([s], [t], batch=batch)


# -- the recipe ----------------------------------------------------------------------------------
def _pair(t_width=8, s_width=4):
    torch.manual_seed(0)
    return (create("centernet-tiny", img_size=32, width=s_width),
            create("centernet-tiny", img_size=32, width=t_width, in_channels=2))


def test_recipe_terms_and_paper_weights():
    s, t = _pair()
    r = build("unidistill", s, t)
    got = {x.name: (x.weight, [str(p) for p in x.student], [str(p) for p in x.teacher])
           for x in r.terms}
    assert got["centernet"][0] == 1.0 and got["centernet"][2] == []
    assert got["unidistill_feature"] == (100.0, ["stage2"], ["stage2"])
    assert got["unidistill_relation"] == (40.0, ["neck"], ["neck"])
    assert got["unidistill_heatmap"][0] == 10.0
    reg = ["output['size']", "output['offset']"]
    assert got["unidistill_regression"] == (10.0, reg, reg)
    feat = next(x for x in r.terms if x.name == "unidistill_feature")
    assert feat.projector == "auto"
    for variant, names in (("feature", {"unidistill_feature"}),
                           ("relation", {"unidistill_relation"}),
                           ("response", {"unidistill_heatmap", "unidistill_regression"})):
        terms = build("unidistill", s, t, variant=variant).terms
        assert {x.name for x in terms} == {"centernet", *names}
    r = build("unidistill", s, t, feature_tap="stage3", relation_weight=0.0, heatmap_weight=2)
    names = {x.name: x for x in r.terms}
    assert str(names["unidistill_feature"].student[0]) == "stage3"
    assert "unidistill_relation" not in names and names["unidistill_heatmap"].weight == 2.0


def test_recipe_errors():
    s, t = _pair()
    with pytest.raises(ConfigError, match="variant"):
        build("unidistill", s, t, variant="logits")
    with pytest.raises(ConfigError, match="teacher"):
        build("unidistill", s, None)
    with pytest.raises(ConfigError, match="feature_tap.*stage1"):
        build("unidistill", s, t, feature_tap="stage9")
    with pytest.raises(ConfigError, match="teacher_relation_tap"):
        build("unidistill", s, t, teacher_relation_tap="neck.9")
    with pytest.raises(ConfigError, match="relation_weight"):
        build("unidistill", s, t, relation_weight=-1)
    with pytest.raises(ConfigError, match="variant"):
        build("unidistill", s, t, variant="feature", feature_weight=0)
    with pytest.raises(ConfigError, match="unidistill.view"):
        U.distiller_kwargs("sonar")
    assert U.distiller_kwargs("noisy", "clean") == {"io": {"inputs": ["image_noisy"]},
                                                   "teacher_io": {"inputs": ["image"]}}


def views_data(n=16, size=32, seed=0):
    x, y = fake_digits()
    canvas, seg, boxes, labels = detection_canvases(x, y, n, size, 3, seed)
    t = {"image": canvas, "image_blur": degrade(canvas, "blur"),
         "image_distance": degrade(canvas, "distance"), "boxes": boxes, "box_labels": labels,
         "idx": torch.arange(n)}
    kinds = {k: "image" for k in ("image", "image_blur", "image_distance")}
    return Dataset(t, {**kinds, "boxes": "boxes", "box_labels": "label", "idx": "id"})


def test_same_model_same_view_scores_zero():
    torch.manual_seed(0)
    m = create("centernet-tiny", img_size=32, width=4, in_channels=2)
    twin = create("centernet-tiny", img_size=32, width=4, in_channels=2)
    twin.load_state_dict(m.state_dict())
    d = Distiller(m, twin, build("unidistill", m, twin).terms,
                  task={"name": "detection", "head": "centernet"},
                  **U.distiller_kwargs("distance", "distance"))
    batch = dict(views_data(8).tensors)
    d.build(batch)
    d.eval()
    out = d(batch)
    for k, v in out.losses.items():
        if k != "centernet":
            assert float(v.detach()) == pytest.approx(0.0, abs=1e-6), k


@pytest.mark.parametrize("variant", U.VARIANTS)
def test_end_to_end_cross_view(variant):
    """Teacher (2-channel distance view, width 8) -> student (blur view, width 4): the
    adapters feed each its own key; the low-level widths differ, so a conv1x1 bridges them."""
    train, val = views_data(16, 32, 0), views_data(8, 32, 1)
    s, t = _pair()
    recipe = build("unidistill", s, t, variant=variant)
    d = Distiller(s, t, recipe.terms, task={"name": "detection", "head": "centernet"},
                  **U.distiller_kwargs("blur"))
    res = Trainer(d, train, val, epochs=1, **FAST).fit()
    assert 0.0 <= res["best_val_map"] <= 1.0
    if variant in ("unidistill", "feature"):
        assert "unidistill_feature" in d.projectors
    assert not any(k.startswith(("teacher", "projectors")) for k in s.state_dict())


# -- the benchmark block -----------------------------------------------------------------------
def _block():
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    return importlib.import_module("dense_unidistill")


def test_block_interface():
    B = _block()
    assert B.BLOCK == "unidistill" and B.BASELINE == "det" and B.BASELINE in B.METHODS
    assert set(B.PROFILES) == {"full", "quick"}
    for claim in B.CLAIMS:
        assert all({a, b} <= set(B.METHODS) for a, b in claim["pairs"])
    for P in B.PROFILES.values():
        assert U.view_key(P["view"], "view") == f"image_{P['view']}"
        assert set(P["views"]) == {"distance", P["view"]}
        build("unidistill", *_pair(), **P["weights"])  # the weights are valid recipe values


@pytest.mark.slow
def test_block_quick_cells(tmp_path):
    B = _block()
    P = B.PROFILES["quick"]
    assert B.teachers(P, tmp_path)["distance_teacher"]["params"] > 0
    for m in ("det", "unidistill"):
        row = B.run(m, 0, P, tmp_path)
        assert 0.0 <= row["test_map"] <= 1.0 and len(row["val_curve"]) == P["epochs"]
