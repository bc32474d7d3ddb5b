import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from crossdistill.errors import ConfigError  # noqa: E402
from crossdistill.models.hf import create_hf, export_hf  # noqa: E402
from crossdistill.taps import Capture, Tap  # noqa: E402

TINY = {"n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 64, "n_positions": 32}


@pytest.fixture
def gpt2(one_thread):
    torch.manual_seed(0)
    return create_hf("gpt2", config=TINY).eval()


def _ids(n=2, t=10):
    return torch.randint(0, 64, (n, t), generator=torch.Generator().manual_seed(1))


def test_random_init_shapes_and_marks(gpt2):
    out = gpt2(input_ids=_ids())
    assert out.logits.shape == (2, 10, 64)
    assert gpt2.is_hf and gpt2.family == "hf"
    assert gpt2.stages == ["transformer.h.0", "transformer.h.1"]
    assert gpt2.feature_path == "lm_head"
    assert gpt2.config._attn_implementation == "sdpa"


def test_heads(one_thread):
    cls = create_hf("gpt2", config={**TINY, "num_labels": 3}, head="sequence_classification")
    cls.config.pad_token_id = 0
    assert cls(input_ids=_ids()).logits.shape == (2, 3)
    base = create_hf("gpt2", config=TINY, head="base")
    assert base(input_ids=_ids()).last_hidden_state.shape == (2, 10, 32)
    bert = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2,
            "intermediate_size": 64, "vocab_size": 64}
    mlm = create_hf("bert", config=bert, head="masked_lm", attn_implementation="eager")
    assert mlm(input_ids=_ids()).logits.shape == (2, 10, 64)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"hf": "gpt3"}, ["student.hf", "gpt3", "gpt2"]),
        ({"hf": "gpt2", "config": {"n_embdd": 32}}, ["student.config.n_embdd", "n_embd"]),
        ({"hf": "gpt2", "head": "seq2seq"}, ["student.head", "causal_lm"]),
        ({"hf": "gpt2", "attn_implementation": "flash"}, ["attn_implementation", "sdpa"]),
        ({}, ["exactly one"]),
        ({"hf": "gpt2", "hf_path": "x"}, ["exactly one"]),
    ],
)
def test_config_errors(kwargs, words):
    with pytest.raises(ConfigError) as e:
        create_hf(**kwargs)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_hf_path_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such directory"):
        create_hf(hf_path=str(tmp_path / "missing"))
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="no config.json.*weights.safetensors"):
        create_hf(hf_path=str(tmp_path))
    pick = tmp_path / "pickled"
    pick.mkdir()
    (pick / "config.json").write_text('{"model_type": "gpt2"}')
    (pick / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ConfigError, match="only pickle weights.*pytorch_model.bin") as e:
        create_hf(hf_path=str(pick), field="teacher")
    assert str(e.value).startswith("teacher.hf_path")


def test_export_round_trip(gpt2, tmp_path):
    from transformers import AutoModel, AutoModelForCausalLM

    out = export_hf(gpt2, tmp_path / "student")
    files = set(os.listdir(out))
    assert "config.json" in files and "model.safetensors" in files
    assert not any(f.endswith(".bin") for f in files)
    ids = _ids()
    with torch.no_grad():
        ref = gpt2(input_ids=ids).logits
        ref_h = gpt2.transformer(input_ids=ids).last_hidden_state
        lm = AutoModelForCausalLM.from_pretrained(out, local_files_only=True,
                                                  use_safetensors=True).eval()
        torch.testing.assert_close(lm(input_ids=ids).logits, ref, rtol=0, atol=0)
        base = AutoModel.from_pretrained(out, local_files_only=True, use_safetensors=True).eval()
        torch.testing.assert_close(base(input_ids=ids).last_hidden_state, ref_h, rtol=0, atol=0)
    again = create_hf(hf_path=str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, ref, rtol=0, atol=0)
    assert again.is_hf


def test_export_refuses_plain_module(tmp_path):
    with pytest.raises(ConfigError, match="PreTrainedModel"):
        export_hf(torch.nn.Linear(2, 2), tmp_path)


def test_taps_inside_hf(gpt2):
    with torch.no_grad():
        probe = gpt2.transformer.h[0](gpt2.transformer.wte(_ids()))
    select = 0 if isinstance(probe, tuple) else None
    cap = Capture(gpt2, {"h0": Tap("transformer.h.0", select=select),
                         "ln": Tap("transformer.ln_f"), "head_in": Tap("lm_head", "input")})
    cap.active = True
    ids = _ids()
    with torch.no_grad():
        out = gpt2(input_ids=ids, output_hidden_states=True)
    cap.active = False
    assert len(out.hidden_states) == TINY["n_layer"] + 1
    assert cap.get("h0").shape == (2, 10, 32)
    torch.testing.assert_close(cap.get("h0"), out.hidden_states[1])
    torch.testing.assert_close(cap.get("head_in"), out.hidden_states[-1])
    torch.testing.assert_close(cap.get("ln"), out.hidden_states[-1])
    cap.remove()
    with pytest.raises(ConfigError, match="nearest valid paths"):
        Capture(gpt2, {"x": Tap("transformer.h.9")})
