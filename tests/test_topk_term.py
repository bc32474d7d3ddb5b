"""Sparse top-k terms read a teacher store's top-k signal as stored (tap ``topk``): values
against the full-vocabulary divergences, gradients, and a tiny end-to-end run."""

import pytest
import torch
from torch import nn

import crossdistill as cd
from crossdistill import ConfigError
from crossdistill.adapters import ModelIO
from crossdistill.losses import divergences as D
from crossdistill.losses.sequence import topk
from crossdistill.signals import TopK
from crossdistill.teachers import TeacherStore, cache_teacher, topk_decode

V, L = 9, 5


class TinyLM(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(V, 8)
        self.head = nn.Linear(8, V)

    def forward(self, input_ids):
        return self.head(torch.tanh(self.emb(input_ids)))


def _signal(z, k):
    vals, ids = z.topk(k, -1)
    return TopK(vals, ids, torch.logsumexp(z, -1))


@pytest.mark.parametrize("div", D.NAMES)
def test_k_equal_v_minus_1_is_the_full_divergence(div):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 4, V, generator=g), torch.randn(3, 4, V, generator=g)
    got = topk(s, _signal(t, V - 1), divergence=div, beta=0.3, alpha=0.2)
    want = D.by_name(div, t.log_softmax(-1), s.log_softmax(-1), beta=0.3, alpha=0.2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_fkl_is_topk_kl_and_a_lower_bound():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, V, generator=g), torch.randn(6, V, generator=g) * 3
    sig = _signal(t, 3)
    got = topk(s, sig)
    torch.testing.assert_close(got, D.topk_kl(sig.log_probs(), sig.indices, s.log_softmax(-1)))
    decoded = topk_decode(sig.values, sig.indices, sig.lse, V)
    full = D.kl(decoded.log_softmax(-1), s.log_softmax(-1))
    assert (got <= full + 1e-6).all()  # merging classes never increases a KL


def test_golden_two_bucket_value():
    # k = 1 of V = 3: teacher p = (0.5, rest 0.5); student q = softmax(0, 0, 0) = 1/3 each
    log2 = torch.log(torch.tensor(2.0))
    t = TopK(torch.tensor([[0.0]]), torch.tensor([[0]]), log2.view(1))
    s = torch.zeros(1, 3)
    want = 0.5 * torch.log(torch.tensor(1.5)) + 0.5 * torch.log(torch.tensor(0.75))
    torch.testing.assert_close(topk(s, t)[0], want)


@pytest.mark.parametrize("div", D.NAMES)
def test_gradients(div):
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, V, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, V, generator=g, dtype=torch.float64)
    sig = _signal(t, 4)
    torch.autograd.gradcheck(lambda x: topk(x, sig, divergence=div).sum(), (s,))


def _store(tmp_path, k=3):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (12, L), generator=g)
    labels = torch.randint(0, V, (12, L), generator=g)
    labels[::3, 3:] = -100
    data = cd.data.Dataset({"input_ids": ids, "labels": labels, "idx": torch.arange(12)},
                           {"input_ids": "tokens", "labels": "tokens", "idx": "id"},
                           name="toy", num_classes=V)
    teacher = TinyLM(seed=7).eval()
    io = ModelIO(inputs={"input_ids": "input_ids"})
    cache_teacher(teacher, data, tmp_path / "store", io=io, topk=k, batch_size=4, progress=False)
    return TeacherStore(tmp_path / "store"), data, teacher


def test_store_tap_and_end_to_end(tmp_path):
    store, data, teacher = _store(tmp_path)
    assert "topk" in store.taps
    sig = store.lookup(torch.tensor([0, 5]), "topk")
    assert isinstance(sig, TopK) and sig.values.shape == (2, L, 3)
    d = cd.Distiller(TinyLM(seed=1), store, [cd.Term("ce"), cd.Term("topk", divergence="jsd")],
                     task="lm")
    assert [str(x) for x in d.terms[1].teacher] == ["topk"]  # the loss's default teacher tap
    res = cd.Trainer(d, data, data, data, epochs=2, batch_size=4, lr=0.1, progress=False,
                     accumulate=2).fit()
    assert res["test_bpb"] > 0


def test_online_teacher_with_topk_tap_is_a_clear_error():
    with pytest.raises(ConfigError, match="top-k teacher store"):
        cd.Distiller(TinyLM(), TinyLM(seed=3), [cd.Term("topk")], task="lm")


def test_online_teacher_with_observed_tap_is_a_clear_error():
    with pytest.raises(ConfigError, match="observed-token teacher store"):
        cd.Distiller(TinyLM(), TinyLM(seed=3), [cd.Term("fkl", teacher="token_logprob")],
                     task="lm")
