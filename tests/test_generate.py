"""lm.generate.sample: the KV-cache path equals the re-forward path token for token (greedy
and seeded sampling), seeded reproducibility, EOS masking, top-k / top-p filters, the
context-length check; and the `crossdistill generate` command on a tiny trained run."""

import pytest
import torch
from torch import nn

from crossdistill import ConfigError
from crossdistill.lm.generate import context_length, filter_logits, sample
from crossdistill.models.hf import create_hf

V = 40


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    cfg = {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 32, "vocab_size": V,
           "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    return create_hf("gpt2", config=cfg)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
def test_cache_equals_reforward(gpt, temperature):
    x = torch.randint(1, V, (4, 6), generator=_gen(3))
    kw = dict(max_new_tokens=16, temperature=temperature, top_k=10, eos_token_id=5)
    a, ma = sample(gpt, x, generator=_gen(1), use_cache=True, **kw)
    b, mb = sample(gpt, x, generator=_gen(1), use_cache=False, **kw)
    assert torch.equal(a, b) and torch.equal(ma, mb)
    assert torch.equal(a[:, :6], x) and a.shape == (4, 22)


def test_left_padded_prompts_match_unpadded(gpt):
    """A left-padded prompt (attention_mask 0 on the pad) continues exactly as it would alone."""
    x = torch.randint(1, V, (1, 5), generator=_gen(4))
    alone, _ = sample(gpt, x, max_new_tokens=8, temperature=0.0)
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), x], 1)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    both, _ = sample(gpt, padded, max_new_tokens=8, temperature=0.0, attention_mask=mask)
    assert torch.equal(both[:, 7:], alone[:, 5:])


def test_seeded_reproducible_and_restores_mode(gpt):
    x = torch.randint(1, V, (3, 4), generator=_gen(5))
    gpt.train()
    a, _ = sample(gpt, x, max_new_tokens=12, generator=_gen(7))
    assert gpt.training  # put back in train mode
    b, _ = sample(gpt, x, max_new_tokens=12, generator=_gen(7))
    c, _ = sample(gpt, x, max_new_tokens=12, generator=_gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not any(p.grad is not None for p in gpt.parameters())


class _Scripted(nn.Module):
    """A non-HF 'model' that always predicts next = (last + 1) % 10: EOS timing is known."""

    def forward(self, ids):
        z = torch.full((*ids.shape, 10), -1e4)
        z.scatter_(-1, ((ids + 1) % 10)[..., None], 0.0)
        return z


def test_eos_masking_and_pad():
    x = torch.tensor([[1], [6], [9]])
    ids, comp = sample(_Scripted(), x, max_new_tokens=5, temperature=0.0, eos_token_id=3,
                       pad_token_id=0)
    assert ids.tolist() == [[1, 2, 3, 0, 0, 0], [6, 7, 8, 9, 0, 1], [9, 0, 1, 2, 3, 0]]
    assert comp.tolist() == [
        [False, True, True, False, False, False],  # 2, 3=EOS (included), then pad
        [False, True, True, True, True, True],  # no EOS within 5 tokens
        [False, True, True, True, True, False],
    ]


def test_all_rows_stop_early_still_full_length():
    ids, comp = sample(_Scripted(), torch.tensor([[1], [2]]), max_new_tokens=6,
                       temperature=0.0, eos_token_id=3)
    assert ids.shape == comp.shape == (2, 7)
    assert comp.sum(1).tolist() == [2, 1]


def test_filters():
    z = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(z, top_k=2)).tolist() == [[False, False, True, True]]
    p = z.softmax(-1)[0]  # 0.644, 0.237, 0.087, 0.032
    kept = ~torch.isinf(filter_logits(z, top_p=float(p[0] + 0.01)))
    assert kept.tolist() == [[True, True, False, False]]
    assert (~torch.isinf(filter_logits(z, top_p=0.1))).tolist() == [[True, False, False, False]]
    for _ in range(20):  # sampling never leaves the filtered set
        ids, _ = sample(_Scripted(), torch.tensor([[4]]), max_new_tokens=1, top_k=1,
                        generator=_gen(_))
        assert ids[0, 1] == 5


def test_context_length_checked(gpt):
    assert context_length(gpt) == 32
    with pytest.raises(ConfigError) as e:
        sample(gpt, torch.ones(1, 20, dtype=torch.long), max_new_tokens=13)
    assert e.value.field == "max_new_tokens" and "32 positions" in str(e.value)
    assert "at most" not in str(e.value) and "<= 12" in str(e.value)
    sample(gpt, torch.ones(1, 20, dtype=torch.long), max_new_tokens=12)  # fits exactly


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1.0),
                                 dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_settings(gpt, bad):
    kw = {"max_new_tokens": 2, **bad}
    with pytest.raises(ConfigError) as e:
        sample(gpt, torch.ones(1, 2, dtype=torch.long), **kw)
    assert e.value.field == next(iter(bad))
