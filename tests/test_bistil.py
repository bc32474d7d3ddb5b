"""BiStil (Ansell et al., 2023): the student cut from the teacher's layers ("regular"), the
SVD embedding init of a narrower student, the hidden-state map, the attention MSE on real
entries, the recipe's terms and tiny end-to-end runs with HF GPT-2 models."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("transformers")

import crossdistill as cd  # noqa: E402
from crossdistill import ConfigError, Distiller, Trainer  # noqa: E402
from crossdistill.lm.bistil import (  # noqa: E402
    BiStilHidden,
    attn_mse,
    embedding_init,
    init_from_teacher,
    layer_map,
)
from crossdistill.methods import build  # noqa: E402
from crossdistill.models.hf import create_hf  # noqa: E402
from crossdistill.taps import Tap  # noqa: E402

V = 70


def gpt2(n_layer, n_embd=32, n_head=2, attn="eager", seed=0, **extra):
    torch.manual_seed(seed)
    cfg = {"n_layer": n_layer, "n_embd": n_embd, "n_head": n_head, "n_positions": 32,
           "vocab_size": V, **extra}
    return create_hf("gpt2", config=cfg, attn_implementation=attn)


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    cache = tmp_path_factory.mktemp("tok")
    kw = dict(tokenizer="char", block=16, max_chars=5000, cache_dir=str(cache))
    return {s: cd.data.load_split("shakespeare", s, **kw) for s in ("train", "val")}


def test_layer_map_is_the_papers_regular_choice():
    assert layer_map(4, 2) == {0: 1, 1: 3}
    assert layer_map(6, 2) == {0: 2, 1: 5}
    assert layer_map(3, 3) == {0: 0, 1: 1, 2: 2}
    with pytest.raises(ConfigError, match="student.config.n_layer.*divisor"):
        layer_map(4, 3)


def test_init_copies_the_right_layers_exactly(one_thread):
    teacher, student = gpt2(4, seed=1), gpt2(2, seed=2)
    out = init_from_teacher(student, teacher)
    assert out == {"layers": {0: 1, 1: 3}, "embeddings": "copied"}
    s, t = student.transformer, teacher.transformer
    for i, k in ((0, 1), (1, 3)):
        for (name, a), b in zip(s.h[i].state_dict().items(), t.h[k].state_dict().values()):
            assert torch.equal(a, b), (i, name)
    assert not torch.equal(s.h[0].attn.c_attn.weight, t.h[0].attn.c_attn.weight)
    assert torch.equal(s.wte.weight, t.wte.weight) and torch.equal(s.wpe.weight, t.wpe.weight)
    assert torch.equal(s.ln_f.weight, t.ln_f.weight)
    assert student.lm_head.weight is s.wte.weight  # still tied


def test_narrower_student_gets_svd_embeddings(one_thread):
    teacher, student = gpt2(4, n_embd=32, seed=1), gpt2(2, n_embd=16, seed=2)
    before = student.transformer.h[0].attn.c_attn.weight.clone()
    assert init_from_teacher(student, teacher) == {"layers": {}, "embeddings": "svd"}
    w = student.transformer.wte.weight.double()
    assert w.shape == (V, 16)
    assert torch.allclose(w.T @ w, torch.eye(16, dtype=torch.float64), atol=1e-5)
    u = np.linalg.svd(teacher.transformer.wte.weight.double().detach().numpy())[0][:, :16]
    assert np.allclose(w.detach().numpy() @ w.detach().numpy().T, u @ u.T, atol=1e-5)  # same span
    assert torch.allclose(w, embedding_init(teacher.transformer.wte.weight, 16), atol=1e-6)
    assert torch.equal(student.transformer.h[0].attn.c_attn.weight, before)  # blocks: random
    assert student.lm_head.weight is student.transformer.wte.weight


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(n_embd=32, n_head=4), "student.config.n_head"),
        (dict(n_embd=64, n_head=2), "student.config.n_embd"),
        (dict(n_embd=32, n_head=2, n_inner=40), "student.config.n_inner"),
    ],
)
def test_init_refuses_mismatched_architectures(kw, field):
    with pytest.raises(ConfigError, match=field):
        init_from_teacher(gpt2(2, **kw), gpt2(4))


def test_init_errors_vocab_and_model_type():
    torch.manual_seed(0)
    other = create_hf("gpt2", config={"n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 99})
    with pytest.raises(ConfigError, match="student.config.vocab_size"):
        init_from_teacher(other, gpt2(4))
    with pytest.raises(ConfigError, match="student.hf.*GPT-2"):
        init_from_teacher(torch.nn.Linear(2, 2), gpt2(4))
    with pytest.raises(ConfigError, match="teacher"):
        build("bistil", gpt2(2), None)


def test_attention_needs_eager_and_equal_heads():
    with pytest.raises(ConfigError, match="student.attn_implementation.*eager"):
        build("bistil", gpt2(2, attn="sdpa"), gpt2(4))
    teacher = gpt2(4, attn="sdpa")
    recipe = build("bistil", gpt2(2), teacher)  # the frozen teacher is switched
    assert teacher.config._attn_implementation == "eager" and recipe.terms
    with pytest.raises(ConfigError, match="student.config.n_head"):
        build("bistil", gpt2(2, n_embd=16, n_head=4), gpt2(4), init=False)
    build("bistil", gpt2(2, attn="sdpa"), gpt2(4), attn_weight=0.0)  # no attention: fine


def test_terms_pair_student_and_teacher_layers():
    terms = build("bistil", gpt2(2), gpt2(4), init=False).terms
    by = {t.name: t for t in terms}
    assert list(by) == ["ce", "soft_ce", "hidden_0", "hidden_1", "hidden_2", "attn_0", "attn_1"]
    taps = {n: (str(t.student[0]), str(t.teacher[0])) for n, t in by.items() if n != "ce"}

    def pair(a, b):
        return str(Tap.parse(f"output.{a}")), str(Tap.parse(f"output.{b}"))

    assert taps["hidden_0"] == pair("hidden_states[0]", "hidden_states[0]")
    assert taps["hidden_1"] == pair("hidden_states[1]", "hidden_states[2]")
    assert taps["hidden_2"] == pair("hidden_states[2]", "hidden_states[4]")
    assert taps["attn_0"] == pair("attentions[0]", "attentions[1]")
    assert taps["attn_1"] == pair("attentions[1]", "attentions[3]")
    assert by["soft_ce"].loss == "fkl" and by["soft_ce"].params["temperature"] == 2.0
    assert by["hidden_1"].weight == pytest.approx(1 / 3) and by["attn_1"].weight == 0.5


def test_attn_mse_golden_on_real_causal_entries():
    s = torch.tensor([[[[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]]]], dtype=torch.float64)
    t = torch.tensor([[[[1.0, 0, 0], [0.9, 0.1, 0], [0.6, 0.2, 0.2]]]], dtype=torch.float64)
    batch = {"attention_mask": torch.tensor([[1, 1, 0]])}  # the third token is padding
    # real entries: (0,0), (1,0), (1,1): errors 0, 0.16, 0.16
    assert float(attn_mse(s, t, batch=batch)) == pytest.approx(0.32 / 3)
    everything = (0 + 0.16 + 0.16 + 0.16 + 0.01 + 0.09) / 6  # causal entries, no padding
    assert float(attn_mse(s, t, batch={})) == pytest.approx(everything)
    x = s.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a: attn_mse(a, t, batch=batch), (x,))
    with pytest.raises(ConfigError, match="n_head"):
        attn_mse(s, t.expand(1, 2, 3, 3))


def test_hidden_map_is_the_top_right_singular_vectors():
    g = torch.Generator().manual_seed(0)
    h_t = torch.randn(4, 6, 8, generator=g, dtype=torch.float64) @ torch.diag(
        torch.linspace(3, 0.1, 8, dtype=torch.float64))
    h_s = torch.randn(4, 6, 3, generator=g, dtype=torch.float64)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[0, 4:] = False
    mod = BiStilHidden(tuple(h_s.shape), tuple(h_t.shape)).double()
    per = mod(h_s, h_t, mask=mask)
    p = mod.proj
    assert bool(mod.ready) and p.shape == (8, 3)
    assert torch.allclose(p.T @ p, torch.eye(3, dtype=torch.float64), atol=1e-10)
    vt = np.linalg.svd(h_t[mask].numpy(), full_matrices=False)[2][:3]
    assert np.allclose(p.numpy() @ p.numpy().T, vt.T @ vt, atol=1e-8)  # uncentred, same span
    assert torch.allclose(per, ((h_s - h_t @ p) ** 2).mean(-1))
    frozen = p.clone()
    mod(h_s, 2 * h_t, mask=mask)
    assert torch.equal(mod.proj, frozen)  # fixed after the first batch
    assert {"proj", "ready"} <= set(mod.state_dict())
    same = BiStilHidden((4, 6, 8), (4, 6, 8))
    assert torch.allclose(same(h_t.float(), h_t.float() + 1), torch.ones(4, 6))
    with pytest.raises(ConfigError, match="bistil_hidden.inputs"):
        BiStilHidden((4, 6, 9), (4, 6, 8))


@pytest.mark.parametrize("n_embd", [32, 16])
def test_end_to_end_tiny_gpt2(text_data, one_thread, n_embd):
    teacher, student = gpt2(4, seed=1).eval(), gpt2(2, n_embd=n_embd, seed=2)
    recipe = build("bistil", student, teacher)
    d = Distiller(student, teacher, recipe.terms, task="lm")
    res = Trainer(d, text_data["train"], text_data["val"], epochs=1, batch_size=16, lr=3e-3,
                  optimizer="adamw", progress=False).fit()
    assert np.isfinite(res["best_val_bpb"])
    losses = d.last_losses
    assert {"ce", "soft_ce", "hidden_0", "attn_1"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    if n_embd < 32:
        assert bool(d.loss_modules["hidden_1"].ready)


def test_yaml_config_checks(tmp_path, monkeypatch, one_thread):
    import yaml

    from crossdistill.cli import main

    monkeypatch.chdir(tmp_path)
    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    cfg = yaml.safe_load(open(os.path.join(root, "lm_bistil.yaml")))
    data = {"name": "shakespeare", "batch_size": 8,
            "params": {"tokenizer": "char", "block": 16, "max_chars": 12000}}
    teacher = {"student": {"hf": "gpt2", "inputs": {"input_ids": "input_ids"},
                           "config": {"n_layer": 2, "n_embd": 16, "n_head": 2, "n_positions": 16}},
               "data": data, "train": {"epochs": 1, "progress": False}}
    (tmp_path / "teacher.yaml").write_text(yaml.safe_dump(teacher))
    cfg["teacher"] = {"from_config": str(tmp_path / "teacher.yaml")}
    cfg["student"]["config"].update(n_embd=16, n_head=2, n_positions=16)
    cfg["data"] = data
    cfg["train"].update(epochs=1, progress=False)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "run.yaml"), "--check"]) == 0


def test_store_holds_hidden_states_and_attentions_same_run_as_online(tmp_path, one_thread):
    """A store written from a BiStil config holds the taps the recipe reads; the run from it
    (init from the store's checked teacher model) matches the online run."""
    import json

    import yaml

    from crossdistill.cli import main

    data = {"name": "shakespeare", "batch_size": 8,
            "params": {"tokenizer": "char", "block": 16, "max_chars": 6000,
                       "cache_dir": str(tmp_path / "tok")}}
    cfg_t = {"n_layer": 2, "n_embd": 16, "n_head": 2, "n_positions": 16}
    hf = {"hf": "gpt2", "inputs": {"input_ids": "input_ids"}}
    teacher = {"student": {**hf, "config": cfg_t}, "data": data,
               "train": {"epochs": 1, "progress": False}}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(teacher))
    assert main(["train", str(tmp_path / "t.yaml"), "--out", str(tmp_path / "t")]) == 0
    eager = {"attn_implementation": "eager"}
    tspec = {**hf, "config": cfg_t, "checkpoint": str(tmp_path / "t" / "student.safetensors")}
    run = {"student": {**hf, **eager, "config": {**cfg_t, "n_layer": 1}}, "data": data,
           "teacher": tspec, "method": {"name": "bistil"},
           "train": {"epochs": 1, "progress": False, "seed": 3}}
    (tmp_path / "online.yaml").write_text(yaml.safe_dump(run))
    assert main(["cache-teacher", str(tmp_path / "online.yaml"), "--out",
                 str(tmp_path / "store"), "--dtype", "float32"]) == 0
    taps = json.loads((tmp_path / "store" / "manifest.json").read_text())["taps"]
    want = ("output.hidden_states[0]", "output.hidden_states[2]", "output.attentions[1]")
    assert {str(Tap.parse(t)) for t in want} <= set(taps)
    stored = {**run, "teacher": {**tspec, "store": str(tmp_path / "store")}}
    (tmp_path / "stored.yaml").write_text(yaml.safe_dump(stored))
    res = {}
    for name in ("online", "stored"):
        assert main(["train", str(tmp_path / f"{name}.yaml"), "--out", str(tmp_path / name)]) == 0
        res[name] = json.loads((tmp_path / name / "results.json").read_text())
    assert res["stored"]["test_bpb"] == pytest.approx(res["online"]["test_bpb"], abs=1e-4)
    no_model = {**run, "teacher": {"store": str(tmp_path / "store")}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(no_model))
    assert main(["train", str(tmp_path / "bad.yaml")]) == 2
