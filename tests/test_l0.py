"""L0 gates on BERT heads / FFN channels, the l0_budget Lagrangian, l0_prune, and TinyCLIP's
automatic inheritance end to end (stages, clean export, kill-and-resume)."""

import math

import pytest
import torch
from conftest import Kill, KillAfter

import crossdistill as cd
from crossdistill.errors import ConfigError
from crossdistill.losses.l0 import L0Budget, lagrangian
from crossdistill.methods import build
from crossdistill.models import l0 as L0
from crossdistill.models.dual import DualEncoder, bert_tower


def _bert(seed=0, layers=2, hidden=32, heads=4):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=2 * hidden,
                     max_position_embeddings=16)
    return BertModel(cfg).eval()


def test_hard_concrete_golden():
    a = torch.tensor([0.0, 20.0, -20.0])
    assert torch.allclose(L0.gate_values(a, False), torch.tensor([0.5, 1.0, 0.0]))
    p0 = 1 / (1 + math.exp(-(2 / 3) * math.log(11)))  # sigmoid(0 - beta log(-gamma/zeta))
    assert float(L0.open_probability(torch.tensor(0.0))) == pytest.approx(p0)
    z = L0.gate_values(torch.zeros(10000), True, torch.Generator().manual_seed(0))
    assert z.min() >= 0 and z.max() <= 1
    # P(z > 0) of the samples matches the closed form
    assert float((z > 0).float().mean()) == pytest.approx(p0, abs=0.02)


def test_lagrangian_golden_and_ascent():
    gap = torch.tensor([0.2])
    assert float(lagrangian(gap, torch.tensor(3.0), torch.tensor(5.0))) == pytest.approx(
        3 * 0.2 + 5 * 0.04)
    loss = L0Budget((1,), lambda_scale=10.0)
    with torch.no_grad():
        loss.p.copy_(torch.tensor([0.1, 0.2]))
    g = torch.tensor([0.2], requires_grad=True)
    out = loss(g)
    assert float(out.detach()) == pytest.approx(1.0 * 0.2 + 2.0 * 0.04)
    out.backward()
    # gates descend (d/dg = l1 + 2 l2 g); multipliers ascend (reversed: -scale * [g, g^2])
    assert float(g.grad) == pytest.approx(1.0 + 2 * 2.0 * 0.2)
    assert torch.allclose(loss.p.grad, -10 * torch.tensor([0.2, 0.04]))
    with pytest.raises(ConfigError, match="l0_budget.student"):
        L0Budget((4, 2))


def test_gates_open_are_exact_and_closed_equal_pruned():
    enc = _bert()
    ids = torch.randint(0, 50, (3, 7))
    ref = enc(input_ids=ids).last_hidden_state
    gates = L0.attach(enc)
    gates.eval()
    with torch.no_grad():
        for a in [*gates.heads, *gates.ffn]:
            a.fill_(20.0)  # every gate fully open
    assert torch.allclose(enc(input_ids=ids).last_hidden_state, ref, atol=1e-6)
    assert float(gates.expected_ratio().detach()) == pytest.approx(1.0, abs=1e-6)
    heads, ffn = [[0, 2], [1, 2, 3]], [list(range(0, 64, 2)), [5, 9, 11]]
    with torch.no_grad():
        for lay in range(2):
            gates.heads[lay].fill_(-20.0)
            gates.heads[lay][heads[lay]] = 20.0
            gates.ffn[lay].fill_(-20.0)
            gates.ffn[lay][ffn[lay]] = 20.0
        gated = enc(input_ids=ids).last_hidden_state
    model = torch.nn.Module()
    model.enc = enc
    with torch.no_grad():
        L0.l0_prune(model, path="enc", heads=heads, ffn=ffn)
    assert not hasattr(enc, "l0") and not enc._forward_pre_hooks
    lay0 = enc.encoder.layer[0]
    assert lay0.attention.self.query.out_features == 2 * 8
    assert lay0.output.dense.in_features == 32
    assert torch.allclose(enc(input_ids=ids).last_hidden_state, gated, atol=1e-5)
    with pytest.raises(ConfigError, match="structure.heads"):
        L0.l0_prune(model, path="enc", heads=[[0]], ffn=[[0]])
    with pytest.raises(ConfigError, match="structure.ffn"):
        L0.l0_prune(model, path="enc", heads=[[0], [0]], ffn=[[0], [99]])


def test_keep_respects_the_budget_and_keeps_a_floor():
    enc = _bert()
    gates = L0.attach(enc)
    with torch.no_grad():
        for a in [*gates.heads, *gates.ffn]:
            a.copy_(torch.randn(a.shape))
    keep = gates.keep(0.3)
    size = gates.size([len(h) for h in keep["heads"]], [len(f) for f in keep["ffn"]])
    assert size <= 0.3 * float(gates.full) + 1e-6
    assert all(len(h) >= 1 for h in keep["heads"]) and all(len(f) >= 1 for f in keep["ffn"])
    # ranked by log_alpha: every kept FFN channel of a layer beats a dropped one of its layer
    for lay, f in enumerate(keep["ffn"]):
        a = gates.ffn[lay].detach()
        dropped = [i for i in range(len(a)) if i not in f]
        if dropped and len(f) > 1:
            assert a[f].min() >= a[dropped].max() - 1e-6 or len(f) == 1


