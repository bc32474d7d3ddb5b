"""Task metrics against hand values: classification, LM, segmentation, retrieval."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from crossdistill import ConfigError, evaluate
from crossdistill import tasks as T
from crossdistill.data import Dataset
from crossdistill.tasks.retrieval import recall_at_k


def _sums(task, logits, batch, keep=True, out=None):
    sums = {}
    k = torch.ones(len(logits), dtype=torch.bool) if keep else None
    task.update(sums, logits, batch, keep=k, out=out)
    return sums


# -- classification ------------------------------------------------------------------------


def test_classification_acc_and_ce_skip_unlabelled():
    z = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [0.0, 5.0, 0.0], [9.0, 0.0, 0.0]])
    y = torch.tensor([0, 1, -100, 2])  # right, wrong, unlabelled, wrong
    task = T.build("classification")
    m = task.compute(_sums(task, z, {"y": y}))
    assert m["acc"] == pytest.approx(1 / 3)
    assert m["n"] == 3
    logp = torch.log_softmax(z.double(), -1)
    hand = -(logp[0, 0] + logp[1, 1] + logp[3, 2]) / 3
    assert m["loss"] == pytest.approx(float(hand), rel=1e-6)


def test_classification_keep_drops_padding_rows_and_train_has_no_ce():
    z = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    y = torch.tensor([0, 0, 1])
    task = T.build("classification")
    sums = {}
    task.update(sums, z, {"y": y}, keep=torch.tensor([True, True, False]))
    m = task.compute(sums)
    assert m["acc"] == pytest.approx(0.5) and m["n"] == 2
    m_train = task.compute(_sums(task, z, {"y": y}, keep=False))
    assert "loss" not in m_train and m_train["acc"] == pytest.approx(2 / 3)


def test_classification_evaluate_matches_hand():
    class Fixed(nn.Module):
        def forward(self, x):
            return x  # the "image" is the logits

    z = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [0.0, 5.0, 0.0], [9.0, 0.0, 0.0]])
    data = Dataset({"x": z, "y": torch.tensor([0, 2, -100, 1])}, {"x": "value", "y": "label"})
    m = evaluate(Fixed(), data, batch_size=3)
    assert m["acc"] == pytest.approx(2 / 3) and m["n"] == 3


# -- language modelling --------------------------------------------------------------------


def _lm_example():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 6, generator=g)
    labels = torch.tensor([[1, 4, -100], [0, -100, 5]])
    nbytes = torch.tensor([[2, 3, 7], [1, 9, 4]])
    return z, labels, nbytes


def _nll(z, labels):
    logp = torch.log_softmax(z.double(), -1)
    return [(-logp[b, i, labels[b, i]]).item() for b, i in zip(*torch.where(labels != -100))]


def test_lm_bits_per_byte_and_perplexity():
    z, labels, nbytes = _lm_example()
    task = T.build("lm")
    m = task.compute(_sums(task, z, {"labels": labels, "token_bytes": nbytes}))
    nll = _nll(z, labels)
    assert len(nll) == 4 and m["n"] == 4
    scored_bytes = 2 + 3 + 1 + 4  # the bytes of the labelled positions only
    assert m["bpb"] == pytest.approx(sum(nll) / math.log(2) / scored_bytes, rel=1e-6)
    assert m["loss"] == pytest.approx(np.mean(nll), rel=1e-6)
    assert m["ppl"] == pytest.approx(math.exp(np.mean(nll)), rel=1e-6)


def test_lm_sums_over_batches_and_no_bytes_is_bits_per_token():
    z, labels, nbytes = _lm_example()
    task = T.build("lm")
    sums = {}
    for b in range(2):  # two batches of one sequence: the same totals
        task.update(
            sums,
            z[b : b + 1],
            {"labels": labels[b : b + 1], "token_bytes": nbytes[b : b + 1]},
            keep=torch.ones(1, dtype=torch.bool),
        )
    m = task.compute(sums)
    nll = _nll(z, labels)
    assert m["bpb"] == pytest.approx(sum(nll) / math.log(2) / 10, rel=1e-6)
    m2 = task.compute(_sums(task, z, {"labels": labels}))
    assert m2["bpb"] == pytest.approx(np.mean(nll) / math.log(2), rel=1e-6)


def test_lm_loss_mask_is_labelled_positions():
    _, labels, _ = _lm_example()
    assert torch.equal(T.build("lm").loss_mask({"labels": labels}), labels != -100)


# -- segmentation --------------------------------------------------------------------------

K = 4  # class 3 occurs in neither targets nor predictions
TARGET = torch.tensor([[[0, 0, 1], [1, 2, -100]]])  # (1, 2, 3); one void pixel
PRED = torch.tensor([[[0, 1, 1], [2, 2, 0]]])


def _onehot_logits(pred):
    return nn.functional.one_hot(pred, K).float() * 5  # (B, H, W, K), class axis last


def test_segmentation_confusion_miou_pixel_acc():
    task = T.build("segmentation")
    sums = _sums(task, _onehot_logits(PRED), {"seg": TARGET})
    cm = sums["confusion"]
    hand = torch.tensor(
        [
            [1, 1, 0, 0],  # target 0: predicted 0 once, 1 once
            [0, 1, 1, 0],  # target 1: predicted 1, 2
            [0, 0, 1, 0],  # target 2: predicted 2
            [0, 0, 0, 0],
        ],  # class 3 absent; the void pixel is not counted
        dtype=torch.float64,
    )
    assert torch.equal(cm, hand)
    m = task.compute(sums)
    # IoU: class 0 1/(2+1-1), class 1 1/(2+2-1), class 2 1/(1+2-1); class 3 not counted
    assert m["miou"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)
    assert m["pixel_acc"] == pytest.approx(3 / 5)
    assert m["iou"] == pytest.approx([0.5, 1 / 3, 0.5, 0.0])
    assert m["n"] == 5


def test_segmentation_all_void_is_zero_not_nan():
    task = T.build("segmentation")
    m = task.compute(_sums(task, _onehot_logits(PRED), {"seg": torch.full_like(TARGET, -100)}))
    assert m["miou"] == 0.0 and m["pixel_acc"] == 0.0 and m["n"] == 0


class OneByOne(nn.Module):
    """Logits = the image (a one-hot map of the prediction), returned in a dict."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(K, K, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(K)[:, :, None, None])

    def forward(self, image):
        return {"aux": image.mean(), "out": self.conv(image)}


