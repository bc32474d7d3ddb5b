"""Teacher-store integrity: content hashes, manifest validation, confined shard paths,
non-finite values, and spot checks against the live teacher (issue #11, item 3)."""

import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import crossdistill as cd
from crossdistill import ConfigError
from crossdistill.cli import main
from crossdistill.io import save_weights
from crossdistill.teachers import TeacherStore, cache_teacher
from crossdistill.teachers import store as store_mod
from crossdistill.teachers.manifest import file_sha256


def _teacher(seed=0):
    torch.manual_seed(seed)
    return cd.models.create(
        "cnn", num_classes=10, in_channels=1, img_size=8, channels=(8, 16, 16)
    ).eval()


def _make(path, data, seed=0, **kw):
    kw = {"dtype": "float32", "shard_size": 70, "batch_size": 64, "progress": False, **kw}
    return cache_teacher(_teacher(seed), data, path, **kw)


def _manifest(d):
    return json.loads((d / "manifest.json").read_text())


def _write_manifest(d, m):
    (d / "manifest.json").write_text(json.dumps(m))


def _edit(d, **changes):
    m = _manifest(d)
    m.update(changes)
    _write_manifest(d, m)


def _forge(d, i, fn):
    """Change shard ``i``'s tensors with ``fn`` and record the new hash, as a careless tool
    (or a store assembled by hand) would: only the live-teacher check can catch it."""
    name = _manifest(d)["shards"][i]
    t = load_file(str(d / name))
    fn(t)
    save_file(t, str(d / name))
    m = _manifest(d)
    m["shard_sha256"][i] = file_sha256(d / name)
    _write_manifest(d, m)


def _refused(match, fn, *args, **kw):
    with pytest.raises(ConfigError, match=match) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bit_flip_is_refused_on_open_and_lazily(tmp_path, digits):
    d = _make(tmp_path / "s", digits["train"])
    name = _manifest(d)["shards"][1]
    raw = bytearray((d / name).read_bytes())
    raw[-3] ^= 0x10  # one bit of one stored value
    (d / name).write_bytes(bytes(raw))
    msg = _refused("content changed since it was written", TeacherStore, d)
    assert name in msg and str(d) in msg and "cache-teacher" in msg
    lazy = TeacherStore(d, verify=False)  # large stores hash each shard at its first lookup
    lazy.lookup(digits["train"].idx[:3], "logits")  # shard 0 is intact
    _refused("content changed", lazy.lookup, digits["train"].idx[75:78], "logits")  # shard 1


def test_non_finite_and_out_of_range_values_are_refused(tmp_path, digits):
    d = _make(tmp_path / "s", digits["train"])
    _forge(d, 0, lambda t: t["logits"][:45].fill_(float("nan")))
    _refused("logits of sample id .* NaN or inf", TeacherStore, d)
    k = _make(tmp_path / "k", digits["train"], topk=3, dtype="float16")
    _forge(k, 1, lambda t: t["logits.indices"][0].fill_(200))  # 10 classes
    _refused("class ids out of range", TeacherStore, k)
    b = _make(tmp_path / "b", digits["train"], dtype="bfloat16")
    _forge(b, 2, lambda t: t["logits"][3, 1].fill_(float("inf")))
    _refused("NaN or inf", TeacherStore, b)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"num_classes": 11}, "vocab_size"),
        ({"num_classes": 11, "vocab_size": 11}, "shapes.logits"),
        ({"num_samples": 999}, "num_samples"),
        ({"num_samples": "many"}, "num_samples"),
        ({"dtype": "float64"}, "dtype"),
        ({"dtype": "float16"}, "bytes_per_sample|tensors differ"),
        ({"topk": 20}, "topk"),
        ({"teacher_hash": "xyz"}, "teacher_hash"),
        ({"shapes": {"idx": [], "logits": [10, 1]}}, "shapes"),
        ({"bytes_per_sample": 1}, "bytes_per_sample"),
        ({"shard_rows": [70, 60, 70]}, "shard_rows"),
        ({"shard_sha256": ["0" * 64]}, "shard_sha256"),
        ({"shards": []}, "shards"),
        ({"complete": "yes"}, "complete"),
        ({"format": "other/9"}, "format"),
        ({"format": "crossdistill-teacher-store/1"}, "older crossdistill .* re-run"),
        ({"complete": False}, "incomplete .* re-run `crossdistill cache-teacher`"),
    ],
)
def test_edited_manifest_fields_are_refused(tmp_path, digits, changes, match):
    d = _make(tmp_path / "s", digits["train"])
    TeacherStore(d)
    _edit(d, **changes)
    _refused(match, TeacherStore, d)


@pytest.mark.parametrize(
    "shard", ["../outside.safetensors", "/etc/passwd", "sub/shard-00000.safetensors", 7]
)
def test_shard_paths_are_confined_to_the_store(tmp_path, digits, shard):
    d = _make(tmp_path / "s", digits["train"])
    m = _manifest(d)
    m["shards"][0] = shard
    _write_manifest(d, m)
    _refused("shards.0", TeacherStore, d)


def test_symlinked_shard_out_of_the_store_is_refused(tmp_path, digits):
    d = _make(tmp_path / "s", digits["train"])
    name = _manifest(d)["shards"][0]
    outside = tmp_path / "elsewhere.safetensors"
    os.replace(d / name, outside)
    os.symlink(outside, d / name)
    _refused("symlink out", TeacherStore, d)


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", "not a readable manifest"),
        ("[1, 2]", "not an object"),
        (b"\xff\xfe\x00bad", "not a readable manifest"),
        ("[" * 100_000, "not a readable manifest"),
        ('{"format": "crossdistill-teacher-store/2", "complete": true}', "missing"),
    ],
)
def test_unreadable_manifests_give_one_line(tmp_path, digits, text, match):
    d = _make(tmp_path / "s", digits["train"])
    p = d / "manifest.json"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    _refused(match, TeacherStore, d)


