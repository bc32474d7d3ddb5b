"""VLM-OOD: the text classifier, class texts with attributes, the recipe, a tiny run."""

import pytest
import torch
import torch.nn.functional as F

import crossdistill as cd
from crossdistill.errors import ConfigError
from crossdistill.methods import build
from crossdistill.methods.vlm_ood import TextClassifier, class_text_embeddings, embedder
from crossdistill.models.dual import DualEncoder, TextTower
from crossdistill.text.embed_cache import CachedTextTower, TextEmbedCache


def _cnn(seed, dim=16):
    torch.manual_seed(seed)
    return embedder(cd.models.create("cnn", num_classes=10, in_channels=1, img_size=8,
                                     channels=(8, 16)), dim)


def _texts(seed=0, k=10, dim=16):
    return torch.randn(k, dim, generator=torch.Generator().manual_seed(seed))


def test_text_classifier_logits_and_taps():
    texts = _texts()
    m = TextClassifier(_cnn(0), texts[:5], temperature=0.07).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        z = m(x)
        f = m.image(x)
    want = F.normalize(f, dim=-1) @ F.normalize(texts[:5], dim=-1).T / 0.07
    assert z.shape == (3, 5) and torch.allclose(z, want, atol=1e-5)
    m.set_texts(texts[5:])  # unseen classes at test time
    with torch.no_grad():
        assert torch.allclose(m(x), F.normalize(f, dim=-1) @ F.normalize(texts[5:], dim=-1).T
                              / 0.07, atol=1e-5)
    assert m.feature_path == "embed_out" and "texts" not in m.state_dict()


def test_frozen_image_stays_in_eval():
    m = TextClassifier(_cnn(0), _texts()[:5], freeze_image=True).train()
    assert not m.image.training and not any(p.requires_grad for p in m.image.parameters())


class _CharTok:
    """A byte-level stand-in for an HF tokenizer (the call signature ``_ids`` uses)."""

    def __len__(self):
        return 257

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        for i, t in enumerate(texts):
            b = list(t.encode())[:max_length]
            ids[i, :len(b)] = torch.tensor(b) + 1
        return {"input_ids": ids, "attention_mask": (ids > 0).long()}


def _tok_dual():
    from transformers import BertConfig, BertModel

    tok = _CharTok()
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=128)
    tower = TextTower(BertModel(cfg), None, trainable=False)
    img = cd.models.create("cnn", num_classes=10, in_channels=1, img_size=8, channels=(4, 8))
    return tok, DualEncoder(img, CachedTextTower(TextEmbedCache(tower), 12), 12)


def test_class_text_embeddings_modes():
    from crossdistill.data.digit_aspects import class_descriptions
    from crossdistill.data.turns import _ids

    tok, dual = _tok_dual()
    desc = class_descriptions(range(5, 7))
    assert desc[1][0] == "a handwritten six" and len(desc[1]) == 3
    mean = class_text_embeddings(dual, desc, tok, mode="mean", max_tokens=128)
    with torch.no_grad():
        ids, mask = _ids(tok, desc[0], 128)
        want = F.normalize(F.normalize(dual.text(ids, mask), dim=-1).mean(0), dim=-1)
        ids, mask = _ids(tok, [" . ".join(desc[1])], 128)
        concat_want = F.normalize(dual.text(ids, mask), dim=-1)[0]
    assert mean.shape == (2, 12) and torch.allclose(mean[0], want, atol=1e-6)
    concat = class_text_embeddings(dual, desc, tok, mode="concat", max_tokens=128)
    assert torch.allclose(concat[1], concat_want, atol=1e-6)
    with pytest.raises(ConfigError, match="method.attr_mode"):
        class_text_embeddings(dual, desc, tok, mode="sum")
    with pytest.raises(ConfigError, match="method.class_texts"):
        class_text_embeddings(dual, [[]], tok)


def test_recipe_terms_and_bad_inputs():
    texts = _texts()[:5]
    s, t = TextClassifier(_cnn(0), texts), TextClassifier(_cnn(1), texts)
    r = build("vlm-ood", s, t)
    assert [x.name for x in r.terms] == ["cls", "vlalign", "mse", "im_cst"]
    assert r.terms[1].params == {"k": 256, "correct_only": True}
    assert r.terms[3].params["temperature"] == 0.07
    cls = build("vlm-ood", s, t, vlalign_weight=0, mse_weight=0, im_cst_weight=0)
    assert [x.name for x in cls.terms] == ["cls"]
    with pytest.raises(ConfigError, match="method.student"):
        build("vlm-ood", _cnn(0), t)
    with pytest.raises(ConfigError, match="method.teacher"):
        build("vlm-ood", s, None)
    with pytest.raises(ConfigError, match="method.teacher.texts"):
        build("vlm-ood", s, TextClassifier(_cnn(1), _texts(1)[:5]))
    with pytest.raises(ConfigError, match="method.cls_weight"):
        build("vlm-ood", s, t, cls_weight=0, vlalign_weight=0, mse_weight=0, im_cst_weight=0)
    with pytest.raises(ConfigError, match="vlalign.k"):
        build("vlm-ood", s, t, k=0)
    with pytest.raises(ConfigError, match="model.texts"):
        TextClassifier(_cnn(0), torch.zeros(1, 16))
    with pytest.raises(ConfigError, match="model.image"):  # embedding width != texts' width
        cd.Distiller(TextClassifier(_cnn(0, dim=8), texts), None, [cd.Term("ce")]).build(
            {"x": torch.randn(2, 1, 8, 8), "y": torch.tensor([0, 1])})


def _split(d, classes):
    keep = torch.isin(d.y, torch.tensor(classes)).nonzero().flatten()
    out = d.subset(keep)
    out.tensors["y"] = torch.tensor([classes.index(int(c)) for c in out.y])
    return out


def test_tiny_zero_shot_run():
    tr = _split(cd.data.load("digits", "train"), [0, 1, 2, 3, 4])
    va = _split(cd.data.load("digits", "val"), [0, 1, 2, 3, 4])
    te = _split(cd.data.load("digits", "test"), [5, 6, 7, 8, 9])
    texts = _texts()
    teacher = TextClassifier(_cnn(1), texts[:5]).eval()
    student = TextClassifier(_cnn(2), texts[:5])
    r = build("vlm-ood", student, teacher, correct_only=False)
    d = cd.Distiller(student, teacher, r.terms)
    t = cd.Trainer(d, tr, va, epochs=3, batch_size=64, lr=3e-3, optimizer="adamw",
                   progress=False)
    res = t.fit()
    rows = [row for row in t.log.rows if "train_mse" in row or "train_loss" in row]
    assert rows and 0.0 < res["best_val_acc"] <= 1.0
    student.eval()
    with torch.no_grad():
        mse = lambda: (F.normalize(student.image(tr.x[:200]), dim=-1)  # noqa: E731
                       - F.normalize(teacher.image(tr.x[:200]), dim=-1)).pow(2).sum(-1).mean()
        trained = float(mse())
    fresh = TextClassifier(_cnn(2), texts[:5]).eval()
    with torch.no_grad():
        before = float((F.normalize(fresh.image(tr.x[:200]), dim=-1)
                        - F.normalize(teacher.image(tr.x[:200]), dim=-1)).pow(2).sum(-1).mean())
    assert trained < before  # L-mse pulled the student towards the teacher's space
    student.set_texts(texts[5:])
    acc = cd.evaluate(student, te)["acc"]
    assert 0.0 <= acc <= 1.0
