"""Every file a user hands crossdistill (YAML, IDX, wav, tokenizer, safetensors) fails with
one line naming the file and what is wrong; weights are written with normal permissions."""

import gzip
import json
import os
import struct

import numpy as np
import pytest
import torch
import yaml
from cli_helpers import one_line_error

from crossdistill import config as C
from crossdistill.data.audio import read_wav
from crossdistill.errors import ConfigError, show
from crossdistill.io import file_mode, save_weights
from crossdistill.text.tokenizer import load_tokenizer
from crossdistill.train import checkpoint
from crossdistill.yamlfile import MAX_BYTES, read_yaml

BASE = {
    "student": {"model": "mlp", "hidden": [16]},
    "data": {"name": "digits", "batch_size": 64},
    "terms": [{"loss": "ce"}],
    "train": {"epochs": 1, "progress": False},
}


_one_line_error = one_line_error


def _train_err(capsys, path) -> str:
    return _one_line_error(capsys, ["train", str(path)])


# -- YAML ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data,expect",
    [
        (b"student: {model: mlp}\nstudent: {model: cnn}\n", ["duplicate key 'student'",
                                                                  "line 2", "first at line 1"]),
        (("a: " + "[" * 200 + "]" * 200).encode(), ["deeper than 64", "line 1"]),
        (("a: " + "[" * 100_000).encode(), ["deeper than 64"]),
        (b"a: [1, 2\n", ["not valid YAML at line 2, column 1"]),
        (b"student: !!python/object/apply:os.system ['true']\n",
         ["not valid YAML", "tags are not allowed"]),
        (b"a: &a [*a]\n", ["recursive"]),
        (b"x: 2001-13-45\n", ["not valid YAML", "month"]),
        (("x: " + "9" * 5000).encode(), ["integer of 5000 characters"]),
        ("student: {model: 'caf\xe9'}\n".encode("latin-1"), ["not UTF-8", "offset 21",
                                                             "latin-1"]),
        ("student: {model: mlp}\n".encode("utf-16"), ["not UTF-8", "UTF-16"]),
        (bytes(range(256)) * 4, ["not UTF-8", "binary"]),
    ],
)
def test_bad_yaml_files_are_one_line(tmp_path, capsys, data, expect):
    p = tmp_path / "c.yaml"
    p.write_bytes(data)
    err = _train_err(capsys, p)
    assert "config" in err and "c.yaml" in err
    for e in expect:
        assert e in err, err


def test_billion_laughs_is_refused_briefly(tmp_path, capsys):
    lines = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    p = tmp_path / "lol.yaml"
    p.write_text("\n".join(lines) + "\nstudent: *i\n")
    assert p.stat().st_size < 1024
    err = _train_err(capsys, p)
    assert "alias" in err and "10,000" in err and len(err) < 400


def test_size_cap_and_bom(tmp_path, capsys):
    big = tmp_path / "big.yaml"
    big.write_bytes(b"# " + b"x" * MAX_BYTES + b"\n")
    assert "5 MB" in _train_err(capsys, big)
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbf" + yaml.safe_dump(BASE).encode())
    assert C.load(bom).student.model == "mlp"
    assert read_yaml(_touch(tmp_path / "empty.yaml")) is None
    assert "is a directory" in _train_err(capsys, tmp_path)


def _touch(p):
    p.write_text("")
    return p


def test_merge_keys_still_work_and_condense_uses_the_strict_reader(tmp_path, capsys):
    p = tmp_path / "m.yaml"
    p.write_text("base: &b {x: 1, y: 2}\nc: {<<: *b, x: 3}\n")
    assert read_yaml(p)["c"] == {"x": 3, "y": 2}
    cond = tmp_path / "cond.yaml"
    cond.write_text("method: dm\nipc: 1\nipc: 2\n")
    assert "duplicate key 'ipc'" in _one_line_error(capsys, ["condense", str(cond)])


# -- shown values are bounded --------------------------------------------------------------


def test_values_in_messages_are_capped_and_one_line():
    msg = str(ConfigError("train.lr", "x" * 50_000_000, "a number"))
    assert len(msg) < 400 and "(50000000 chars)" in msg
    assert "\n" not in str(ConfigError("a\nb", "c\nd", "e\nf"))
    nested = [[list(range(1000))] * 1000] * 1000  # shared rows: huge if expanded
    assert len(show(nested)) < 300 and "items" in show(nested)


# -- MNIST IDX -----------------------------------------------------------------------------