def test_duplicate_ids_and_edited_fingerprint(tmp_path, digits):
    train = digits["train"]
    d = _make(tmp_path / "s", train)
    TeacherStore(d).check(data=train)
    _edit(d, data_fingerprint="0" * 16)
    _refused("other inputs: data fingerprint", TeacherStore(d).check, data=train)
    _forge(d, 1, lambda t: t["idx"][:1].copy_(train.idx[0]))
    _refused("stored twice", TeacherStore, d)


def test_labels_do_not_change_the_fingerprint(tmp_path, digits):
    """A store made on the labelled split serves a run that hides labels (semi-supervised)."""
    train = digits["train"]
    d = _make(tmp_path / "s", train)
    hidden = train.subset(torch.arange(len(train)))
    hidden.tensors["y"][10:] = -100
    TeacherStore(d).check(data=hidden)


def test_spot_check_against_the_live_teacher(tmp_path, digits):
    train = digits["train"]
    for topk, dtype in ((None, "float16"), (None, "bfloat16"), (3, "float16")):
        d = _make(tmp_path / f"ok-{topk}-{dtype}", train, topk=topk, dtype=dtype)
        TeacherStore(d).verify_against(_teacher(), train)  # storage rounding is tolerated
    d = _make(tmp_path / "s", train)
    store = TeacherStore(d)
    store.verify_against(_teacher(), train)
    _refused("do not match the teacher", store.verify_against, _teacher(seed=1), train)

    def permute(t):
        for k in t:
            if k != "idx":
                t[k] = t[k].flip(0).contiguous()

    _forge(d, 1, permute)  # rows of one shard reordered, hash updated
    msg = _refused("do not match the teacher", TeacherStore(d).verify_against, _teacher(), train)
    assert "rows changed" in msg

    other = _make(tmp_path / "other", train, seed=1)
    d2 = _make(tmp_path / "mixed", train)
    name = _manifest(d2)["shards"][2]
    (d2 / name).write_bytes((other / name).read_bytes())  # another teacher's shard ...
    m = _manifest(d2)
    m["shard_sha256"][2] = _manifest(other)["shard_sha256"][2]  # ... with its hash
    _write_manifest(d2, m)
    _refused("do not match", TeacherStore(d2).verify_against, _teacher(), train)


def test_cache_teacher_refuses_non_finite_signals(tmp_path, digits):
    t = _teacher()
    with torch.no_grad():
        next(t.parameters()).view(-1)[0] = float("nan")
    _refused("NaN or inf", cache_teacher, t, digits["train"], tmp_path / "n", progress=False)
    t = _teacher()
    with torch.no_grad():
        for p in t.parameters():
            p.mul_(30)  # logits far past float16's 65504
    _refused("overflows", cache_teacher, t, digits["train"], tmp_path / "o", progress=False)
    for k, v in (("shard_size", 0), ("batch_size", True)):
        _refused(f"store.{k}", _make, tmp_path / "x", digits["train"], **{k: v})


def test_build_checks_the_store_against_the_named_teacher(tmp_path, digits):
    from crossdistill.build import make_teacher
    from crossdistill.config import TeacherSpec

    train = digits["train"]
    ckpt = save_weights(_teacher().state_dict(), tmp_path / "t.safetensors")
    d = _make(tmp_path / "s", train)
    spec = TeacherSpec(model="cnn", channels=[8, 16, 16], checkpoint=str(ckpt), store=str(d))
    store, _ = make_teacher(spec, "teacher", train)
    assert isinstance(store, TeacherStore)
    _forge(d, 1, lambda t: t.update(logits=t["logits"].roll(1, 0).contiguous()))
    msg = _refused("do not match the teacher", make_teacher, spec, "teacher", train)
    assert msg.startswith("teacher.store: ")


@pytest.mark.slow
def test_cli_train_refuses_a_mismatched_store(tmp_path, capsys):
    ckpt = save_weights(_teacher().state_dict(), tmp_path / "t.safetensors")
    cfg = {
        "student": {"model": "mlp", "hidden": [16]},
        "data": {"name": "digits", "batch_size": 64},
        "train": {"epochs": 1, "progress": False},
        "teacher": {"model": "cnn", "channels": [8, 16, 16], "checkpoint": str(ckpt)},
        "terms": [{"loss": "kd"}],
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    d = tmp_path / "store"
    assert main(["cache-teacher", str(path), "--out", str(d), "--shard-size", "400"]) == 0
    capsys.readouterr()
    args = ["train", str(path), "--set", f"teacher.store={d}"]

    def refused(match):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "teacher.store" in err and err.count("crossdistill: error") == 1
        assert match in err, err

    _forge(d, 1, lambda t: t.update(logits=t["logits"].roll(1, 0).contiguous()))
    refused("do not match the teacher")


def test_eager_threshold(tmp_path, digits, monkeypatch):
    d = _make(tmp_path / "s", digits["train"])
    monkeypatch.setattr(store_mod, "EAGER_VERIFY_BYTES", 0)
    assert not any(TeacherStore(d)._verified)
    assert all(TeacherStore(d, verify=True)._verified)
