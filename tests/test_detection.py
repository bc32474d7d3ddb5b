"""Detection foundation: box maths, CenterNet / DETR losses and decoders, COCO mAP through
pycocotools, detection canvases and their views, the two detectors end to end, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import crossdistill.losses.detection  # noqa: F401  (registers centernet, set_loss)
import crossdistill.models.detect  # noqa: F401  (registers centernet-tiny, detr-tiny)
import crossdistill.tasks.detection  # noqa: F401  (registers detection)
from crossdistill import Distiller, Trainer
from crossdistill import tasks as T
from crossdistill.boxes import (
    centernet_targets,
    decode_centernet,
    decode_set,
    gaussian_radius,
    hungarian_match,
    pairwise_giou,
    pairwise_iou,
    xyxy_to_cxcywh,
)
from crossdistill.data import Dataset
from crossdistill.data.detection import (
    check_boxes,
    coco_records,
    degrade,
    detection_canvases,
    separated_plan,
)
from crossdistill.errors import ConfigError
from crossdistill.losses.detection import centernet, focal_heatmap, set_loss
from crossdistill.models import create
from crossdistill.tasks.detection import coco_map

FAST = dict(batch_size=8, lr=3e-3, optimizer="adamw", progress=False)


def fake_digits(n=20, h=8, w=6):
    y = torch.arange(n) % 10
    x = torch.zeros(n, 1, h, w)
    x[:, :, 1:-1, 1:-1] = (0.55 + 0.045 * y).view(n, 1, 1, 1)
    return x, y


def tiny_data(n=16, size=32, seed=0):
    x, y = fake_digits()
    canvas, seg, boxes, labels = detection_canvases(x, y, n, size, 3, seed)
    return Dataset(
        {"image": canvas, "seg": seg, "boxes": boxes, "box_labels": labels,
         "idx": torch.arange(n)},
        {"image": "image", "seg": "label_map", "boxes": "boxes", "box_labels": "label",
         "idx": "id"},
    )


# -- geometry ---------------------------------------------------------------------------------
def test_iou_giou_golden():
    a, b = torch.tensor([[0.0, 0, 2, 2]]), torch.tensor([[1.0, 1, 3, 3], [0, 0, 2, 2]])
    iou, _ = pairwise_iou(a, b)
    assert torch.allclose(iou, torch.tensor([[1 / 7, 1.0]]))
    giou = pairwise_giou(a, b)  # hull 3x3 = 9, union 7: 1/7 - 2/9
    assert torch.allclose(giou, torch.tensor([[1 / 7 - 2 / 9, 1.0]]))


def test_gaussian_radius_golden():
    # h = w = 10, overlap 0.7, by hand: r1 = (20 + sqrt(400 - 120/1.7)) / 2 = 19.07,
    # r2 = (40 + sqrt(1120)) / 2 = 36.73, r3 = (-28 + sqrt(1120)) / 2 = 2.733 (CenterNet's
    # code divides every case by 2, not 2a; we keep its radii, which its heatmaps were tuned on)
    r = gaussian_radius(torch.tensor(10.0), torch.tensor(10.0))
    assert abs(float(r) - (-28 + 1120**0.5) / 2) < 1e-5


def test_centernet_targets_and_decode_round_trip():
    boxes = torch.tensor([[[4.0, 8, 12, 20], [20, 2, 30, 14], [0, 0, 0, 0]]])
    labels = torch.tensor([[3, 7, -1]])
    tg = centernet_targets(boxes, labels, 10, (8, 8), 4.0)
    heat = tg["heatmap"]
    assert heat.shape == (1, 10, 8, 8) and heat.max() == 1
    assert heat[0, 3, 3, 2] == 1 and heat[0, 7, 2, 6] == 1  # centre cells (y, x)
    assert (heat[0, [0, 1, 2, 4, 5, 6, 8, 9]] == 0).all()
    # a perfect head: peaks where the targets are 1, size/offset maps holding the targets
    logits = torch.where(heat == 1, 10.0, -10.0)
    size, offset = torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 8)
    for j in range(2):
        cx, cy = tg["cell"][0, j]
        size[0, :, cy, cx], offset[0, :, cy, cx] = tg["size"][0, j], tg["offset"][0, j]
    dets = decode_centernet(logits, size, offset, 4.0, max_dets=2)
    got = sorted((int(d[5]), [round(float(v), 4) for v in d[:4]]) for d in dets[0])
    assert got == [(3, [4.0, 8.0, 12.0, 20.0]), (7, [20.0, 2.0, 30.0, 14.0])]


def test_focal_heatmap_golden_and_gradcheck():
    logits = torch.tensor([[[[0.0, 1.0]]]], dtype=torch.float64)
    target = torch.tensor([[[[1.0, 0.5]]]], dtype=torch.float64)
    p0, p1 = 0.5, 1 / (1 + torch.e**-1)
    hand = -((1 - p0) ** 2 * torch.log(torch.tensor(p0)) + (1 - 0.5) ** 4 * p1**2 *
             torch.log(torch.tensor(1 - p1)))
    assert torch.allclose(focal_heatmap(logits, target).double(), hand.double(), atol=1e-6)
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    tg = torch.rand(1, 2, 3, 3, dtype=torch.float64)
    tg[0, 0, 1, 1] = 1

    def f(z):
        p = z.sigmoid()
        pos = tg >= 1
        return -torch.where(pos, (1 - p) ** 2 * F.logsigmoid(z),
                            (1 - tg) ** 4 * p**2 * F.logsigmoid(-z)).sum()

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.allclose(focal_heatmap(x, tg).double(), f(x))


def test_hungarian_match_finds_the_permutation():
    gt = torch.tensor([[[0.0, 0, 10, 10], [20, 20, 30, 30]]])
    lab = torch.tensor([[1, 2]])
    pred = xyxy_to_cxcywh(torch.tensor([[[20.0, 20, 30, 30], [5, 5, 6, 6], [0, 0, 10, 10]]]) / 40)
    logits = torch.zeros(1, 3, 4)
    m = hungarian_match(logits, pred, gt, lab, (40, 40))
    q, j = m[0]
    assert dict(zip(q.tolist(), j.tolist())) == {0: 1, 2: 0}


def test_set_loss_golden_perfect_prediction():
    gt = torch.tensor([[[0.0, 0, 10, 10], [20, 20, 30, 30]]])
    lab = torch.tensor([[1, 2]])
    pred = xyxy_to_cxcywh(torch.tensor([[[20.0, 20, 30, 30], [0, 0, 10, 10], [5, 5, 6, 6]]]) / 40)
    logits = torch.full((1, 3, 4), -20.0)
    logits[0, 0, 2], logits[0, 1, 1], logits[0, 2, 3] = 20.0, 20.0, 20.0  # 3 = no object
    batch = {"boxes": gt, "box_labels": lab, "image": torch.zeros(1, 1, 40, 40)}
    v = set_loss([logits, pred], batch=batch)
    assert float(v) < 1e-6  # CE ~ 0, L1 = 0, GIoU = 1
    # shift one box by 4 px in x: L1 = 2 * 4/40 (x1 and x2 move, cxcywh: cx only) / 2 objects
    pred2 = pred.clone()
    pred2[0, 0, 0] += 4 / 40
    v2 = set_loss([logits, pred2], batch=batch, ce_weight=0.0, giou_weight=0.0, l1_weight=1.0)
    assert abs(float(v2) - (4 / 40) / 2) < 1e-6


def test_set_loss_and_centernet_errors():
    batch = {"boxes": torch.zeros(1, 3, 4), "box_labels": torch.tensor([[0, 1, 2]]),
             "image": torch.zeros(1, 1, 8, 8)}
    with pytest.raises(ConfigError, match="queries"):
        set_loss([torch.zeros(1, 2, 11), torch.rand(1, 2, 4)], batch=batch)
    with pytest.raises(ConfigError, match="labels"):
        centernet([torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)],
                  batch=batch)
    with pytest.raises(ConfigError, match="batch key"):
        set_loss([torch.zeros(1, 3, 11), torch.rand(1, 3, 4)], batch={"image": batch["image"]})


# -- COCO mAP ---------------------------------------------------------------------------------
def test_coco_map_perfect_half_and_none():
    gt = torch.tensor([[0, 0.0, 0, 10, 10, 1], [0, 20, 20, 30, 30, 1], [1, 5, 5, 15, 15, 2]])
    perfect = torch.cat([gt[:, :5], torch.ones(3, 1), gt[:, 5:]], 1)
    assert coco_map(gt, perfect, (40, 40), 10)["map"] == pytest.approx(1.0)
    # class 1: one of two found (AP 51/101 at every IoU); class 2 found: mean (0.505 + 1) / 2
    half = perfect[[0, 2]]
    assert coco_map(gt, half, (40, 40), 10)["map50"] == pytest.approx((51 / 101 + 1) / 2, abs=1e-4)
    assert coco_map(gt, perfect[:0], (40, 40), 10)["map"] == 0.0


def test_detection_task_end_to_end_metric_matches_coco_map():
    task = T.build({"name": "detection", "head": "set"})
    boxes = torch.tensor([[[0.0, 0, 10, 10], [0, 0, 0, 0]]])
    labels = torch.tensor([[4, -1]])
    pred = xyxy_to_cxcywh(boxes[:, :1] / 32)
    logits = torch.full((1, 1, 11), -9.0)
    logits[0, 0, 4] = 9.0
    out = {"logits": logits, "boxes": pred}
    batch = {"boxes": boxes, "box_labels": labels, "idx": torch.tensor([7]),
             "image": torch.zeros(1, 1, 32, 32)}
    sums = {}
    task.update(sums, logits, batch, out=out)
    m = task.compute(sums)
    assert m["map"] == pytest.approx(1.0) and m["n"] == 1
    assert decode_set(logits, pred, (32, 32))[0, 0, :4].tolist() == pytest.approx([0, 0, 10, 10])


# -- data ---------------------------------------------------------------------------------------
def test_separated_canvases_boxes_hold_each_digit():
    x, y = fake_digits()
    canvas, seg, boxes, labels = detection_canvases(x, y, 30, 32, 3, seed=3)
    assert boxes.shape == (30, 3, 4) and labels.shape == (30, 3)
    for i in range(30):
        for j in range(3):
            if labels[i, j] < 0:
                continue
            x1, y1, x2, y2 = (int(v) for v in boxes[i, j])
            inside = seg[i, y1:y2, x1:x2]
            assert (inside == labels[i, j] + 1).any() and set(inside.unique().tolist()) <= {
                0, int(labels[i, j]) + 1}
    assert ((seg > 0).sum((1, 2)) == ((seg > 0) & (canvas[:, 0] > 0.5)).sum((1, 2))).all()
    a = detection_canvases(x, y, 30, 32, 3, seed=3)
    assert all(torch.equal(u, v) for u, v in zip(a, (canvas, seg, boxes, labels)))
    with pytest.raises(ConfigError, match="max_digits"):
        separated_plan(20, 2, 10, (8, 6), 5, 0)
    recs = coco_records(boxes[:2], labels[:2], (32, 32))
    assert len(recs["images"]) == 2 and len(recs["categories"]) == 10
    assert len(recs["annotations"]) == int((labels[:2] >= 0).sum())


def test_views_shapes_and_errors():
    x, y = fake_digits()
    canvas, *_ = detection_canvases(x, y, 4, 32, 2, seed=1)
    for v in ("clean", "blur", "lowres", "edge", "noisy"):
        assert degrade(canvas, v).shape == canvas.shape
    assert degrade(canvas, "distance").shape == (4, 2, 32, 32)
    assert not torch.equal(degrade(canvas, "blur"), canvas)
    with pytest.raises(ConfigError, match="views"):
        degrade(canvas, "sonar")


def test_check_boxes_errors():
    ok = torch.tensor([[[0.0, 0, 4, 4]]])
    check_boxes(ok, torch.tensor([[1]]), (8, 8), 10)
    with pytest.raises(ConfigError, match="inside the 8x8 image"):
        check_boxes(torch.tensor([[[0.0, 0, 9, 4]]]), torch.tensor([[1]]), (8, 8), 10)
    with pytest.raises(ConfigError, match="box_labels"):
        check_boxes(ok, torch.tensor([[12]]), (8, 8), 10)
    check_boxes(torch.tensor([[[0.0, 0, 99, 4]]]), torch.tensor([[-1]]), (8, 8), 10)  # padding


# -- models end to end --------------------------------------------------------------------------
@pytest.mark.parametrize("model,head", [("centernet-tiny", "centernet"), ("detr-tiny", "set")])
def test_detector_trains_and_scores(model, head):
    torch.manual_seed(0)
    train, val = tiny_data(16, 32, 0), tiny_data(8, 32, 1)
    params = {"width": 4} if head == "centernet" else {"width": 16, "queries": 4}
    m = create(model, img_size=32, **params)
    d = Distiller(m, None, task={"name": "detection", "head": head})
    res = Trainer(d, train, val, epochs=3, **FAST).fit()
    assert 0.0 <= res["best_val_map"] <= 1.0 and "best_epoch" in res
    assert not any("teacher" in k for k in m.state_dict())


def test_detr_target_queries_are_isolated():
    torch.manual_seed(0)
    m = create("detr-tiny", img_size=32, width=16, queries=4).eval()
    x = torch.randn(2, 1, 32, 32)
    plain = m(x)
    tq = torch.rand(2, 3, 14)
    both = m(x, target_queries=tq)
    assert torch.allclose(plain["logits"], both["logits"], atol=1e-5)  # learned queries unmoved
    assert both["target_logits"].shape == (2, 3, 11) and both["target_boxes"].shape == (2, 3, 4)


def test_detr_fewer_queries_than_objects_is_refused_before_training():
    train = tiny_data(8, 32, 0)
    m = create("detr-tiny", img_size=32, width=16, queries=2)
    d = Distiller(m, None, task={"name": "detection", "head": "set"})
    with pytest.raises(ConfigError, match="queries"):
        Trainer(d, train, None, epochs=1, **FAST).fit()


def test_boxes_outside_the_image_refused_before_training():
    train = tiny_data(8, 32, 0)
    train.tensors["boxes"][0, 0] = torch.tensor([0.0, 0, 40, 10])
    m = create("centernet-tiny", img_size=32, width=4)
    d = Distiller(m, None, task={"name": "detection"})
    with pytest.raises(ConfigError, match="inside the 32x32"):
        Trainer(d, train, None, epochs=1, **FAST).fit()


def test_shift_and_flip_move_boxes_with_the_image():
    from crossdistill.data.augment import augment_batch

    x, y = fake_digits()
    canvas, seg, boxes, labels = detection_canvases(x, y, 6, 32, 2, seed=4)
    batch = {"image": canvas.clone(), "seg": seg.clone(), "boxes": boxes.clone()}
    kinds = {"image": "image", "seg": "label_map", "boxes": "boxes"}
    augment_batch(batch, kinds, shift=3, flip=True, gen=torch.Generator().manual_seed(0))
    for i in range(6):
        for j in range(2):
            if labels[i, j] < 0:
                continue
            x1, y1, x2, y2 = (int(v) for v in batch["boxes"][i, j])
            if x2 <= x1 or y2 <= y1:
                continue
            inside = batch["seg"][i, y1:y2, x1:x2]
            assert (inside == labels[i, j] + 1).any()
            outside = batch["seg"][i].clone()
            outside[y1:y2, x1:x2] = 0
            assert not (outside == labels[i, j] + 1).any() or (labels[i] == labels[i, j]).sum() > 1
