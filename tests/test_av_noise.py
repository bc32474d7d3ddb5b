"""Corrupted audio-visual digits (audio noise at an SNR, image occlusion), their option
checks, and audio at another sample rate (refused, or resampled on request)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_av import make_fake_data, tone, write_wav

from crossdistill.data import load_split
from crossdistill.data.audio import fit_length, log_mel, read_wav, resample_wave
from crossdistill.data.av import paired_av
from crossdistill.data.av_noise import noisy_waves, occlude, parse_noise, sample_generator
from crossdistill.errors import ConfigError


@pytest.fixture
def fake(tmp_path):
    mn, fsdd = make_fake_data(tmp_path)
    return dict(mnist_root=mn, fsdd_root=fsdd, n_mels=32, frames=16)


# -- option checks --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec,field",
    [
        ({"occlusion": 1.0}, "data.noise.occlusion"),
        ({"occlusion": -0.1}, "data.noise.occlusion"),
        ({"occlusion": "a lot"}, "data.noise.occlusion"),
        ({"audio_snr_db": float("nan")}, "data.noise.audio_snr_db"),
        ({"audio_snr_db": 1e9}, "data.noise.audio_snr_db"),
        ({"audio_snr_db": True}, "data.noise.audio_snr_db"),
        ({"seed": -1}, "data.noise.seed"),
        ({"seed": 1.5}, "data.noise.seed"),
        ({"splits": ["test", "dev"]}, "data.noise.splits"),
        ({"splits": []}, "data.noise.splits"),
        ({"snr": 10}, "data.noise.snr"),
        ([10, 0.2], "data.noise"),
    ],
)
def test_noise_options_are_checked(spec, field):
    with pytest.raises(ConfigError) as err:
        parse_noise(spec)
    assert err.value.field == field


def test_noise_option_defaults():
    assert parse_noise(None) is None
    n = parse_noise({"audio_snr_db": 10, "splits": "test"})
    assert (n.audio_snr_db, n.occlusion, n.seed, n.splits) == (10.0, 0.0, 0, ("test",))
    assert not n.applies("train") and n.applies("test")
    assert parse_noise({"occlusion": 0.25}).splits == ("train", "val", "test")


# -- the corruptions ------------------------------------------------------------------------


def test_noisy_waves_hit_the_snr_and_are_seeded_per_sample():
    waves = [torch.from_numpy(tone(500 + 100 * i, 0.4, 0.1 + 0.2 * i)).float() for i in range(3)]
    ids = torch.tensor([7, 3, 11])
    length = 47 * 80
    for snr in (0.0, 10.0, 20.0):
        out = noisy_waves(waves, ids, snr, seed=0, length=length)
        assert out.shape == (3, length)
        for i, w in enumerate(waves):
            noise = out[i] - fit_length(w, length)
            got = 10 * math.log10(float(w.square().mean()) / float(noise.square().mean()))
            assert abs(got - snr) < 0.3
    a = noisy_waves(waves, ids, 10.0, seed=0, length=length)
    # a sample's noise depends on its id, not its position or its neighbours
    b = noisy_waves(waves[::-1], ids.flip(0), 10.0, seed=0, length=length)
    assert torch.equal(a, b.flip(0))
    assert not torch.equal(a, noisy_waves(waves, ids, 10.0, seed=1, length=length))
    g1, g2 = sample_generator(0, 5, 0), sample_generator(0, 5, 1)
    assert not torch.equal(torch.randn(4, generator=g1), torch.randn(4, generator=g2))


def test_occlusion_covers_the_fraction_with_the_fill():
    x = torch.randn(50, 1, 28, 28)
    ids = torch.arange(100, 150)
    out = occlude(x, ids, 0.25, seed=0, fill=-9.0)
    side = round(math.sqrt(0.25 * 28 * 28))  # 14
    assert torch.equal(x, x.clone()) and not torch.equal(out, x)  # input untouched
    covered = (out == -9.0).flatten(1).sum(1)
    assert (covered == side * side).all()
    assert abs(float(covered[0]) / (28 * 28) - 0.25) < 0.01
    assert torch.equal((out != x).flatten(1).any(1), torch.ones(50, dtype=torch.bool))
    rows = (out[:, 0] == -9.0).any(2).float().argmax(1)  # the patches' top rows differ
    assert len(set(rows.tolist())) > 3
    assert torch.equal(out, occlude(x, ids, 0.25, seed=0, fill=-9.0))
    assert torch.equal(occlude(x, ids, 0.0, seed=0, fill=-9.0), x)


# -- paired_av with noise ---------------------------------------------------------------------


def test_paired_av_noise_is_fixed_and_only_where_asked(fake):
    clean = paired_av("test", **fake)
    spec = {"audio_snr_db": 0, "occlusion": 0.3, "seed": 0}
    noisy = paired_av("test", **fake, noise=spec)
    assert torch.equal(noisy["y"], clean["y"]) and torch.equal(noisy["idx"], clean["idx"])
    assert noisy["audio"].shape == clean["audio"].shape
    assert not torch.allclose(noisy["audio"], clean["audio"], atol=0.1)
    # still standardised per clip, and never all zeros (zeros mean "missing")
    flat = noisy["audio"].flatten(1)
    assert torch.allclose(flat.mean(1), torch.zeros(len(flat)), atol=1e-4)
    assert (flat.abs().amax(1) > 0).all()
    # the occluded patch holds the background value (raw 0) where the image had ink
    fill = -clean.info["mean"] / clean.info["std"]
    patch = (noisy["image"] != clean["image"]).flatten(1)
    assert patch.any(1).all()
    assert torch.allclose(noisy["image"].flatten(1)[patch], torch.full((int(patch.sum()),), fill))
    assert noisy.info["noise"]["audio_snr_db"] == 0.0 and clean.info["noise"] is None
    # the same corrupted set every time; another seed corrupts differently
    again = paired_av("test", **fake, noise=spec)
    assert torch.equal(again["audio"], noisy["audio"])
    assert torch.equal(again["image"], noisy["image"])
    other = paired_av("test", **fake, noise={**spec, "seed": 1})
    assert not torch.equal(other["audio"], noisy["audio"])
    # SNR noise is milder at 30 dB than at 0 dB
    mild = paired_av("test", **fake, noise={"audio_snr_db": 30})

    def gap(d):
        return (d["audio"] - clean["audio"]).abs().mean()

    assert gap(mild) < gap(noisy)
    assert torch.equal(mild["image"], clean["image"])
    # splits: train clean, test noisy
    only_test = {**spec, "splits": ["test"]}
    assert torch.equal(
        paired_av("train", **fake, noise=only_test)["audio"], paired_av("train", **fake)["audio"]
    )
    assert torch.equal(paired_av("test", **fake, noise=only_test)["audio"], noisy["audio"])


def test_registered_av_noise_option_and_subsets(fake):
    root = fake.pop("mnist_root")
    spec = {"audio_snr_db": 5, "occlusion": 0.2}
    full = load_split("av", "test", root=root, noise=spec, **fake)
    part = load_split("av", "test", root=root, noise=spec, limit=10, **fake)
    pos = {int(i): k for k, i in enumerate(full["idx"])}
    rows = torch.tensor([pos[int(i)] for i in part["idx"]])
    assert torch.equal(part["image"], full["image"][rows])  # per-sample: same under a subset
    assert torch.allclose(part["audio"], full["audio"][rows])
    with pytest.raises(ConfigError, match=r"data\.noise\.occlusion.*\[0, 1\)"):
        load_split("av", "test", root=root, noise={"occlusion": 1.5}, **fake)


def test_config_accepts_the_noise_option(fake):
    from crossdistill.config import validate

    cfg = validate(
        {
            "student": {"model": "fusion-early", "width": 4, "inputs": ["image", "audio"]},
            "data": {
                "name": "av",
                "root": fake["mnist_root"],
                "params": {
                    "fsdd_root": fake["fsdd_root"],
                    "n_mels": 32,
                    "frames": 16,
                    "noise": {"audio_snr_db": 10, "occlusion": 0.25, "seed": 0},
                },
            },
        }
    )
    assert cfg.data.params["noise"]["occlusion"] == 0.25


# -- sample rates ------------------------------------------------------------------------------


def test_resample_matches_a_tone_sampled_at_the_new_rate():
    x16 = torch.from_numpy(tone(440, 0.5, rate=16000)).float()
    y = resample_wave(x16, 16000, 8000)
    ref = torch.from_numpy(tone(440, 0.5, rate=8000)).float()
    assert y.shape == ref.shape
    assert torch.allclose(y[50:-50], ref[50:-50], atol=1e-3)
    # band-limited: a 6 kHz tone is above the new 4 kHz Nyquist and is removed, not aliased
    hi = torch.from_numpy(tone(6000, 0.5, rate=16000)).float()
    assert resample_wave(hi, 16000, 8000)[50:-50].abs().max() < 1e-2
    up = resample_wave(torch.from_numpy(tone(440, 0.5, rate=4000)).float(), 4000, 8000)
    assert torch.allclose(up[50:-50], ref[50:-50], atol=1e-3)
    assert torch.equal(resample_wave(ref, 8000, 8000), ref)
    with pytest.raises(ConfigError, match="new_rate"):
        resample_wave(ref, 8000, 0)


def test_read_wav_other_rate_refused_or_resampled(tmp_path):
    write_wav(tmp_path / "hi.wav", tone(700, 0.4, rate=16000), rate=16000)
    with pytest.raises(ConfigError, match=r"hi\.wav.*16000 Hz.*8000 Hz.*resample: true"):
        read_wav(tmp_path / "hi.wav")
    w = read_wav(tmp_path / "hi.wav", resample=True)
    assert w.shape == (3200,)
    ref = torch.from_numpy(tone(700, 0.4)).float()
    assert torch.allclose(w[50:-50], ref[50:-50], atol=2e-3)
    # the log-mel of the resampled file is that of the 8 kHz recording (where there is energy:
    # near-silent bins are 16-bit rounding noise)
    a, b = log_mel(w), log_mel(ref)
    loud = b > b.max() - 6
    assert loud.sum() > 20 and torch.allclose(a[loud], b[loud], atol=0.05)


def test_paired_av_with_a_16k_recording(tmp_path):
    mn, fsdd = make_fake_data(tmp_path)
    bad = next((tmp_path / "fsdd" / "recordings").glob("4_bob_0.wav"))
    write_wav(bad, np.resize(tone(1500, 0.3, rate=16000), 4800), rate=16000)
    with pytest.raises(ConfigError, match=r"4_bob_0\.wav.*16000 Hz.*8000 Hz"):
        paired_av("val", mnist_root=mn, fsdd_root=fsdd, frames=12)
    d = paired_av("val", mnist_root=mn, fsdd_root=fsdd, frames=12, resample=True)
    assert torch.isfinite(d["audio"]).all() and d.info["resample"] is True
    with pytest.raises(ConfigError, match="data.resample"):
        paired_av("val", mnist_root=mn, fsdd_root=fsdd, resample="yes")
