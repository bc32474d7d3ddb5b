"""CoMD, text-only small-scale form: the SeqKD data built from teacher continuations, the
judge's per-byte answer scores, and tiny 2-round runs (hard and random prompt growth) with
their teacher-token accounting, plus the one-shot SeqKD control at the same budget."""

import functools
import math
import os
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import crossdistill as cd  # noqa: E402
from crossdistill import ConfigError  # noqa: E402
from crossdistill.lm.comd import (  # noqa: E402
    answer_nll,
    answer_units,
    comd,
    continuation_data,
    seqkd_once,
    seqkd_train,
)


def test_continuation_data_trains_on_completions_only():
    ids = torch.tensor([[5, 6, 7, 8, 0, 0], [5, 9, 1, 2, 3, 4]])
    comp = torch.tensor([[False, False, True, True, False, False],
                         [False, False, True, True, True, True]])  # row 0 stopped at 8 (eos)
    d = continuation_data(ids, comp, n_prompt=2, vocab_size=10)
    t = d.tensors
    assert t["labels"].tolist() == [[-100, 7, 8, -100, -100, -100], [-100, 1, 2, 3, 4, -100]]
    assert t["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]
    assert d.num_classes == 10 and d.kinds["labels"] == "tokens"


class Bigram(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.table = nn.Parameter(logits)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


def test_answer_nll_and_units_by_hand():
    table = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]))
    model = Bigram(table)
    ids = torch.tensor([[0, 1, 1, 2]])
    comp = torch.tensor([[False, False, True, True]])  # scored: 1 -> 1, 1 -> 2
    assert float(answer_nll(model, ids, comp)) == pytest.approx(-math.log(0.8) - math.log(0.1))
    assert answer_units(ids, comp).tolist() == [2.0]

    class Tok:
        def decode(self, ids):
            return "é" * len(ids)  # two UTF-8 bytes per token

    assert answer_units(ids, comp, Tok()).tolist() == [4.0]


def gpt2(n_layer, n_embd, seed, vocab):
    from crossdistill.models.hf import create_hf

    torch.manual_seed(seed)
    return create_hf("gpt2", config={"n_layer": n_layer, "n_embd": n_embd, "n_head": 2,
                                     "n_positions": 16, "vocab_size": vocab})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pytest.importorskip("transformers")
    cache = tmp_path_factory.mktemp("tok")
    data = cd.data.load_split("shakespeare", "train", tokenizer="char", block=16,
                              max_chars=5000, cache_dir=str(cache))
    vocab = data.num_classes
    teacher = gpt2(2, 32, 1, vocab)
    cd.Trainer(cd.Distiller(teacher, None, [cd.Term("ce")], task="lm"), data, epochs=1,
               batch_size=16, lr=3e-3, optimizer="adamw", progress=False).fit()
    prompts = data.tensors["input_ids"][:8, :6]
    return {"teacher": teacher.eval(), "prompts": prompts, "vocab": vocab,
            "tokenizer": data.tokenizer}


TRAIN = functools.partial(seqkd_train, epochs=1, batch_size=8, lr=3e-3)


@pytest.mark.parametrize("select", ["hard", "random"])
def test_two_rounds_grow_the_pool_and_count_teacher_tokens(setup, one_thread, select):
    student = gpt2(1, 16, 2, setup["vocab"])
    evals = []
    recs = comd(student, setup["teacher"], setup["prompts"], rounds=2, new_per_round=3,
                select=select, max_new_tokens=6, tokenizer=setup["tokenizer"], seed=0,
                train_fn=TRAIN, eval_fn=lambda m: evals.append(1) or {"ok": 1})
    assert [r["round"] for r in recs] == [1, 2] and len(evals) == 2
    first, second = recs
    assert first["pool"] == 8 and second["pool"] == 8 + first["new_prompts"]
    assert first["new_prompts"] <= 3 and (select == "hard" or first["new_prompts"] == 3)
    if select == "hard":
        assert first["new_prompts"] == min(3, first["hard"])
    # answers: 6 tokens per prompt (no eos); a grown prompt costs 6 (the prompt length)
    assert first["teacher_tokens"] == 8 * 6 + first["new_prompts"] * 6
    grown = first["new_prompts"] * 6 + second["new_prompts"] * 6
    assert second["teacher_tokens"] == first["teacher_tokens"] + grown
    assert all(math.isfinite(r["mean_gap"]) for r in recs)
    assert recs[0]["train"]["epochs"] == 1 and recs[1]["eval"] == {"ok": 1}


def test_huge_margin_grows_nothing_and_seqkd_once_spends_the_budget(setup, one_thread):
    student = gpt2(1, 16, 2, setup["vocab"])
    recs = comd(student, setup["teacher"], setup["prompts"], rounds=1, margin=1e6,
                max_new_tokens=6, train_fn=TRAIN)
    assert recs[0]["hard"] == 0 and recs[0]["new_prompts"] == 0
    out = seqkd_once(gpt2(1, 16, 3, setup["vocab"]), setup["teacher"], setup["prompts"],
                     teacher_tokens=75, max_new_tokens=6, train_fn=TRAIN)
    assert 75 <= out["teacher_tokens"] < 75 + 6 and out["pool"] == 13  # prompts reused


def test_bad_arguments():
    p = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ConfigError, match="comd.select"):
        comd(None, None, p, select="worst")
    with pytest.raises(ConfigError, match="comd.prompts"):
        comd(None, None, torch.zeros(3))
    with pytest.raises(ConfigError, match="comd.rounds"):
        comd(None, None, p, rounds=0)
    with pytest.raises(ConfigError, match="seqkd.teacher_tokens"):
        seqkd_once(None, None, p, teacher_tokens=0)
