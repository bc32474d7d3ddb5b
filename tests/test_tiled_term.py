"""The ``tiled`` term: a token divergence from hidden states and output-layer weights (param
taps), equal in value and gradient to the same divergence on the models' logits, with the
full logits never built in training."""

import pytest
import torch

import crossdistill as cd

pytest.importorskip("transformers")
from crossdistill.models.hf import create_hf  # noqa: E402

CFG = {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 16, "vocab_size": 50}
TAPS = ["transformer.ln_f", "lm_head:weight"]
IO = {"inputs": {"input_ids": "input_ids"}}


def _models():
    torch.manual_seed(0)
    s = create_hf("gpt2", config={**CFG, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                                  "attn_pdrop": 0.0})
    torch.manual_seed(1)
    t = create_hf("gpt2", config={**CFG, "n_embd": 24})
    return s, t


def _batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 50, (3, 10), generator=g)
    labels = torch.randint(0, 50, (3, 10), generator=g)
    labels[0, 4:] = -100
    labels[2, 1:] = -100
    return {"input_ids": ids, "labels": labels, "idx": torch.arange(3)}


def _run(term):
    s, t = _models()
    d = cd.Distiller(s, t, [term], task="lm", io=IO, teacher_io=IO)
    d.build(_batch())
    d.train()
    out = d(_batch())
    out.total.backward()
    grads = {n: p.grad.clone() for n, p in d.student.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("div", ["fkl", "jsd", "srkl"])
def test_tiled_equals_the_logits_loss(div):
    ref, g_ref = _run(cd.Term(div) if div != "jsd" else cd.Term("jsd", beta=0.3))
    kw = {"beta": 0.3} if div == "jsd" else {}
    got, g_got = _run(cd.Term("tiled", student=TAPS, teacher=TAPS, divergence=div,
                              token_chunk=4, vocab_chunk=16, **kw))
    torch.testing.assert_close(got.total, ref.total, rtol=1e-5, atol=1e-6)
    assert set(g_got) == set(g_ref)
    for k, v in g_ref.items():
        torch.testing.assert_close(g_got[k], v, rtol=1e-4, atol=1e-6, msg=k)
    assert got.logits.shape[1] == 1 and ref.logits.shape[1] == 10  # no full logits built


def test_tiled_needs_hidden_and_weight_taps():
    s, t = _models()
    with pytest.raises(cd.ConfigError, match="two or three taps"):
        d = cd.Distiller(s, t, [cd.Term("tiled", student=["transformer.ln_f"],
                                        teacher=["transformer.ln_f"])],
                         task="lm", io=IO, teacher_io=IO)
        d.build(_batch())


def test_param_tap_without_the_parameter_is_a_clear_error():
    s, t = _models()
    with pytest.raises(cd.ConfigError, match="has no bias"):
        cd.Distiller(s, t, [cd.Term("tiled", student=[*TAPS, "lm_head:bias"], teacher=TAPS)],
                     task="lm", io=IO, teacher_io=IO)
