"""TinyCLIP's manual weight inheritance for BERT-style towers."""

import pytest
import torch
from transformers import BertConfig, BertModel

from crossdistill.errors import ConfigError
from crossdistill.methods.inherit import inherit_bert, layer_map


def _bert(layers=4, hidden=16, heads=4, ffn=32, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=ffn,
                     max_position_embeddings=16)
    return BertModel(cfg).eval()


def test_layer_map():
    assert layer_map(6, 2) == [0, 3] and layer_map(6, 3) == [0, 2, 4]
    assert layer_map(6, 2, "front") == [0, 1] and layer_map(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="inherit.student_layers"):
        layer_map(2, 3)
    with pytest.raises(ConfigError, match="inherit.layers"):
        layer_map(4, 2, "back")


def test_full_inheritance_is_the_teacher():
    t, s = _bert(), _bert(seed=1)
    ids = torch.randint(0, 50, (2, 7))
    assert not torch.allclose(t(input_ids=ids).last_hidden_state,
                              s(input_ids=ids).last_hidden_state)
    kept = inherit_bert(t, s)
    assert kept["layers"] == [0, 1, 2, 3]
    with torch.no_grad():
        assert torch.allclose(t(input_ids=ids).last_hidden_state,
                              s(input_ids=ids).last_hidden_state, atol=1e-6)


def test_leading_heads_channels_and_interval_layers():
    t, s = _bert(), _bert(layers=2, hidden=8, heads=2, ffn=12, seed=1)
    kept = inherit_bert(t, s)
    assert kept["layers"] == [0, 2]
    tl, sl = t.encoder.layer[2], s.encoder.layer[1]
    # heads of size 4: the student's 2 heads are the teacher's first 2 (rows 0..7)
    assert torch.equal(sl.attention.self.query.weight, tl.attention.self.query.weight[:8, :8])
    assert torch.equal(sl.attention.self.value.bias, tl.attention.self.value.bias[:8])
    assert torch.equal(sl.intermediate.dense.weight, tl.intermediate.dense.weight[:12, :8])
    assert torch.equal(sl.output.dense.weight, tl.output.dense.weight[:8, :12])
    assert torch.equal(s.embeddings.word_embeddings.weight,
                       t.embeddings.word_embeddings.weight[:, :8])


def test_bad_pairs():
    t = _bert()
    with pytest.raises(ConfigError, match="inherit.student.hidden"):
        inherit_bert(t, _bert(hidden=32, heads=8))
    with pytest.raises(ConfigError, match="head size"):
        inherit_bert(t, _bert(hidden=8, heads=4))  # head size 2, the teacher's 4
    with pytest.raises(ConfigError, match="BertModel"):
        inherit_bert(t, torch.nn.Linear(2, 2))


def test_tinyclip_recipe_inherits_and_distils():
    import crossdistill as cd
    from crossdistill.methods import build

    t = cd.models.create("dual-encoder", img_size=8, dim=16, text_layers=4, text_hidden=32,
                         text_heads=4, max_tokens=16)
    s = cd.models.create("dual-encoder", img_size=8, dim=16, text_layers=2, text_hidden=16,
                         text_heads=2, max_tokens=16)
    r = build("tinyclip", s, t)
    assert [x.loss for x in r.terms] == ["affinity"] and "[0, 2]" in r.note
    assert torch.equal(s.text.encoder.encoder.layer[1].attention.self.query.weight,
                       t.text.encoder.encoder.layer[2].attention.self.query.weight[:16, :16])
    r = build("tinyclip", s, t, inherit=False, alpha=0.5)
    assert [x.loss for x in r.terms] == ["affinity", "clip"]
    g = torch.Generator().manual_seed(0)
    data = cd.data.Dataset({"x": torch.randn(32, 1, 8, 8, generator=g),
                            "caption_ids": torch.randint(0, 100, (32, 8), generator=g),
                            "caption_mask": torch.ones(32, 8, dtype=torch.long)},
                           {"x": "image", "caption_ids": "tokens", "caption_mask": "value"})
    io = s.io()
    d = cd.Distiller(s, t, r.terms, io=io, teacher_io=t.io(),
                     task={"name": "retrieval", "inputs": list(io["inputs"]), "ks": [1, 5]})
    res = cd.Trainer(d, data, None, epochs=2, batch_size=16, lr=1e-3, optimizer="adamw",
                     progress=False).fit()
    assert res["train_seconds"] >= 0
    with pytest.raises(ConfigError, match="tinyclip.alpha"):
        build("tinyclip", s, t, alpha=2.0)
    with pytest.raises(ConfigError, match="dual-encoder"):
        build("tinyclip", torch.nn.Linear(2, 2), t)
