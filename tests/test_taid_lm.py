"""TAID in its language-model form (Shing et al., ICLR 2025): per token
r = softmax((1-t) sg(z_s) + t z_t), loss -sum r log q averaged over the valid tokens, no CE;
the schedule moves once per optimiser step from the step's masked mean loss (all
micro-batches), never on validation; tiny end-to-end runs with HF GPT-2 models."""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import crossdistill as cd  # noqa: E402
from crossdistill import Distiller, Term, Trainer  # noqa: E402
from crossdistill.context import Context  # noqa: E402
from crossdistill.losses.hetero import TAIDLoss  # noqa: E402
from crossdistill.methods import build  # noqa: E402

S = [
    [[1.0, 0.0, -1.0, 2.0, 0.5], [0.0, 0.0, 0.0, 0.0, 0.0], [3.0, -2.0, 1.0, 0.0, -1.0]],
    [[-1.0, 1.0, 0.5, 0.0, 2.0], [2.0, 2.0, -1.0, 0.0, 1.0], [0.0, 1.0, 2.0, 3.0, 4.0]],
]
T = [
    [[0.0, 1.0, 2.0, -1.0, 0.0], [1.0, -1.0, 0.5, 2.0, 0.0], [0.0, 0.0, 4.0, 0.0, -2.0]],
    [[2.0, 0.0, 0.0, 1.0, -1.0], [0.0, 3.0, 1.0, -2.0, 0.5], [1.0, 1.0, 1.0, 1.0, 1.0]],
]
MASK = [[True, True, False], [True, False, True]]


def hand_loss(s, t, w):
    """-sum_v r_v log q_v for one position, r = softmax((1-w) s + w t), q = softmax(s)."""
    z = [(1 - w) * a + w * b for a, b in zip(s, t)]
    zr = sum(math.exp(x) for x in z)
    zs = sum(math.exp(x) for x in s)
    return -sum(math.exp(x) / zr * (a - math.log(zs)) for x, a in zip(z, s))


def test_golden_per_token_masked_mean():
    mod = TAIDLoss((2, 3, 5), (2, 3, 5)).double().train()
    s, t, mask = torch.tensor(S).double(), torch.tensor(T).double(), torch.tensor(MASK)
    per = mod(s, t, mask=mask)
    assert per.shape == (2, 3)
    for b in range(2):
        for i in range(3):
            assert float(per[b, i]) == pytest.approx(hand_loss(S[b][i], T[b][i], 0.4), rel=1e-12)
    kept = [hand_loss(S[b][i], T[b][i], 0.4) for b in range(2) for i in range(3) if MASK[b][i]]
    want = sum(kept) / len(kept)
    term = Term("taid")
    assert float(term.reduce(per, Context(mask=mask))) == pytest.approx(want)
    assert float(mod.last) == pytest.approx(want)  # the schedule sees the same masked mean


class Tokens(nn.Module):
    def __init__(self, seed, vocab=6):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, vocab)

    def forward(self, input_ids):
        return {"logits": self.emb(input_ids) * 2}


def test_ignored_positions_change_nothing():
    student, teacher = Tokens(0), Tokens(1)
    ids = torch.tensor([[1, 2, 3, 4], [5, 0, 1, 2]])
    labels = torch.tensor([[2, 3, 4, -100], [0, -100, -100, -100]])  # -100: padding / none
    batch = {"input_ids": ids, "labels": labels}
    d = Distiller(student, teacher, build("taid", student, teacher, ce_weight=0.0).terms,
                  task="lm").build(batch)
    d.train()
    out = d(batch)
    assert list(out.losses) == ["taid"]  # the LM form: no CE term
    mod = d.loss_modules["taid"]
    z_s, z_t = student(ids)["logits"], teacher(ids)["logits"]
    keep = labels != -100
    per = -(torch.softmax(0.6 * z_s + 0.4 * z_t, -1) * torch.log_softmax(z_s, -1)).sum(-1)
    got, want = float(out.losses["taid"].detach()), float(per[keep].mean().detach())
    assert got == pytest.approx(want, rel=1e-6)
    out.total.backward()
    used = {int(i) for i in ids[keep]}
    for tok in range(6):  # only tokens at valid positions get gradient
        assert (student.emb.weight.grad[tok].abs().sum() > 0) == (tok in used), tok
    assert float(mod.window[1]) == keep.sum()  # the schedule's count is the valid tokens


