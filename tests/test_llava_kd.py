"""LLaVA-KD in miniature: MDist / RDist maths, the digit VQA source, the MiniVLM, the vqa
task, the stage recipes and a tiny three-stage run."""

import copy
import math

import pytest
import torch

import crossdistill as cd
import crossdistill.data.digit_vqa  # noqa: F401  (registers digit_vqa)
import crossdistill.losses.mllm  # noqa: F401  (registers mdist, rdist)
import crossdistill.methods.llava_kd  # noqa: F401  (registers llava-kd)
import crossdistill.tasks.vqa  # noqa: F401  (registers vqa)
from crossdistill.data.captions import NAMES
from crossdistill.data.digit_vqa import KINDS, QUESTIONS, digit_vqa, word_tokenizer, words_of
from crossdistill.errors import ConfigError
from crossdistill.losses.mllm import mdist, rdist
from crossdistill.methods import build
from crossdistill.methods.llava_kd import Stage, pipeline, trainable
from crossdistill.models.mini_vlm import mini_vlm

V = len(word_tokenizer())


def _vlm(dim=16, depth=1, heads=2, seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("vision_params", {"channels": (4, 8)})
    return mini_vlm(vocab_size=V, dim=dim, depth=depth, heads=heads, **kw)


# -- losses ---------------------------------------------------------------------------------
def test_mdist_golden():
    s = torch.tensor([[[0.0, 0.0], [1.0, 2.0]]])  # q = (1/2, 1/2) at position 0
    t = torch.tensor([[[math.log(3.0), 0.0], [1.0, 2.0]]])  # p = (3/4, 1/4); position 1: equal
    fkl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    rkl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert torch.allclose(mdist(s, t), torch.tensor([[fkl, 0.0]]), atol=1e-6)
    assert torch.allclose(mdist(s, t, divergence="rkl"), torch.tensor([[rkl, 0.0]]), atol=1e-6)
    assert torch.allclose(mdist(s, t, per="sample"), torch.tensor([fkl / 2]), atol=1e-6)
    # the response MDist is the registered token-level forward KL (not a second copy of it)
    from crossdistill.losses.sequence import fkl as fkl_loss

    z = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    assert torch.allclose(mdist(*z, temperature=2.0), fkl_loss(*z, temperature=2.0))
    assert mdist(*z).shape == (2, 3) and mdist(*z, per="sample").shape == (2,)


def test_rdist_golden():
    s = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # orthogonal tokens: R_s = I
    t = torch.tensor([[[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]]])  # parallel tokens, width 3: R_t = 1
    assert rdist(s, t).item() == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-6)
    assert rdist(s, t, distance="mse").item() == pytest.approx(0.5, abs=1e-6)
    assert rdist(s, t, distance="l1").item() == pytest.approx(0.5, abs=1e-6)
    assert rdist(t, t * 3).item() == pytest.approx(0.0, abs=1e-6)  # scale-free
    assert rdist(torch.randn(4, 5, 3), torch.randn(4, 5, 7)).shape == (4,)


def test_gradcheck():
    torch.manual_seed(0)
    s = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 4, dtype=torch.float64)
    for div in ("fkl", "rkl", "jsd", "skl"):
        for per in ("token", "sample"):
            assert torch.autograd.gradcheck(
                lambda x, d=div, p=per: mdist(x, t, divergence=d, per=p, temperature=2.0), (s,))
    tt = torch.randn(2, 3, 6, dtype=torch.float64)
    for dist in ("cosine", "mse", "l1"):
        assert torch.autograd.gradcheck(lambda x, d=dist: rdist(x, tt, distance=d), (s,))
    x = s.detach().clone().requires_grad_(True)
    mdist(x, t.clone().requires_grad_(True)).sum().backward()  # the teacher gets no gradient
    assert x.grad is not None


def test_loss_bad_inputs():
    with pytest.raises(ConfigError, match="mdist.divergence"):
        mdist(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), divergence="kl2")
    with pytest.raises(ConfigError, match="mdist.per"):
        mdist(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), per="batch")
    with pytest.raises(ConfigError, match="mdist.inputs"):
        mdist(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ConfigError, match="vocabularies differ"):
        mdist(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))
    with pytest.raises(ConfigError, match="rdist.inputs"):
        rdist(torch.zeros(1, 4, 3), torch.zeros(1, 5, 3))
    with pytest.raises(ConfigError, match="rdist.distance"):
        rdist(torch.zeros(1, 4, 3), torch.zeros(1, 4, 3), distance="dot")
    with pytest.raises(ConfigError, match="terms.rdist.distance"):
        cd.Term("rdist", student="projector", teacher="projector", distance="dot")


