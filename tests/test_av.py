"""Audio front end, paired image+audio data (synthetic always; real MNIST+FSDD when present)
and the late-fusion model."""

from __future__ import annotations

import copy
import gzip
import math
import struct
import wave

import numpy as np
import pytest
import torch

from crossdistill.data.audio import log_mel, log_mels, mel_centers, mel_filterbank, read_wav
from crossdistill.data.av import fsdd_index, pair_recordings, paired_av, speaker_split
from crossdistill.data.sources import find_mnist_root
from crossdistill.errors import ConfigError
from crossdistill.models import create, fusion  # noqa: F401  (registers fusion)

SR = 8000


def write_wav(path, samples, rate=SR, width=2, channels=1):
    x = np.asarray(samples, dtype=np.float64)
    x = np.repeat(x[:, None], channels, 1)
    if width == 2:
        data = np.round(np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()
    else:  # 8-bit unsigned
        data = np.round(np.clip(x, -1, 1) * 127 + 128).astype(np.uint8).tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(data)


def tone(freq, seconds=0.3, amp=0.5, rate=SR):
    t = np.arange(int(seconds * rate)) / rate
    return amp * np.sin(2 * math.pi * freq * t)


# -- WAV reading -----------------------------------------------------------------------


def test_read_wav_roundtrip_and_formats(tmp_path):
    x = tone(440)
    write_wav(tmp_path / "a.wav", x)
    w = read_wav(tmp_path / "a.wav")
    assert w.dtype == torch.float32 and w.shape == (len(x),)
    assert torch.allclose(w, torch.from_numpy(x).float(), atol=1e-4)
    write_wav(tmp_path / "st.wav", x, channels=2)
    assert torch.allclose(read_wav(tmp_path / "st.wav"), w)
    write_wav(tmp_path / "u8.wav", x, width=1)
    assert torch.allclose(read_wav(tmp_path / "u8.wav"), w, atol=1e-2)
    write_wav(tmp_path / "hi.wav", x, rate=16000)
    assert len(read_wav(tmp_path / "hi.wav", sample_rate=None)) == len(x)


def test_read_wav_errors_name_the_file(tmp_path):
    write_wav(tmp_path / "hi.wav", tone(440), rate=16000)
    with pytest.raises(ConfigError, match=r"hi\.wav.*16000 Hz.*8000 Hz"):
        read_wav(tmp_path / "hi.wav")
    (tmp_path / "junk.wav").write_bytes(b"RIFF0000WAVEnot really")
    with pytest.raises(ConfigError, match=r"junk\.wav"):
        read_wav(tmp_path / "junk.wav")
    write_wav(tmp_path / "cut.wav", tone(440))
    raw = (tmp_path / "cut.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(raw[: len(raw) // 2])  # header promises more frames
    with pytest.raises(ConfigError, match=r"cut\.wav.*truncated"):
        read_wav(tmp_path / "cut.wav", field="data.fsdd_root")
    (tmp_path / "tiny.wav").write_bytes(b"RIFF")
    with pytest.raises(ConfigError, match=r"tiny\.wav"):
        read_wav(tmp_path / "tiny.wav")
    with pytest.raises(ConfigError, match="no such file"):
        read_wav(tmp_path / "missing.wav")


# -- mel filterbank and log-mel (golden) ----------------------------------------------


def test_mel_filterbank_shape_and_sums():
    fb = mel_filterbank(40, 256, SR)
    assert fb.shape == (40, 129) and fb.min() >= 0 and fb.max() <= 1
    rows = fb.sum(1)
    assert (rows > 0).all()  # no empty filter, even the narrow low ones
    # a triangle's sum over bins ~ its half-base width in bins; widths grow with frequency
    hz = torch.cat([torch.zeros(1), mel_centers(40, SR), torch.tensor([SR / 2])])
    half_base = (hz[2:] - hz[:-2]) / 2 / (SR / 256)
    wide = half_base > 3
    assert torch.allclose(rows[wide], half_base[wide], rtol=0.1)
    assert rows[-1] > 4 * rows[0]
    # overlapping triangles form a partition of unity between the first and last centres
    f = torch.linspace(0, SR / 2, 129)
    inside = (f >= hz[1]) & (f <= hz[-2])
    assert torch.allclose(fb.sum(0)[inside], torch.ones(int(inside.sum())), atol=1e-5)
    # HTK scale: 1000 Hz is ~1000 mel, centres are increasing
    from crossdistill.data.audio import hz_to_mel

    assert abs(hz_to_mel(1000.0) - 999.99) < 0.1
    assert (hz[1:] > hz[:-1]).all()


@pytest.mark.parametrize("freq", [250.0, 700.0, 1500.0, 3100.0])
def test_pure_tone_peaks_in_its_mel_bin(freq):
    lm = log_mel(torch.from_numpy(tone(freq, 0.5)).float())
    assert lm.shape == (1, 40, 48)
    fb = mel_filterbank(40, 256, SR)
    k = round(freq / (SR / 256))  # the FFT bin of the tone
    expect = int(fb[:, k].argmax())  # the mel filter that weights that bin most
    got = int(lm[0].mean(1).argmax())
    assert got == expect
    assert abs(float(mel_centers(40, SR)[got]) - freq) < 0.1 * freq + 40


def test_log_mel_crop_pad_and_batch():
    long = torch.from_numpy(tone(500, 1.0)).float()
    short = torch.from_numpy(tone(500, 0.1)).float()
    a = log_mel(long, frames=20)
    b = log_mel(short, frames=20)
    assert a.shape == b.shape == (1, 40, 20)
    assert torch.isfinite(b).all()
    assert b[0, :, -1].max() < -13  # zero-padded tail: the log-mel of silence, log(1e-6)
    assert a[0, :, -1].max() > 0
    batch = log_mels([long, short], frames=20)
    assert torch.allclose(batch[0], a, atol=1e-4) and torch.allclose(batch[1], b, atol=1e-4)
    assert log_mel(short, n_mels=24, frames=7).shape == (1, 24, 7)
    with pytest.raises(ConfigError, match="frames"):
        log_mel(short, frames=0)


# -- paired image+audio on a synthetic MNIST + FSDD copy ------------------------------


def write_idx(path, arr, code):
    arr = np.ascontiguousarray(arr)
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(
        ">" + "I" * arr.ndim, *arr.shape
    )
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(">u1").tobytes())


def make_fake_data(root, speakers=("ann", "bob", "cat"), per=2, skip=()):
    """100 MNIST-format images (10 per class) and spoken 'digits' = tones at 300 + 300 d Hz."""
    mn = root / "mnist"
    mn.mkdir()
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), 10).astype(np.uint8)
    x = rng.integers(0, 256, (100, 28, 28)).astype(np.uint8)
    write_idx(mn / "t10k-images-idx3-ubyte.gz", x, 0x08)
    write_idx(mn / "t10k-labels-idx1-ubyte.gz", y, 0x08)
    rec = root / "fsdd" / "recordings"
    rec.mkdir(parents=True)
    for si, s in enumerate(speakers):
        for d in range(10):
            if (s, d) in skip:
                continue
            for i in range(per):
                write_wav(
                    rec / f"{d}_{s}_{i}.wav",
                    tone(300 + 300 * d, 0.15 + 0.1 * i, 0.2 + si / 5 + i / 20),
                )
    (rec / "README.txt").write_text("not a recording")
    return str(mn), str(root / "fsdd")


