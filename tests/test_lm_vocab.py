"""Same-tokenizer losses across vocabularies: padded embedding tables of one tokenizer are
sliced to the tokenizer's size; a teacher with another tokenizer is refused before training;
a teacher store made with another tokenizer or context length is refused."""

import json

import pytest
import yaml

from crossdistill.cli import main

pytest.importorskip("transformers")

DATA = {"name": "shakespeare", "batch_size": 8,
        "params": {"vocab_size": 300, "block": 16, "max_chars": 5000}}
TRAIN = {"epochs": 1, "progress": False}
GPT = {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 32}


def _write(tmp_path, cfg, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def _data_tokenizer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from crossdistill.data.text_source import shakespeare_split

    return shakespeare_split("train", **DATA["params"]).tokenizer


def test_padded_teacher_table_is_sliced_to_the_tokenizer(tmp_path, monkeypatch, capsys):
    from crossdistill.models.hf import create_hf, export_hf

    tok = _data_tokenizer(tmp_path, monkeypatch)
    n = len(tok)
    export_hf(create_hf("gpt2", config={**GPT, "vocab_size": n + 20}), tmp_path / "t", tok)
    cfg = {
        "teacher": {"hf_path": str(tmp_path / "t"), "inputs": {"input_ids": "input_ids"}},
        "student": {"hf": "gpt2", "config": {**GPT, "vocab_size": n + 4},
                    "inputs": {"input_ids": "input_ids"}},
        "data": DATA, "terms": [{"loss": "ce"}, {"loss": "fkl"}], "train": TRAIN,
    }
    code = main(["train", str(_write(tmp_path, cfg)), "--out", str(tmp_path / "run")])
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows and rows[-1].get("val_bpb", 0) > 0


def test_teacher_without_the_tokenizer_is_refused(tmp_path, monkeypatch, capsys):
    from crossdistill.models.hf import create_hf, export_hf

    tok = _data_tokenizer(tmp_path, monkeypatch)
    export_hf(create_hf("gpt2", config={**GPT, "vocab_size": len(tok) + 20}), tmp_path / "t")
    cfg = {
        "teacher": {"hf_path": str(tmp_path / "t"), "inputs": {"input_ids": "input_ids"}},
        "student": {"hf": "gpt2", "config": GPT, "inputs": {"input_ids": "input_ids"}},
        "data": DATA, "terms": [{"loss": "ce"}, {"loss": "jsd"}], "train": TRAIN,
    }
    code = main(["train", str(_write(tmp_path, cfg)), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "terms.1" in err and "cross-tokenizer" in err, err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("change,what", [({"block": 8}, "context length"),
                                         ({"vocab_size": 280}, "tokenizer")])
def test_store_of_another_tokenizer_or_context_is_refused(tmp_path, monkeypatch, capsys, change,
                                                          what):
    monkeypatch.chdir(tmp_path)
    teacher = {"student": {"hf": "gpt2", "config": GPT, "inputs": {"input_ids": "input_ids"}},
               "data": DATA, "train": TRAIN}
    tpath = _write(tmp_path, teacher, "teacher.yaml")
    assert main(["train", str(tpath), "--out", str(tmp_path / "teacher")]) == 0
    ckpt = str(tmp_path / "teacher" / "student.safetensors")
    hf = {"hf": "gpt2", "config": GPT, "inputs": {"input_ids": "input_ids"}}
    cache = _write(tmp_path, {"teacher": {**hf, "checkpoint": ckpt}, "student": hf,
                              "data": DATA, "terms": [{"loss": "fkl"}]}, "cache.yaml")
    code = main(["cache-teacher", str(cache), "--out", str(tmp_path / "store"), "--topk", "4"])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    data = {**DATA, "params": {**DATA["params"], **change}}
    cfg = {"teacher": {"store": str(tmp_path / "store")},
           "student": {"hf": "gpt2", "config": GPT, "inputs": {"input_ids": "input_ids"}},
           "data": data, "terms": [{"loss": "ce"}, {"loss": "topk"}], "train": TRAIN}
    code = main(["train", str(_write(tmp_path, cfg)), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "teacher.store" in err and f"another {what}" in err, err
