"""Shakespeare turn pairs for text retrieval: parsing, block splits, tokenized source."""

import pytest
import torch

import crossdistill as cd
from crossdistill.data.turns import parse_turns, turn_pairs
from crossdistill.errors import ConfigError


@pytest.fixture(scope="module")
def play(tmp_path_factory):
    turns = [f"SPEAKER{i % 3}:\nline {i} one,\nand line {i} two.\n" for i in range(60)]
    path = tmp_path_factory.mktemp("play") / "input.txt"
    path.write_text("a stray preface line\n\n" + "\n".join(turns) + "\n" + "x" * 1000)
    return str(path)


def test_parse_turns_joins_lines_and_drops_names():
    text = "A:\nfirst line\nsecond\n\nB:\nreply\n\nnot a turn\n"
    assert parse_turns(text) == [("A", "first line second"), ("B", "reply")]


def test_splits_are_whole_blocks_and_pairs_stay_inside(play):
    pairs = {s: turn_pairs(s, root=play, block_turns=5) for s in ("train", "val", "test")}
    # 60 turns -> 12 blocks of 5 -> 4 pairs each; val and test get round(0.1 * 12) = 1 block
    assert [len(pairs[s]) for s in ("train", "val", "test")] == [40, 4, 4]
    for s, ps in pairs.items():
        for q, g in ps:  # each pair is a turn and the very next one
            i, j = int(q.split()[1]), int(g.split()[1])
            assert j == i + 1 and i // 5 == j // 5, (s, q, g)
    seen = {s: {t for p in ps for t in p} for s, ps in pairs.items()}
    assert not seen["train"] & seen["val"] and not seen["train"] & seen["test"]
    assert not seen["val"] & seen["test"]
    other = turn_pairs("val", root=play, block_turns=5, split_seed=1)
    assert other != pairs["val"]  # the blocks' assignment is seeded


def test_stride_two_puts_each_turn_in_one_pair(play):
    one = turn_pairs("train", root=play, block_turns=5)
    two = turn_pairs("train", root=play, block_turns=5, stride=2)
    assert len(two) == 20 and set(two) <= set(one)  # 2 of each block's 4 pairs
    turns = [t for p in two for t in p]
    assert len(turns) == len(set(turns))
    assert turns[1] in {t for p in one for t in p} and one[0][1] == one[1][0]  # stride 1
    with pytest.raises(ConfigError, match="data.stride"):
        turn_pairs("train", root=play, block_turns=5, stride=3)


def test_source_tokenizes_both_sides(play, tmp_path):
    d = cd.data.load_split("shakespeare_turns", "val", root=play, tokenizer="char",
                           block_turns=5, max_tokens=16, cache_dir=str(tmp_path))
    assert d["query_ids"].shape == d["gallery_ids"].shape == (4, 16)
    assert torch.equal(d["idx"], torch.arange(4)) and d.kinds["query_ids"] == "tokens"
    assert d.texts["query"][0].startswith("line ") and len(d.texts["gallery"]) == 4
    n = d["query_mask"].sum(1)
    pads = d["query_ids"][d["query_mask"] == 0]
    assert (n > 0).all() and (pads == d.tokenizer.pad_token_id).all()
    ids = d["query_ids"][0][: int(n[0])].tolist()
    text = d.tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "")
    assert len(text) >= 8 and d.texts["query"][0].replace(" ", "").startswith(text)


def test_bad_inputs(play):
    with pytest.raises(ConfigError, match="data.block_turns"):
        turn_pairs("train", root=play, block_turns=30)  # 2 blocks: a split would be empty
    with pytest.raises(ConfigError, match="data.block_turns"):
        turn_pairs("train", root=play, block_turns=1)
    with pytest.raises(ConfigError, match="data.tokenizer"):
        cd.data.load_split("shakespeare_turns", "val", root=play, tokenizer="wordpiece",
                           block_turns=5)
    with pytest.raises(ConfigError, match="data.max_tokens"):
        cd.data.load_split("shakespeare_turns", "val", root=play, block_turns=5, max_tokens=2)


def test_embedded_text_default_sizes():
    pairs = {s: len(turn_pairs(s)) for s in ("train", "val", "test")}
    assert pairs == {"train": 5499, "val": 702, "test": 702}