# -- data -----------------------------------------------------------------------------------
def test_digit_vqa_layout_and_answers():
    tok = word_tokenizer()
    d = digit_vqa("val", limit=30)
    ids, lab = d.tensors["input_ids"], d.tensors["labels"]
    assert len(d) == 30 * len(QUESTIONS) and d.tensors["x"].shape[1:] == (1, 8, 8)
    assert len(set(d.tensors["idx"].tolist())) == len(d)
    for i in range(len(d)):
        scored = (lab[i] != -100).nonzero().flatten()
        p, r = d.texts[i]
        head = 1 + len(words_of(p))  # bos + prompt
        assert scored.tolist() == list(range(head - 1, head + len(words_of(r))))
        assert (ids[i, 1:][lab[i, :-1] != -100] == lab[i, :-1][lab[i, :-1] != -100]).all()
        assert lab[i, scored[-1]] == tok.eos_token_id
        assert tok.decode(lab[i, scored[:-1]]) == r  # only the response is scored
        assert QUESTIONS[int(d.tensors["qtype"][i])][1] == p
    y = d.tensors["y"]
    digit = d.tensors["qtype"] == KINDS.index("digit")
    assert [d.texts[i][1] for i in digit.nonzero().flatten()] == [NAMES[v] for v in y[digit]]
    even = (d.tensors["qtype"] == KINDS.index("even")).nonzero().flatten()
    assert all(d.texts[i][1] == ("yes" if y[i] % 2 == 0 else "no") for i in even)
    for p, r in d.texts[:20]:  # the HF tokenizer splits like the encoder's word list
        assert tok(f"{p} {r}", add_special_tokens=False)["input_ids"] == \
            tok.convert_tokens_to_ids(words_of(f"{p} {r}"))


def test_digit_vqa_modes_and_seeds():
    tr = digit_vqa("train", limit=40, questions=2, seed=3)
    assert len(tr) == 80 and torch.equal(
        tr.tensors["input_ids"], digit_vqa("train", limit=40, questions=2, seed=3)
        .tensors["input_ids"])
    assert not torch.equal(tr.tensors["qtype"], digit_vqa(
        "train", limit=40, questions=2, seed=4).tensors["qtype"])
    assert len(digit_vqa("val", limit=40, questions=2)) == 40 * len(QUESTIONS)  # all in val
    cap = digit_vqa("train", mode="caption", limit=40, captions=2)
    assert len(cap) == 80 and all(p == "" for p, _ in cap.texts)
    assert (cap.tensors["qtype"] == len(QUESTIONS)).all()
    text = digit_vqa("train", mode="text", limit=40, questions=1)
    assert "x" not in text.tensors and len(text) == 40 + 40
    k = digit_vqa("test", limit=20, kinds=["digit", "slant"])
    assert set(k.tensors["qtype"].tolist()) == {0, KINDS.index("slant")}
    reg = cd.data.load_split("digit_vqa", "test", limit=20, kinds=["digit", "slant"])
    assert torch.equal(reg.tensors["input_ids"], k.tensors["input_ids"])  # the registered source


def test_digit_vqa_bad_inputs():
    for kw, field in (({"mode": "video"}, "data.mode"), ({"kinds": ["colour"]}, "data.kinds"),
                      ({"kinds": ["digit", "digit"]}, "data.kinds"),
                      ({"questions": 0}, "data.questions"), ({"questions": 9}, "data.questions"),
                      ({"max_tokens": 5}, "data.max_tokens"), ({"captions": 0}, "data.captions"),
                      ({"images": "cifar"}, "data.images")):
        with pytest.raises(ConfigError, match=field):
            digit_vqa("val", limit=10, **kw)
    with pytest.raises(ConfigError, match="data.split"):
        digit_vqa("dev")