def test_fsdd_index_and_speaker_split(tmp_path):
    _, fsdd = make_fake_data(tmp_path)
    idx = fsdd_index(fsdd)  # the FSDD repository root: recordings/ is found inside
    assert len(idx) == 60
    path, digit, speaker, i = idx[0]
    assert path.name == "0_ann_0.wav" and (digit, speaker, i) == (0, "ann", 0)
    assert speaker_split(t[2] for t in idx) == {"train": ["ann"], "val": ["bob"], "test": ["cat"]}
    six = ["theo", "george", "yweweler", "jackson", "lucas", "nicolas"]
    assert speaker_split(six) == {
        "train": ["george", "jackson", "lucas", "nicolas"],
        "val": ["theo"],
        "test": ["yweweler"],
    }
    with pytest.raises(ConfigError, match="3 speakers"):
        speaker_split(["a", "b"])
    with pytest.raises(ConfigError, match="data.fsdd_root"):
        fsdd_index(str(tmp_path / "nowhere"))


def test_pair_recordings_matches_labels_and_is_seeded():
    labels = torch.tensor([0, 1, 1, 2, 0, 2, 2])
    rec = torch.tensor([2, 0, 1, 2, 0, 1])
    p = pair_recordings(labels, rec, seed=3)
    assert torch.equal(rec[p], labels)
    assert torch.equal(p, pair_recordings(labels, rec, seed=3))
    with pytest.raises(ValueError):
        pair_recordings(torch.tensor([5]), rec, seed=0)