def _duals(seed=0, vocab=64):
    torch.manual_seed(100)
    t = DualEncoder(cd.models.create("cnn", num_classes=10, in_channels=1, img_size=8,
                                     channels=(8, 16)),
                    bert_tower(vocab_size=vocab, n_layer=2, hidden=32, heads=4, max_tokens=48), 16)
    torch.manual_seed(seed)
    s = DualEncoder(cd.models.create("cnn", num_classes=10, in_channels=1, img_size=8,
                                     channels=(8,)),
                    bert_tower(vocab_size=vocab, n_layer=2, hidden=32, heads=4, max_tokens=48), 16)
    return s, t.eval()


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("tok"))
    kw = dict(images="digits", tokenizer="char", max_tokens=48, cache_dir=cache)
    return [cd.data.load_split("digit_captions", s, limit=n, **kw)
            for s, n in (("train", 200), ("val", 60))]


def _run(s, t, tr, va, out=None, callbacks=(), resume=False):
    r = build("tinyclip", s, t, auto=True, targets=[0.6, 0.3], prune_until=0.5)
    io = s.io()
    task = {"name": "retrieval", "inputs": list(io["inputs"]), "ks": [1, 5]}
    d = cd.Distiller(s, t, r.terms, hooks=r.hooks, io=io, teacher_io=t.io(), task=task,
                     prepare=[{"name": "pick_caption"}])
    trainer = cd.Trainer(d, tr, va, epochs=4, batch_size=50, lr=3e-3, optimizer="adamw",
                         progress=False, out_dir=out, checkpoint_every=2,
                         callbacks=list(callbacks))
    return d, trainer.fit(resume=resume)


def test_tinyclip_auto_prunes_in_stages_and_exports_clean(captions, tmp_path):
    tr, va = captions
    s, t = _duals(vocab=len(tr.tokenizer))
    d, res = _run(s, t, tr, va)
    events = [e for e in d.structure_log if e["op"] == "l0_prune"]
    assert len(events) == 2 and events[0]["regate"] and not events[1]["regate"]
    assert events[1]["drop_terms"] == ["l0"] and [x.name for x in d.terms] == ["affinity"]
    enc = d.student.text.encoder
    full = 2 * (4 * 32 * 32 + 2 * 32 * 128)  # bert_tower: FFN 4 x hidden
    now = sum(4 * 32 * 8 * (lay.attention.self.query.out_features // 8)
              + 2 * 32 * lay.intermediate.dense.out_features for lay in enc.encoder.layer)
    assert now <= 0.3 * full + 1e-6
    assert not hasattr(enc, "l0")
    student = d.export(tmp_path / "s.safetensors")
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in student.modules())
    assert not any("l0" in k for k in student.state_dict())
    assert res["best_epoch"] >= 2  # epochs before the last prune were another model
    # the student's text tower started as the teacher's: interval_front keeps layers 0, 1
    assert "layers [0, 1]" in build("tinyclip", *_duals(vocab=len(tr.tokenizer)), auto=True).note


def test_tinyclip_auto_resumes_bit_identical(captions, tmp_path):
    tr, va = captions
    v = len(tr.tokenizer)
    ref_d, _ = _run(*_duals(vocab=v), tr, va, out=tmp_path / "a")
    with pytest.raises(Kill):  # 4 batches per epoch: die in epoch 2, after the first prune
        _run(*_duals(vocab=v), tr, va, out=tmp_path / "b", callbacks=[KillAfter(7)])
    d, _ = _run(*_duals(seed=5, vocab=v), tr, va, out=tmp_path / "b", resume=True)
    for (k, a), b in zip(ref_d.trainable_state().items(), d.trainable_state().values()):
        assert torch.equal(a, b), k


def test_tinyclip_auto_bad_configs():
    s, t = _duals()
    with pytest.raises(ConfigError, match="tinyclip.targets"):
        build("tinyclip", s, t, auto=True, targets=[0.3, 0.6])
    with pytest.raises(ConfigError, match="tinyclip.prune_until"):
        build("tinyclip", s, t, auto=True, prune_until=0.0)
    narrow = DualEncoder(cd.models.create("cnn", num_classes=10, in_channels=1, img_size=8),
                         bert_tower(vocab_size=64, n_layer=1, hidden=16, heads=2), 16)
    with pytest.raises(ConfigError, match="tinyclip.auto"):
        build("tinyclip", narrow, t, auto=True)
    r = build("tinyclip", narrow, t, auto=True, inherit=False)  # gates on its own weights
    assert [x.name for x in r.terms] == ["affinity", "l0"]