# -- model ----------------------------------------------------------------------------------
def test_mini_vlm_shapes_taps_and_frozen_encoder():
    m = _vlm()
    x, ids = torch.randn(3, 1, 8, 8), torch.randint(0, V, (3, 7))
    assert m.num_visual == 16
    d = cd.Distiller(m, _vlm(dim=32, seed=1), [
        cd.Term("mdist", student="visual_logits", teacher="visual_logits", per="sample"),
        cd.Term("rdist", student="projector", teacher="projector")],
        task={"name": "vqa"})
    batch = {"x": x, "input_ids": ids, "labels": ids}
    out = d(batch)
    assert out.logits.shape == (3, 7, V) and set(out.losses) == {"mdist", "rdist"}
    m.train()
    assert not m.vision.training and m.llm.training  # the frozen encoder stays in eval mode
    assert not any(p.requires_grad for p in m.vision.parameters())
    bn = copy.deepcopy(m.vision.model.stage1[1].running_mean)
    m(x, ids)
    assert torch.equal(bn, m.vision.model.stage1[1].running_mean)
    c = copy.deepcopy(m)  # the encoder's hook follows the copy
    assert torch.allclose(c(x, ids), m(x, ids))
    # causal: a text position never sees later tokens; text alone sits after the image slots
    ids2 = ids.clone()
    ids2[:, 4:] = 0
    assert torch.allclose(m(x, ids)[:, :4], m(x, ids2)[:, :4], atol=1e-6)
    emb = m.llm.embed(ids)
    assert torch.allclose(m(None, ids), m.llm(emb, start=16), atol=1e-6)


def test_mini_vlm_bad_inputs():
    with pytest.raises(ConfigError, match="model.heads"):
        _vlm(dim=30, heads=4)
    with pytest.raises(ConfigError, match="model.vision_tap"):
        _vlm(vision_tap="stage9")
    with pytest.raises(ConfigError, match="model.max_len"):
        _vlm(max_len=10)
    with pytest.raises(ConfigError, match="model.vision"):
        _vlm(vision="mini-vlm")
    m = _vlm(max_len=20)
    with pytest.raises(ConfigError, match="model.max_len"):
        m(torch.randn(1, 1, 8, 8), torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ConfigError, match="student.inputs"):
        m(torch.randn(1, 1, 8, 8))
    assert cd.models.create("mini-vlm", vocab_size=V, dim=16, heads=2).num_visual == 16


# -- task -----------------------------------------------------------------------------------
def test_vqa_task_golden():
    task = cd.tasks.build({"name": "vqa", "kinds": ["a", "b"]})
    y = torch.tensor([[-100, 3, 0], [-100, 2, 0], [-100, 1, -100]])
    pred = torch.tensor([[9, 3, 0], [9, 2, 1], [9, 1, 5]])  # right, one token wrong, right
    logits = torch.nn.functional.one_hot(pred, 10).float()
    sums = {}
    task.update(sums, logits, {"labels": y, "qtype": torch.tensor([0, 0, 1])},
                keep=torch.ones(3, dtype=torch.bool))
    m = task.compute({k: v.item() if v.dim() == 0 else v for k, v in sums.items()})
    assert m["acc"] == pytest.approx(2 / 3) and m["token_acc"] == pytest.approx(4 / 5)
    assert m["acc_a"] == pytest.approx(0.5) and m["acc_b"] == pytest.approx(1.0)
    assert m["n"] == 3 and task.select == "acc" and task.mode == "max"
    assert cd.tasks.build({"name": "vqa", "select": "loss"}).mode == "min"
    with pytest.raises(ConfigError, match="task.select"):
        cd.tasks.build({"name": "vqa", "select": "bleu"})
    with pytest.raises(ConfigError, match="task.target"):
        task.check_batch({"x": torch.zeros(1)})


# -- method ---------------------------------------------------------------------------------
def test_recipes_per_stage():
    s, t = _vlm(), _vlm(dim=32, seed=1)
    names = {st: [x.name for x in build("llava-kd", s, t, stage=st).terms]
             for st in ("pt", "dpt", "sft", "dft")}
    assert names == {"pt": ["ce"], "sft": ["ce"], "dpt": ["ce", "mdist_res", "mdist_vis", "rdist"],
                     "dft": ["ce", "mdist_res", "mdist_vis", "rdist"]}
    r = build("llava-kd", s, t, stage="dft", rel_weight=0.0, vis_weight=0.5)
    assert [x.name for x in r.terms] == ["ce", "mdist_res", "mdist_vis"]
    assert r.terms[2].weight == 0.5 and r.terms[2].params["per"] == "sample"
    build("llava-kd", s, None, stage="sft")  # SFT needs no teacher
    trainable(s, "dpt")
    grads = {n.split(".")[0] for n, p in s.named_parameters() if p.requires_grad}
    assert grads == {"projector"}
    trainable(s, "dft")
    grads = {n.split(".")[0] for n, p in s.named_parameters() if p.requires_grad}
    assert grads == {"projector", "llm"}