def test_paired_av_synthetic(tmp_path):
    mn, fsdd = make_fake_data(tmp_path)
    kw = dict(mnist_root=mn, fsdd_root=fsdd, n_mels=32, frames=16)
    d = paired_av("val", **kw)
    assert d.keys() == ["image", "audio", "y", "idx"]
    assert d.kinds == {"image": "image", "audio": "audio", "y": "label", "idx": "id"}
    assert d["image"].shape == (20, 1, 28, 28) and d["audio"].shape == (20, 1, 32, 16)
    assert d.info["speakers"]["val"] == ["bob"] and d.num_classes == 10
    assert (d["audio"].flatten(1).abs().amax(1) > 0).all()  # no real sample is "missing"
    # default: each clip standardised on its own
    assert d.info["audio"]["mean"] is None
    flat = d["audio"].flatten(1)
    assert torch.allclose(flat.mean(1), torch.zeros(20), atol=1e-4)
    # each image's audio is a recording of its own digit: the tone's mel bin tells it
    centres = mel_centers(32, SR)
    heard = d["audio"][:, 0].mean(2).argmax(1)
    expect = torch.tensor([int((centres - (300 + 300 * c)).abs().argmin()) for c in d["y"]])
    assert (heard - expect).abs().max() <= 1
    again = paired_av("val", **kw)
    assert torch.equal(again["audio"], d["audio"])
    other = paired_av("val", **kw, seed=1)
    assert torch.equal(other["y"], d["y"]) and torch.equal(other["image"], d["image"])
    assert not torch.equal(other["audio"], d["audio"])
    # train statistics: each mel bin of the train speakers' audio is standardised
    tr = paired_av("train", **kw, audio_norm="train")
    assert len(tr) == 60 and len(tr.info["audio"]["mean"]) == 32
    assert abs(float(tr["audio"].mean())) < 0.3
    with pytest.raises(ConfigError, match="audio_norm"):
        paired_av("val", mnist_root=mn, fsdd_root=fsdd, audio_norm="global")


def test_paired_av_missing_class_names_class_and_split(tmp_path):
    mn, fsdd = make_fake_data(tmp_path, skip={("cat", 3)})
    with pytest.raises(ConfigError, match=r"class 3.*'test'.*cat"):
        paired_av("test", mnist_root=mn, fsdd_root=fsdd)
    paired_av("val", mnist_root=mn, fsdd_root=fsdd, frames=8)  # other splits are fine


@pytest.fixture(scope="module")
def real_roots():
    try:
        mn = str(find_mnist_root(None))
        idx = fsdd_index(None)
    except ConfigError:
        pytest.skip("MNIST (../shared/data/mnist-t10k) or FSDD (../shared/data/fsdd) absent")
    return mn, str(idx[0][0].parent)


def test_paired_av_real(real_roots, one_thread):
    mn, fsdd = real_roots
    assert len(fsdd_index(fsdd)) == 3000
    d = paired_av("test", mnist_root=mn, fsdd_root=fsdd)
    assert len(d) == 2000 and d["audio"].shape == (2000, 1, 40, 48)
    assert d.info["speakers"] == {
        "train": ["george", "jackson", "lucas", "nicolas"],
        "val": ["theo"],
        "test": ["yweweler"],
    }
    assert torch.bincount(d["y"], minlength=10).min() > 0
    assert torch.isfinite(d["audio"]).all()