def _idx(arr, code=0x08) -> bytes:
    return bytes([0, 0, code, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + \
        arr.tobytes()


def _mnist_dir(tmp_path, images: bytes, gz=True):
    d = tmp_path / "mnist"
    d.mkdir(exist_ok=True)
    labels = _idx(np.zeros(20, np.uint8))
    suffix = ".gz" if gz else ""
    img = d / f"t10k-images-idx3-ubyte{suffix}"
    if gz:
        img.write_bytes(gzip.compress(images))
        (d / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    else:
        img.write_bytes(images)
        (d / "t10k-labels-idx1-ubyte").write_bytes(labels)
    return d


GOOD = _idx(np.zeros((20, 28, 28), np.uint8))


@pytest.mark.parametrize(
    "images,gz,expect",
    [
        (b"\x08\x03" + GOOD[2:], True, "bad magic number"),
        (GOOD[:10], True, "short IDX header"),
        (GOOD[:-100], True, "truncated IDX file"),
        (b"\x00\x00\x42\x03" + GOOD[4:], True, "unknown data type 0x42"),
        (GOOD[:-100], False, "truncated IDX file"),
        (None, True, "truncated gzip"),
        (b"not gzip at all", None, "not a readable gzip"),
        (_idx(np.zeros(20, np.uint8)), True, "MNIST images are (N, H, W)"),
    ],
)
def test_corrupt_mnist_files(tmp_path, capsys, images, gz, expect):
    if images is None:  # a gzip cut in the middle of its stream
        d = _mnist_dir(tmp_path, GOOD)
        f = d / "t10k-images-idx3-ubyte.gz"
        f.write_bytes(f.read_bytes()[:-30])
    elif gz is None:  # .gz name, raw bytes
        d = _mnist_dir(tmp_path, GOOD)
        (d / "t10k-images-idx3-ubyte.gz").write_bytes(images)
    else:
        d = _mnist_dir(tmp_path, images, gz)
    cfg = {**BASE, "data": {"name": "mnist", "root": str(d)}}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    err = _train_err(capsys, p)
    assert "data.root" in err and "t10k-" in err and expect in err, err


def test_default_mnist_path_names_the_real_paths(monkeypatch, tmp_path):
    from crossdistill.data import sources

    monkeypatch.delenv("CROSSDISTILL_DATA", raising=False)
    monkeypatch.setattr(sources, "PROJECT", tmp_path / "proj")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        sources.find_mnist_root(None)
    assert str(tmp_path / "shared" / "data" / "mnist-t10k") in str(e.value)  # ../ of the project


# -- wav -----------------------------------------------------------------------------------


def _wav(fmt=1, width=2, frames=100, data_bytes=None) -> bytes:
    data = b"\x00" * (frames * width if data_bytes is None else data_bytes)
    fmt_chunk = struct.pack("<HHIIHH", fmt, 1, 8000, 8000 * width, width, 8 * width)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt_chunk
    body += b"data" + struct.pack("<I", frames * width) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


@pytest.mark.parametrize(
    "data,expect",
    [
        (b"ID3\x03" + b"\x00" * 40, "not a WAV file"),
        (b"RIFF\x00\x00", "truncated: 6 bytes"),
        (_wav(fmt=3, width=4), "unsupported WAV format 3 (IEEE float)"),
        (_wav(data_bytes=50), "truncated"),
        (b"", "truncated: 0 bytes"),
    ],
)
def test_bad_wav_files(tmp_path, data, expect):
    p = tmp_path / "clip.wav"
    p.write_bytes(data)
    with pytest.raises(ConfigError) as e:
        read_wav(p, field="data.fsdd_root")
    msg = str(e.value)
    assert "\n" not in msg and "clip.wav" in msg and "data.fsdd_root" in msg
    assert expect in msg, msg
    assert len(read_wav(_write(tmp_path / "ok.wav", _wav()))) == 100


def _write(p, data):
    p.write_bytes(data)
    return p


# -- tokenizers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "where,name,content,expect",
    [
        ("missing", None, None, "no such path"),
        ("file", "tokenizer.json", b"{not json", "not valid JSON (line 1"),
        ("file", "tokenizer.json", b'{"vocab_size": 3}', "not a tokenizer"),
        ("file", "tokenizer.json", b'{"a": "\xff"}', "unreadable (not UTF-8 text)"),
        ("dir", "config.json", b"{}", "without a tokenizer"),
        ("dir", "tokenizer.json", b"[1, 2]", "not a tokenizer"),
    ],
)
def test_bad_tokenizer_files(tmp_path, where, name, content, expect):
    path = tmp_path / "tok"
    if where == "dir":
        path.mkdir()
        _write(path / name, content)
    elif where == "file":
        path = _write(tmp_path / name, content)
    with pytest.raises(ConfigError) as e:
        load_tokenizer(path, field="data.tokenizer")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("data.tokenizer") and expect in msg, msg


# -- safetensors and permissions -----------------------------------------------------------


@pytest.mark.parametrize("cut", ["header", "body", "garbage"])
def test_bad_safetensors_checkpoint_is_one_line(tmp_path, capsys, cut):
    good = save_weights({"w": torch.zeros(1000)}, tmp_path / "w.safetensors").read_bytes()
    data = {"header": good[:20], "body": good[:-100], "garbage": b"\xff" * 64}[cut]
    bad = _write(tmp_path / "bad.safetensors", data)
    cfg = {**BASE, "student": {**BASE["student"], "checkpoint": str(bad)}}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    err = _train_err(capsys, p)
    assert "student.checkpoint" in err and "bad.safetensors" in err
    assert "not a readable safetensors file" in err


def test_weights_and_checkpoints_get_normal_permissions(tmp_path):
    w = save_weights({"w": torch.zeros(3)}, tmp_path / "a.safetensors")
    checkpoint.save({"x": torch.zeros(2)}, tmp_path / "last.ckpt")
    for p in (w, tmp_path / "last.ckpt"):
        assert os.stat(p).st_mode & 0o777 == file_mode()
    assert file_mode() & 0o044  # readable by others under the usual umask 022
    assert not list(tmp_path.glob(".*.tmp"))


def test_json_is_not_a_safetensors_file(tmp_path):
    from crossdistill.io import load_weights

    p = _write(tmp_path / "w.safetensors", json.dumps({"a": 1}).encode())
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        load_weights(p)