def test_recipe_bad_inputs():
    s, t = _vlm(), _vlm(dim=32, seed=1)
    for kw, field in (({"stage": "rl"}, "method.stage"), ({"rel_weight": -1}, "method.rel_weight"),
                      ({"divergence": "kl2"}, "method.divergence"),
                      ({"rdist_distance": "dot"}, "method.rdist_distance"),
                      ({"temperature": 0}, "method.temperature"),
                      ({"unknown": 1}, "method.unknown")):
        with pytest.raises(ConfigError, match=field):
            build("llava-kd", s, t, **kw)
    with pytest.raises(ConfigError, match="method.teacher"):
        build("llava-kd", s, None, stage="dft")
    with pytest.raises(ConfigError, match="method.student"):
        build("llava-kd", torch.nn.Linear(2, 2), t, stage="sft")
    with pytest.raises(ConfigError, match="method.ce_weight"):
        build("llava-kd", s, t, stage="sft", ce_weight=0.0)
    with pytest.raises(ConfigError, match="pipeline.stages"):
        pipeline(s, t, [])
    with pytest.raises(ConfigError, match="pipeline.stages.0"):
        pipeline(s, t, [Stage("rl", None)])
    # visual token counts that differ (no projector bridges K): caught by the dry run
    other = _vlm(dim=32, seed=1, vision_params={"channels": (4, 8, 8)}, vision_tap="stage3")
    r = build("llava-kd", s, other, stage="dft")
    d = cd.Distiller(s, other, r.terms, task="vqa")
    batch = {"x": torch.randn(2, 1, 8, 8), "input_ids": torch.zeros(2, 5, dtype=torch.long),
             "labels": torch.zeros(2, 5, dtype=torch.long)}
    with pytest.raises(ConfigError, match="terms.mdist_vis.inputs"):
        d.build(batch)


# -- a tiny three-stage run -----------------------------------------------------------------
def test_three_stages_end_to_end(one_thread):
    kinds = ["even", "digit"]
    tr = digit_vqa("train", limit=100, kinds=kinds, questions=2)
    va, te = digit_vqa("val", limit=40, kinds=kinds), digit_vqa("test", limit=40, kinds=kinds)
    ctr, cva = digit_vqa("train", mode="caption", limit=100), digit_vqa("val", mode="caption",
                                                                     limit=40)
    task = {"name": "vqa", "kinds": list(KINDS)}
    cap_task = dict(task, select="loss")
    kw = dict(batch_size=50, optimizer="adamw", weight_decay=0.0, progress=False)
    teacher = _vlm(dim=32, seed=1)
    res_t = pipeline(teacher, None, [Stage("pt", ctr, cva, epochs=1, lr=3e-3, task=cap_task),
                                     Stage("sft", tr, va, epochs=3, lr=3e-3)], task=task, **kw)
    assert [r["stage"] for r in res_t] == ["pt", "sft"] and len(res_t[1]["val_curve"]) == 3
    s = _vlm(seed=2)
    enc = copy.deepcopy(s.vision.state_dict())
    llm0 = copy.deepcopy(s.llm.state_dict())
    res = pipeline(s, teacher, [Stage("dpt", ctr, cva, epochs=1, lr=3e-3, task=cap_task)],
                   task=task, **kw)
    assert all(torch.equal(v, s.llm.state_dict()[k]) for k, v in llm0.items())  # LLM frozen
    res += pipeline(s, teacher, [Stage("sft", tr, va, epochs=2, lr=3e-3),
                                 Stage("dft", tr, va, te, epochs=1, lr=3e-3)], task=task, **kw)
    assert all(torch.equal(v, s.vision.state_dict()[k]) for k, v in enc.items())  # never trains
    assert not all(torch.equal(v, s.llm.state_dict()[k]) for k, v in llm0.items())
    last = res[-1]
    assert 0.0 <= last["test_acc"] <= 1.0 and "test_acc_even" in last and "best_val_acc" in last
    assert last["note"].startswith("llava-kd dft: ce, mdist_res, mdist_vis, rdist")
    # exact match under teacher forcing == greedy decoding's exact match
    s.eval()
    even = (te.tensors["qtype"] == KINDS.index("even")).nonzero().flatten()
    x, ids, y = (te.tensors[k][even] for k in ("x", "input_ids", "labels"))
    with torch.no_grad():
        forced = ((s(x, ids).argmax(-1) == y) | (y == -100)).all(-1)
    first = int((y[0] != -100).nonzero()[0])  # the prompt is bos + the question
    n = int((y[0] != -100).sum())
    gen = s.generate(x, ids[:, :first + 1], n)
    gold = torch.stack([row[row != -100] for row in y])
    assert torch.equal(forced, (gen == gold).all(-1))
