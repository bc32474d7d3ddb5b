"""Issue 14's bad input: each is one clear ConfigError (exit 2 from the CLI) before training."""

import pytest
import torch
import yaml
from cli_helpers import one_line_error

import crossdistill as cd
from crossdistill.errors import ConfigError
from crossdistill.models.dual import DualEncoder, bert_tower, hf_tower


def _bert_dir(tmp_path, tokenizer: bool):
    from transformers import BertConfig, BertModel

    d = tmp_path / ("with_tok" if tokenizer else "no_tok")
    BertModel(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32)).save_pretrained(d)
    if tokenizer:
        (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                                               + [chr(97 + i) for i in range(26)]))
    return d


def test_text_model_without_its_tokenizer(tmp_path):
    d = _bert_dir(tmp_path, tokenizer=False)
    with pytest.raises(ConfigError, match="model.text.*tokenizer files are missing"):
        hf_tower(d)
    with pytest.raises(ConfigError, match="model.text.*tokenizer files are missing"):
        cd.models.create("dual-encoder", img_size=8, text=str(d))
    with pytest.raises(ConfigError, match="data.tokenizer.*tokenizer files are missing"):
        cd.data.load_split("digit_captions", "val", images="digits", tokenizer=str(d), limit=10)
    with pytest.raises(ConfigError, match="data.tokenizer.*exists"):
        cd.data.load_split("digit_captions", "val", images="digits",
                           tokenizer=str(tmp_path / "nowhere"), limit=10)
    ok = _bert_dir(tmp_path, tokenizer=True)
    tower = hf_tower(ok, dim=8)
    data = cd.data.load_split("digit_captions", "val", images="digits", tokenizer=str(ok),
                              limit=10, max_tokens=16)
    with torch.no_grad():
        assert tower(data["caption_ids"][:, 0], data["caption_mask"][:, 0]).shape == (10, 8)


def test_token_ids_from_another_tokenizer(tmp_path):
    data = cd.data.load_split("digit_captions", "train", images="digits", tokenizer="minilm",
                              limit=64, max_tokens=24)
    va = cd.data.load_split("digit_captions", "val", images="digits", tokenizer="minilm",
                            limit=20, max_tokens=24)
    m = DualEncoder(cd.models.create("cnn", num_classes=10, in_channels=1, img_size=8,
                                     channels=(8,)),
                    bert_tower(vocab_size=100, n_layer=1, hidden=16, heads=2, max_tokens=24), 8)
    d = cd.Distiller(m, None, [cd.Term("clip", student=[m.image_tap, m.text_tap], teacher=None)],
                     io=m.io(), task={"name": "retrieval", "inputs": list(m.io()["inputs"])},
                     prepare=[{"name": "pick_caption"}])
    with pytest.raises(ConfigError, match="model.text.*vocabulary of 100"):
        cd.Trainer(d, data, va, epochs=1, batch_size=32, progress=False).fit()


def test_gallery_smaller_than_k_before_training():
    tr = cd.data.load_split("digit_captions", "train", images="digits", tokenizer="char",
                            limit=64, max_tokens=24)
    va = cd.data.load_split("digit_captions", "val", images="digits", tokenizer="char",
                            limit=8, max_tokens=24)
    m = DualEncoder(cd.models.create("cnn", num_classes=10, in_channels=1, img_size=8,
                                     channels=(8,)),
                    bert_tower(vocab_size=len(tr.tokenizer), n_layer=1, hidden=16, heads=2,
                               max_tokens=24), 8)
    d = cd.Distiller(m, None, [cd.Term("clip", student=[m.image_tap, m.text_tap], teacher=None)],
                     io=m.io(), task={"name": "retrieval", "inputs": list(m.io()["inputs"]),
                                      "ks": [1, 5, 10]},
                     prepare=[{"name": "pick_caption"}])
    t = cd.Trainer(d, tr, va, epochs=1, batch_size=32, progress=False)
    with pytest.raises(ConfigError, match="task.ks.*val split's gallery of 8"):
        t.fit()
    assert d.step == 0  # nothing trained


def test_embedding_sizes_without_a_projector():
    from crossdistill.losses.similarity import CLIPLoss

    with pytest.raises(ConfigError, match="clip.student.*projector"):
        CLIPLoss([(4, 8), (4, 6)])


def test_captions_for_classes_with_no_images():
    from crossdistill.data.captions import class_captions, class_prompts

    with pytest.raises(ConfigError, match="zero_shot.classes"):
        class_captions([3, 12])
    with pytest.raises(ConfigError, match="zero_shot.classes"):
        class_prompts(None, [])
    with pytest.raises(ConfigError, match="data.zero_shot"):  # a split without 5-9 images
        cd.data.load_split("digit_captions", "test", images="digits", tokenizer="char",
                           zero_shot=True, limit=3)


def test_cli_exits_2_for_a_text_model_without_tokenizer(tmp_path, capsys):
    d = _bert_dir(tmp_path, tokenizer=False)
    cfg = {"student": {"model": "dual-encoder", "img_size": 8, "image": "cnn", "text": str(d),
                       "inputs": {"image": "x", "ids": "caption_ids", "mask": "caption_mask"}},
           "data": {"name": "digit_captions", "batch_size": 32,
                    "params": {"images": "digits", "tokenizer": "char"}},
           "task": {"name": "retrieval", "inputs": ["image", "ids", "mask"]},
           "terms": [{"loss": "clip", "student": ["image.fc", "text_out"], "teacher": None}],
           "prepare": [{"name": "pick_caption"}],
           "train": {"epochs": 1, "progress": False}}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()  # save_pretrained's own progress output above
    line = one_line_error(capsys, ["train", str(p), "--out", str(tmp_path / "run")])
    assert "model.text" in line or "student.text" in line
    assert "tokenizer files are missing" in line
