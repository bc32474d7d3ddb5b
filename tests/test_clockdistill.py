"""CLoCKDistill: memory weighting, target-aware query KD, matched KD, the prepare stage and a
tiny end-to-end run of every variant."""

from __future__ import annotations

import pytest
import torch
from test_detection import FAST, tiny_data

import crossdistill.losses.clock  # noqa: F401  (registers)
import crossdistill.methods.clockdistill as C
import crossdistill.models.detect  # noqa: F401
from crossdistill import Distiller, Trainer
from crossdistill.errors import ConfigError
from crossdistill.losses.clock import (
    box_token_mask,
    clock_memory,
    clock_query,
    matched_kd,
    query_recon,
    token_grid,
)
from crossdistill.methods import build
from crossdistill.models import create


def test_token_grid_and_box_mask_golden():
    assert token_grid(16, (8, 8), "f") == (4, 4) and token_grid(8, (4, 8), "f") == (2, 4)
    with pytest.raises(ConfigError):
        token_grid(7, (8, 8), "f")
    boxes = torch.tensor([[[0.0, 0, 4, 4], [0, 0, 8, 8]]])
    m = box_token_mask(boxes, torch.tensor([[2, -1]]), (4, 4), (8, 8))  # 2nd row is padding
    want = torch.zeros(4, 4, dtype=torch.bool)
    want[:2, :2] = True  # cell centres at 1 and 3 px lie in [0, 4)
    assert torch.equal(m[0], want.flatten())


def test_clock_memory_golden_and_gradcheck():
    s = torch.zeros(1, 4, 2)
    t = torch.zeros(1, 4, 2)
    t[0, 0] = torch.tensor([1.0, 1.0])  # fg token: error 1
    t[0, 3] = torch.tensor([2.0, 0.0])  # bg token: error mean(4, 0) = 2
    batch = {"boxes": torch.tensor([[[0.0, 0, 4, 4]]]), "box_labels": torch.tensor([[0]]),
             "image": torch.zeros(1, 1, 8, 8)}
    v = clock_memory(s, t, batch=batch, fg_boost=4.0)
    assert float(v) == pytest.approx((5 * 1 + 1 * 2) / (5 + 1 + 1 + 1))
    x = torch.randn(1, 4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: clock_memory(z, t.double(), batch=batch), (x,))


def test_clock_query_gradcheck():
    torch.manual_seed(0)
    ls = torch.randn(1, 2, 3, dtype=torch.float64, requires_grad=True)
    bs = (torch.rand(1, 2, 4, dtype=torch.float64) * 0.3 + 0.3).requires_grad_()
    lt, bt = torch.randn(1, 2, 3, dtype=torch.float64), torch.rand(1, 2, 4).double() * 0.3 + 0.3
    batch = {"boxes": torch.tensor([[[0.0, 0, 4, 4], [1, 1, 3, 3]]]),
             "box_labels": torch.tensor([[1, 2]])}
    assert torch.autograd.gradcheck(
        lambda a, b: clock_query([a, b], [lt, bt], batch=batch, temperature=2.0), (ls, bs)
    )


def test_clock_query_golden():
    ls = torch.zeros(1, 2, 3)
    lt = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])
    bs = torch.full((1, 2, 4), 0.5)
    bt = bs.clone()
    bt[0, 0, 0] = 0.6  # cx moves 0.1: L1 0.1, the boxes still overlap
    batch = {"boxes": torch.tensor([[[0.0, 0, 4, 4], [0, 0, 0, 0]]]),
             "box_labels": torch.tensor([[1, -1]])}
    v = clock_query([ls, bs], [lt, bt], batch=batch, l1_weight=1.0, giou_weight=0.0)
    assert float(v) == pytest.approx(0.1, abs=1e-6)  # row 0: KL 0 (same logits); row 1 padding
    batch["box_labels"] = torch.tensor([[1, 2]])
    batch["boxes"][0, 1] = torch.tensor([1.0, 1, 3, 3])
    v2 = clock_query([ls, bs], [lt, bt], batch=batch, l1_weight=0.0, giou_weight=0.0)
    p = torch.softmax(lt[0, 1], -1)
    kl = float((p * (p.log() - torch.log(torch.full((3,), 1 / 3)))).sum())
    assert float(v2) == pytest.approx(kl / 2, abs=1e-6)


def test_matched_kd_is_permutation_invariant():
    torch.manual_seed(0)
    lt, bt = torch.randn(2, 5, 4), torch.rand(2, 5, 4) * 0.5 + 0.25
    perm = torch.randperm(5)
    v = matched_kd([lt[:, perm].clone(), bt[:, perm].clone()], [lt, bt])
    assert float(v) < 1e-6
    assert float(matched_kd([torch.randn(2, 5, 4), bt], [lt, bt])) > 0.01


def test_query_recon_and_prepare_stage():
    batch = {"boxes": torch.tensor([[[0.0, 0, 4, 4], [0, 0, 0, 0]]]),
             "box_labels": torch.tensor([[2, -1]]), "image": torch.zeros(1, 1, 8, 8)}
    out = C.TargetQueries(num_classes=3)(dict(batch), None)["target_queries"]
    assert torch.allclose(out[0, 0], torch.tensor([0.25, 0.25, 0.5, 0.5, 0, 0, 1]))
    assert (out[0, 1] == 0).all()
    logits = torch.full((1, 2, 4), -20.0)
    logits[0, 0, 2] = 20.0
    v = query_recon([logits, out[..., :4]], batch=batch)
    assert float(v) < 1e-5


def test_recipe_errors():
    s = create("detr-tiny", img_size=32, width=16, queries=4)
    with pytest.raises(ConfigError, match="variant"):
        build("clockdistill", s, s, variant="hungarian")
    with pytest.raises(ConfigError, match="teacher"):
        build("clockdistill", s, None)
    with pytest.raises(ConfigError, match="detr-tiny"):
        build("clockdistill", create("centernet-tiny", width=4), s)


@pytest.mark.parametrize("variant", C.VARIANTS)
def test_end_to_end_variants(variant):
    torch.manual_seed(0)
    train, val = tiny_data(16, 32, 0), tiny_data(8, 32, 1)
    teacher = create("detr-tiny", img_size=32, width=32, queries=4)
    kw = C.distiller_kwargs()
    task = {"name": "detection", "head": "set"}
    Trainer(Distiller(teacher, None, C.teacher_terms(), task=task, io=kw["io"],
                      prepare=kw["prepare"]), train, None, epochs=1, **FAST).fit()
    student = create("detr-tiny", img_size=32, width=16, queries=4)
    recipe = build("clockdistill", student, teacher, variant=variant)
    d = Distiller(student, teacher, recipe.terms, task=task, **C.distiller_kwargs())
    res = Trainer(d, train, val, epochs=1, **FAST).fit()
    assert 0.0 <= res["best_val_map"] <= 1.0
    sd = d.export_state() if hasattr(d, "export_state") else student.state_dict()
    assert not any(k.startswith(("teacher", "projectors")) for k in sd)
