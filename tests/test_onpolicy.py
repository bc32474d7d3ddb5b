"""The onpolicy prepare stage (GKD / SeqKD): prompt and after-EOS masking on a crafted batch,
per-sample branch frequencies, determinism, the replay buffer through a checkpoint, the
checks before training, and a tiny end-to-end GKD run + `crossdistill generate` via the CLI."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
import yaml
from cli_helpers import one_line_error
from torch import nn

from crossdistill import ConfigError, Distiller, Term
from crossdistill.cli import main
from crossdistill.lm.onpolicy import OnPolicy, token_byte_lengths
from crossdistill.models.hf import create_hf
from crossdistill.text.tokenizer import encode_with_bytes, train_bpe, train_char


@pytest.fixture(scope="module")
def tok():
    return train_char("abcdefghij")  # ids: 0 <|endoftext|> (eos = pad), 1 <unk>, a..j = 2..11


class _Next(nn.Module):
    """Predicts next = (last + step) % vocab, greedily: known continuations, no HF."""

    def __init__(self, step=1, vocab=12):
        super().__init__()
        self.step, self.vocab = step, vocab

    def forward(self, ids):
        z = torch.full((*ids.shape, self.vocab), -1e4)
        return z.scatter(-1, ((ids + self.step) % self.vocab)[..., None], 0.0)


def _distiller(tok, student=None, teacher=None):
    teacher = teacher if teacher is not None else _Next(2)
    return SimpleNamespace(student=student or _Next(1), teachers={"teacher": teacher},
                           teacher_io={"teacher": None}, data=SimpleNamespace(tokenizer=tok))


def _state(d, seed=0, step=0):
    return SimpleNamespace(distiller=d, generator=torch.Generator().manual_seed(seed), step=step)


def _batch(ids):
    ids = torch.as_tensor(ids)
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], 7)], 1)
    return {"input_ids": ids, "labels": labels, "token_bytes": torch.ones_like(ids),
            "attention_mask": torch.ones_like(ids), "idx": torch.arange(len(ids))}


def test_prompt_and_after_eos_masked(tok):
    stage = OnPolicy(prompt_tokens=3, lmbda=1.0, temperature=0.0)
    rows = [[2, 3, 4, 9, 9, 9, 9, 9], [8, 9, 10, 9, 9, 9, 9, 9]]
    out = stage(_batch(rows), _state(_distiller(tok)))
    # row 0: c -> d e f g h (no EOS); row 1: i j -> 11 then 0 = EOS (predicted), then pad
    assert out["input_ids"].tolist() == [[2, 3, 4, 5, 6, 7, 8, 9], [8, 9, 10, 11, 0, 0, 0, 0]]
    assert out["labels"].tolist() == [[-100, -100, 5, 6, 7, 8, 9, -100],
                                      [-100, -100, 11, 0, -100, -100, -100, -100]]
    assert out["attention_mask"].tolist() == [[1] * 8, [1, 1, 1, 1, 1, 0, 0, 0]]
    eos_bytes = len("<|endoftext|>")
    assert out["token_bytes"].tolist() == [[0, 0, 1, 1, 1, 1, 1, 0],
                                           [0, 0, 1, eos_bytes, 0, 0, 0, 0]]
    assert out["continuation_source"].tolist() == [1, 1]


def test_data_branch_masked_like_generated(tok):
    """lmbda 0: the dataset continuation, with the same prompt / window masking."""
    b = _batch([[2, 3, 4, 5, 6, 7]])
    out = OnPolicy(prompt_tokens=2, lmbda=0.0, max_new_tokens=3)(b, _state(_distiller(tok)))
    assert out["input_ids"].tolist() == [[2, 3, 4, 5, 6, 0]]
    assert out["labels"].tolist() == [[-100, 4, 5, 6, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0]]
    assert out["token_bytes"].tolist() == [[0, 1, 1, 1, 0, 0]]
    assert b["labels"][0, 0] == 3  # the caller's batch is not modified


def test_branch_frequencies_per_sample(tok):
    n = 4000
    ids = torch.randint(2, 12, (n, 1))
    rows = torch.cat([ids, (ids + 5) % 12, torch.zeros(n, 2, dtype=torch.long)], 1)
    stage = OnPolicy(prompt_tokens=2, lmbda=0.3, seq_kd=0.2, temperature=0.0)
    out = stage(_batch(rows), _state(_distiller(tok), seed=3))
    src = out["continuation_source"]
    freq = [(src == k).float().mean().item() for k in (0, 1, 2)]
    assert abs(freq[1] - 0.3) < 0.03 and abs(freq[2] - 0.2) < 0.03 and abs(freq[0] - 0.5) < 0.03
    step = (out["input_ids"][:, 2] - rows[:, 1]) % 12  # who wrote the continuation
    assert torch.equal(step[src == 1], torch.ones_like(step[src == 1]))  # the student: +1
    assert torch.equal(step[src == 2], torch.full_like(step[src == 2], 2))  # the teacher: +2
    assert torch.equal(out["input_ids"][src == 0], rows[src == 0])  # the data


def test_deterministic_under_seed(tok):
    torch.manual_seed(0)
    gpt = create_hf("gpt2", config={"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 16,
                                    "vocab_size": 12, "eos_token_id": 0, "pad_token_id": 0})
    rows = torch.randint(1, 12, (8, 10))
    d = _distiller(tok, student=gpt)
    stage = OnPolicy(prompt_tokens=3, lmbda=0.5)
    a = stage(_batch(rows), _state(d, seed=5))
    b = stage(_batch(rows), _state(d, seed=5))
    c = stage(_batch(rows), _state(d, seed=6))
    for k in ("input_ids", "labels", "attention_mask", "token_bytes", "continuation_source"):
        assert torch.equal(a[k], b[k])
    assert not torch.equal(a["input_ids"], c["input_ids"])


def _steps(stage, d, batches, start):
    return [stage(b, _state(d, seed=100 + s, step=s)) for s, b in enumerate(batches) if s >= start]


def test_replay_buffer_survives_checkpoint(tok, tmp_path):
    """regenerate_every 3: steps 1, 2, 4, 5 reuse buffered generations; a stage restored
    from a checkpoint taken after step 2 continues exactly as the uninterrupted one."""
    torch.manual_seed(1)
    batches = [_batch(torch.randint(2, 12, (6, 6))) for _ in range(6)]
    kw = dict(prompt_tokens=2, lmbda=0.7, temperature=0.0, regenerate_every=3, buffer_size=8)
    d = _distiller(tok)
    full = _steps(OnPolicy(**kw), d, batches, 0)
    first = OnPolicy(**kw)
    _steps(first, d, batches[:3], 0)
    assert len(first.buffer["input_ids"]) <= 8
    path = tmp_path / "stage.pt"
    torch.save(first.state_dict(), path)
    resumed = OnPolicy(**kw)
    resumed.load_state_dict(torch.load(path, weights_only=True))
    rest = _steps(resumed, d, batches, 3)
    for a, b in zip(full[3:], rest, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    s1 = full[1]  # a replay step: student rows come from step 0's generations
    rows = s1["continuation_source"] == 1
    gen0 = full[0]["input_ids"][full[0]["continuation_source"] == 1]
    assert rows.any() and all((gen0 == r).all(1).any() for r in s1["input_ids"][rows])


def test_byte_table_matches_encode_with_bytes():
    text = "To be, or not to be: that is the question. Naïve café 日本語 🙂 " * 3
    bpe = train_bpe(text, 300)
    ids, nbytes = encode_with_bytes(bpe, text)
    table = token_byte_lengths(bpe)
    assert table[torch.tensor(ids)].tolist() == nbytes


@pytest.mark.parametrize("kw,field", [
    (dict(lmbda=1.5), "prepare.lmbda"),
    (dict(seq_kd=-0.1), "prepare.seq_kd"),
    (dict(lmbda=0.6, seq_kd=0.5), "prepare.seq_kd"),
])
def test_bad_mix(kw, field):
    with pytest.raises(ConfigError) as e:
        OnPolicy(**kw)
    assert e.value.field == field


def test_checks_before_generation(tok):
    b = _batch(torch.randint(2, 12, (2, 8)))
    with pytest.raises(ConfigError, match="fewer than the block's 8") as e:
        OnPolicy(prompt_tokens=8)(b, _state(_distiller(tok)))
    assert e.value.field == "prepare.prompt_tokens"
    with pytest.raises(ConfigError) as e:
        OnPolicy(prompt_tokens=4, max_new_tokens=5)(b, _state(_distiller(tok)))
    assert e.value.field == "prepare.max_new_tokens"
    short = create_hf("gpt2", config={"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 6,
                                      "vocab_size": 12})
    with pytest.raises(ConfigError, match="6 positions of the teacher") as e:
        OnPolicy(prompt_tokens=4, lmbda=0.0, seq_kd=1.0)(b, _state(_distiller(tok, teacher=short)))
    assert e.value.field == "prepare.max_new_tokens"
    d = _distiller(tok)
    d.teachers = {"a": _Next(), "b": _Next()}
    d.teacher_io = {"a": None, "b": None}
    with pytest.raises(ConfigError, match="choose one of a, b"):
        OnPolicy(prompt_tokens=2, lmbda=0.0, seq_kd=1.0)(b, _state(d))
    d.data = None
    with pytest.raises(ConfigError) as e:
        OnPolicy(prompt_tokens=2, teacher_model="a")(b, _state(d))
    assert e.value.field == "prepare.tokenizer"


def test_buffer_is_in_the_distillers_checkpoint_state(tok):
    cfg = {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 16, "vocab_size": 12}
    torch.manual_seed(0)
    student, teacher = create_hf("gpt2", config=cfg), create_hf("gpt2", config=cfg)
    stage = OnPolicy(prompt_tokens=2, lmbda=1.0, regenerate_every=2, tokenizer=tok)
    d = Distiller(student, teacher, [Term("jsd", beta=0.5)], task="lm", prepare=[stage])
    b = _batch(torch.randint(2, 12, (4, 8)))
    d.build(b)
    d.train()
    out = d(b)
    assert torch.isfinite(out.total)
    state = d.trainable_state()
    assert "prepare.0._extra_state" in state
    assert len(state["prepare.0._extra_state"]["buffer"]["input_ids"]) == 4
    stage.buffer = {}
    d.load_trainable_state(state)
    assert len(stage.buffer["input_ids"]) == 4


DATA = {"name": "shakespeare", "batch_size": 8,
        "params": {"tokenizer": "bpe", "vocab_size": 300, "block": 16, "max_chars": 4000,
                   "cache_dir": "tok"}}
TRAIN = {"epochs": 1, "progress": False, "optimizer": "adamw", "lr": 0.003}
GPT = {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 16}


def _configs(tmp_path, prepare):
    teacher = {"student": {"hf": "gpt2", "config": GPT, "inputs": {"input_ids": "input_ids"}},
               "data": DATA, "train": TRAIN}
    (tmp_path / "teacher.yaml").write_text(yaml.safe_dump(teacher))
    gkd = {"teacher": {"from_config": "teacher.yaml"},
           "student": {"hf": "gpt2", "config": GPT, "inputs": {"input_ids": "input_ids"}},
           "data": DATA, "prepare": [prepare],
           "terms": [{"loss": "jsd", "beta": 0.5}], "train": TRAIN}
    name = "gkd.yaml" if prepare.get("lmbda") == 0.5 else "bad.yaml"
    (tmp_path / name).write_text(yaml.safe_dump(gkd))
    return name


@pytest.fixture(scope="module")
def gkd_run(tmp_path_factory):
    """Two tiny GPT-2s through the CLI: the teacher trained and cached, then one GKD epoch
    (lmbda 0.5, a replay buffer regenerated every 2 steps) into ``run``."""
    root = tmp_path_factory.mktemp("gkd")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("CROSSDISTILL_QUIET", "1")
        cfg = _configs(root, {"name": "onpolicy", "prompt_tokens": 4, "lmbda": 0.5,
                              "regenerate_every": 2})
        assert main(["train", cfg, "--out", "run"]) == 0
    return root


def test_end_to_end_gkd_and_generate(gkd_run, monkeypatch, capsys):
    monkeypatch.chdir(gkd_run)
    res = json.loads((gkd_run / "run" / "results.json").read_text())
    assert math.isfinite(res["test_bpb"]) and res["test_bpb"] > 0
    capsys.readouterr()
    argv = ["generate", "run", "--prompt", "To be", "--max-new-tokens", "8", "--seed", "3"]
    assert main(argv) == 0
    a = capsys.readouterr().out
    assert main(argv) == 0
    assert a == capsys.readouterr().out and a.startswith("To be")
    err = one_line_error(capsys, [*argv[:4], "--max-new-tokens", "40"])
    assert "--max-new-tokens" in err and "16 positions" in err


@pytest.mark.parametrize("prepare,field", [
    ({"lmbda": 1.5}, "prepare.0.lmbda"),
    ({"lmbda": 0.7, "seq_kd": 0.7}, "prepare.seq_kd"),
    ({"prompt_tokens": 16}, "prepare.prompt_tokens"),
    ({"temperature": -1}, "prepare.0.temperature"),
])
def test_cli_refuses_before_training(gkd_run, monkeypatch, capsys, prepare, field):
    monkeypatch.chdir(gkd_run)
    monkeypatch.setenv("CROSSDISTILL_QUIET", "1")
    cfg = _configs(gkd_run, {"name": "onpolicy", **prepare})
    err = one_line_error(capsys, ["train", cfg, "--check"])
    assert f"error: {field}:" in err


def test_generate_refuses_non_lm_runs(tmp_path, capsys):
    err = one_line_error(capsys, ["generate", str(tmp_path), "--prompt", "x"])
    assert "run_dir" in err and "config.yaml" in err
    err = one_line_error(capsys, ["generate", str(tmp_path), "--prompt", "x", "--top-p", "0"])
    assert "--top-p" in err
    err = one_line_error(capsys, ["generate", str(tmp_path), "--prompt", "x", "--seed", "-1"])
    assert "--seed" in err
    cfg = {"student": {"model": "cnn"}, "data": {"name": "digits"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    err = one_line_error(capsys, ["generate", str(tmp_path), "--prompt", "x"])
    assert "not a language model" in err