def test_window_spans_micro_batches_and_skips_validation():
    mod = TAIDLoss((2, 3, 5), (2, 3, 5)).double().train()
    g = torch.Generator().manual_seed(0)
    s1, t1, s2, t2 = (torch.randn(2, 3, 5, generator=g, dtype=torch.float64) for _ in range(4))
    m1 = torch.tensor(MASK)
    m2 = torch.tensor([[True, False, False], [False, False, False]])
    a, b = mod(s1, t1, mask=m1), mod(s2, t2, mask=m2)
    mod.eval()
    mod(s1 * 5, t2, mask=torch.ones(2, 3, dtype=torch.bool))  # validation: not counted
    mod.train()
    calls = []
    mod.update = lambda loss, progress: calls.append((loss, progress))
    fake = type("D", (), {"epoch": 0.5, "total_epochs": 2})()
    mod.on_step(fake)
    want = (float(a[m1].sum()) + float(b[m2].sum())) / (int(m1.sum()) + int(m2.sum()))
    assert calls == [(pytest.approx(want), 0.25)]
    assert float(mod.window.abs().sum()) == 0.0
    mod.on_step(fake)  # no forward since: no update
    assert len(calls) == 1
    assert "window" not in mod.state_dict()  # empty at step boundaries: not checkpointed


def gpt2(n_layer, n_embd, seed):
    from crossdistill.models.hf import create_hf

    torch.manual_seed(seed)
    return create_hf("gpt2", config={"n_layer": n_layer, "n_embd": n_embd, "n_head": 2,
                                     "n_positions": 16, "vocab_size": 70})


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    pytest.importorskip("transformers")
    cache = tmp_path_factory.mktemp("tok")
    kw = dict(tokenizer="char", block=16, max_chars=5000, cache_dir=str(cache))
    return {s: cd.data.load_split("shakespeare", s, **kw) for s in ("train", "val")}


def test_schedule_moves_once_per_optimizer_step_under_accumulation(
        text_data, one_thread, monkeypatch):
    calls = []
    real = TAIDLoss.update
    monkeypatch.setattr(TAIDLoss, "update",
                        lambda self, loss, p: (calls.append(loss), real(self, loss, p)))
    teacher, student = gpt2(2, 32, 1).eval(), gpt2(1, 16, 2)
    d = Distiller(student, teacher, build("taid", student, teacher, ce_weight=0.0).terms,
                  task="lm")
    tr = Trainer(d, text_data["train"], text_data["val"], epochs=2, batch_size=16, accumulate=2,
                 lr=3e-3, optimizer="adamw", progress=False)
    res = tr.fit()
    assert math.isfinite(res["best_val_bpb"])
    assert len(calls) == tr.total_steps == 2 * math.ceil(len(tr.batches) / 2)
    mod = d.loss_modules["taid"]
    assert 0.4 < float(mod.t) <= 1.0 and float(mod.L_prev) == calls[-1]
    assert {"loss_modules.taid.t", "loss_modules.taid.L_prev"} <= set(d.trainable_state())


def test_yaml_config_checks(tmp_path, monkeypatch, one_thread):
    pytest.importorskip("transformers")
    import yaml

    from crossdistill.cli import main

    monkeypatch.chdir(tmp_path)
    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    cfg = yaml.safe_load(open(os.path.join(root, "lm_taid.yaml")))
    assert cfg["method"]["name"] == "taid" and cfg["method"]["ce_weight"] == 0
    data = {"name": "shakespeare", "batch_size": 8,
            "params": {"tokenizer": "char", "block": 16, "max_chars": 12000}}
    teacher = {"student": {"hf": "gpt2", "inputs": {"input_ids": "input_ids"},
                           "config": {"n_layer": 2, "n_embd": 16, "n_head": 2, "n_positions": 16}},
               "data": data, "train": {"epochs": 1, "progress": False}}
    (tmp_path / "teacher.yaml").write_text(yaml.safe_dump(teacher))
    cfg["teacher"] = {"from_config": str(tmp_path / "teacher.yaml")}
    cfg["student"]["config"].update(n_embd=16, n_positions=16)
    cfg["data"] = data
    cfg["train"].update(epochs=1, progress=False)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "out")]) == 0
    import json

    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert math.isfinite(res["test_bpb"])