def test_evaluate_segmentation_end_to_end():
    # the hand example split over two samples, padded with a void row so each is (2, 3)
    target = torch.tensor([[[0, 0, 1], [-100, -100, -100]], [[1, 2, -100], [-100, -100, -100]]])
    pred = torch.tensor([[[0, 1, 1], [3, 3, 3]], [[2, 2, 0], [3, 3, 3]]])
    image = _onehot_logits(pred).permute(0, 3, 1, 2).contiguous()  # (B, K, H, W)
    data = Dataset({"image": image, "seg": target}, {"image": "image", "seg": "label_map"})
    for bs in (1, 2):
        m = evaluate(
            OneByOne(),
            data,
            batch_size=bs,
            task="segmentation",
            io={"inputs": ["image"], "logits": "out"},
        )
        assert m["miou"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3), bs
        assert m["pixel_acc"] == pytest.approx(3 / 5)
        assert m["n"] == 5
    # the task's default inputs / class axis: only the selector is needed
    m = evaluate(OneByOne(), data, task={"name": "segmentation"}, io={"logits": "out"})
    assert m["pixel_acc"] == pytest.approx(3 / 5)


# -- retrieval -----------------------------------------------------------------------------


def _hand_embeddings():
    q = torch.eye(6)
    e = torch.eye(6)
    g = torch.stack([e[0], e[2], e[1], e[3], (e[4] + e[5]) * 3, e[5]])  # 1 and 2 swapped
    return q, g


def test_recall_at_k_hand_values_both_directions():
    q, g = _hand_embeddings()
    # queries 1 and 2 see the other one's item first (rank 1); a tie (g4 vs q5) is not a miss
    assert recall_at_k(q, g, ks=(1, 5)) == pytest.approx({"r@1": 4 / 6, "r@5": 1.0})
    assert recall_at_k(g, q, ks=(1, 5)) == pytest.approx({"r@1": 4 / 6, "r@5": 1.0})


def _np_recall(q, g, k):
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    sim = qn @ gn.T
    hits = [i in np.argsort(-sim[i])[:k] for i in range(len(q))]
    return float(np.mean(hits))


def test_recall_at_k_random_against_numpy_and_asymmetric():
    g_ = torch.Generator().manual_seed(0)
    q = torch.randn(9, 4, generator=g_)
    g = q + 1.2 * torch.randn(9, 4, generator=g_)
    q2g, g2q = recall_at_k(q, g, ks=(1, 5)), recall_at_k(g, q, ks=(1, 5))
    for k in (1, 5):
        assert q2g[f"r@{k}"] == pytest.approx(_np_recall(q.numpy(), g.numpy(), k))
        assert g2q[f"r@{k}"] == pytest.approx(_np_recall(g.numpy(), q.numpy(), k))


def test_retrieval_task_end_to_end_and_small_gallery_error():
    q, g = _hand_embeddings()
    task = T.build({"name": "retrieval", "ks": (1, 5)})
    sums = {}
    for part in (slice(0, 4), slice(4, 6)):  # gallery collected across batches
        task.update(
            sums,
            q[part],
            {"idx": torch.arange(6)[part]},
            keep=torch.ones(part.stop - part.start, dtype=torch.bool),
            out=(q[part], g[part]),
        )
    m = task.compute(sums)
    assert m["q2g_r@1"] == pytest.approx(4 / 6) and m["g2q_r@5"] == pytest.approx(1.0)
    assert m["mean_recall"] == pytest.approx((4 / 6 + 1 + 4 / 6 + 1) / 4)
    assert m["n"] == 6
    with pytest.raises(ConfigError, match=r"gallery of >= k items \(has 3\)"):
        recall_at_k(q[:3], g[:3], ks=(1, 5))
    small = {}
    task.update(small, q[:3], {}, keep=torch.ones(3, dtype=torch.bool), out=(q[:3], g[:3]))
    with pytest.raises(ConfigError, match="task.ks"):
        task.compute(small)


def test_retrieval_evaluate_with_dict_output():
    q, g = _hand_embeddings()

    class Dual(nn.Module):
        def forward(self, a, b):
            return {"q": a, "g": b}

    data = Dataset({"a": q, "b": g}, {"a": "value", "b": "value"})
    task = T.build({"name": "retrieval", "query": "q", "gallery": "g", "ks": (1, 5)})
    m = evaluate(Dual(), data, batch_size=4, task=task, io={"inputs": ["a", "b"], "logits": "q"})
    assert m["q2g_r@1"] == pytest.approx(4 / 6)
    assert m["g2q_r@1"] == pytest.approx(4 / 6)


def test_unknown_task_and_bad_params():
    with pytest.raises(ConfigError):
        T.build("nope")
    with pytest.raises(ConfigError, match="bad parameters"):
        T.build({"name": "segmentation", "colour": 1})