# -- the late-fusion model ------------------------------------------------------------


@pytest.fixture
def fusion_model():
    torch.manual_seed(0)
    return create("fusion", num_classes=10, image_size=28, audio_size=(40, 48), width=4, dim=16)


def test_fusion_shapes_stages_and_gradients(fusion_model):
    m = fusion_model
    assert m.family == "fusion" and m.feature_path == "fc"
    modules = dict(m.named_modules())
    assert all(s in modules for s in m.stages)
    assert any(s.startswith("image_branch.") for s in m.stages)
    assert any(s.startswith("audio_branch.") for s in m.stages)
    img, aud = torch.randn(3, 1, 28, 28), torch.randn(3, 1, 40, 48)
    out = m(img, aud)
    assert out.shape == (3, 10)
    out.sum().backward()
    for branch in (m.image_branch, m.audio_branch):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in branch.parameters())
    # builder-style arguments (img_size from the dataset's image key) work too
    b = create("fusion", num_classes=4, in_channels=1, img_size=28, width=4)
    assert b(img, aud).shape == (3, 4)
    with pytest.raises(ConfigError, match="img_size"):
        create("fusion", img_size=32, image_size=28)
    with pytest.raises(ConfigError, match="audio_size"):
        create("fusion", audio_size=40.5)


def test_fusion_averages_present_branches(fusion_model):
    m = fusion_model.eval()
    img, aud = torch.randn(4, 1, 28, 28), torch.randn(4, 1, 40, 48)
    with torch.no_grad():
        per = m.branch_logits(img, aud)
        both = m(img, aud)
        assert torch.allclose(both, (per["image"] + per["audio"]) / 2, atol=1e-5)
        # per-sample missing modality: row 1 has no audio, row 2 no image, row 3 neither
        aud2, img2 = aud.clone(), img.clone()
        aud2[1] = 0
        img2[2] = 0
        aud2[3] = 0
        img2[3] = 0
        mixed = m(img2, aud2)
        assert torch.allclose(mixed[0], both[0], atol=1e-5)
        assert torch.allclose(mixed[1], per["image"][1], atol=1e-5)
        assert torch.allclose(mixed[2], per["audio"][2], atol=1e-5)
        assert torch.allclose(mixed[3], m.fc.bias, atol=1e-6)  # nothing present: the prior
        # "image only" evaluation by zeroing the audio, or by leaving it out
        zeroed = m(img, torch.zeros_like(aud))
        assert torch.allclose(zeroed, per["image"], atol=1e-5)
        assert torch.allclose(m(img), per["image"], atol=1e-5)
        assert torch.allclose(m(audio=aud), per["audio"], atol=1e-5)
    with pytest.raises(ConfigError):
        m()


def test_fusion_missing_branch_gets_no_gradient(fusion_model):
    m = fusion_model
    img = torch.randn(3, 1, 28, 28)
    m(img, torch.zeros(3, 1, 40, 48)).sum().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in m.audio_branch.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.image_branch.parameters())


def test_fusion_batchnorm_sees_present_samples_only():
    """A dropped (all-zero) input never reaches a branch: its BatchNorm statistics in a
    mixed batch are those of the present samples alone, and its output row is zero."""
    torch.manual_seed(0)
    a = create("fusion", num_classes=10, image_size=28, audio_size=(40, 48), width=4, dim=16)
    b = copy.deepcopy(a)
    aud = torch.randn(6, 1, 40, 48) + 2.0
    mixed = aud.clone()
    mixed[::2] = 0  # rows 0, 2, 4 dropped
    a.train()
    b.train()
    out = a.audio_branch(mixed)
    b.audio_branch(aud[1::2])
    bn_a, bn_b = a.audio_branch.stage1[1], b.audio_branch.stage1[1]
    assert torch.allclose(bn_a.running_mean, bn_b.running_mean, atol=1e-6)
    assert torch.allclose(bn_a.running_var, bn_b.running_var, atol=1e-6)
    assert (out[::2] == 0).all() and (out[1::2] != 0).any()
