"""Corrupted audio-visual digits: additive Gaussian noise on the audio at a given SNR and a
square occlusion patch on each image, for robustness and missing-information studies.

Every corruption is drawn from a generator seeded by ``(seed, sample id, corruption)``, not
by the sample's position, so a sample is corrupted the same way in every run, whatever
subset (``limit``) or batch order is used: the noisy test set is one fixed set.

* **Audio**: white Gaussian noise added to the *waveform*, before the log-mel, which is
  how noise reaches a microphone. Its power is the recording's mean power divided by
  ``10 ** (audio_snr_db / 10)`` (the SNR of the clip as recorded), and it covers the whole
  analysis window, including the zero-padding of a short clip (the "silence" around a word
  is noisy too). The log-mel is then standardised as the clean audio is.
* **Image**: one square patch of side ``round(sqrt(occlusion * H * W))`` (so about
  ``occlusion`` of the area) at a uniform position inside the image, filled with the
  standardised background value (raw 0): strokes under it are erased, no fake stroke is
  drawn.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

from ..errors import ConfigError
from .audio import fit_length

SPLIT_NAMES = ("train", "val", "test")
NOISE_FIELDS = ("audio_snr_db", "occlusion", "seed", "splits")
SNR_RANGE = (-60.0, 100.0)  # dB; beyond these the clip is pure noise or clean to float32
_AUDIO, _IMAGE = 0, 1  # salts: independent generators per corruption


@dataclass(frozen=True)
class Noise:
    """A validated ``noise`` option (see :func:`parse_noise`)."""

    audio_snr_db: float | None = None
    occlusion: float = 0.0
    seed: int = 0
    splits: tuple[str, ...] = SPLIT_NAMES

    def applies(self, split: str) -> bool:
        return split in self.splits

    def describe(self) -> dict:
        return {**asdict(self), "splits": list(self.splits)}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_noise(spec, field: str = "data.noise") -> Noise | None:
    """``{audio_snr_db, occlusion, seed, splits}`` checked field by field (None: no noise).

    ``audio_snr_db``: a number of dB in [-60, 100], or None (no audio noise);
    ``occlusion``: the occluded fraction of the image area, in [0, 1) (default 0);
    ``seed``: an int in [0, 2**32) (default 0); ``splits``: the splits corrupted (default
    all three; ``[test]`` trains on clean data and tests on noisy)."""
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        raise ConfigError(field, spec, f"a dict with any of: {', '.join(NOISE_FIELDS)}")
    for k in spec:
        if k not in NOISE_FIELDS:
            raise ConfigError(
                f"{field}.{k}", spec[k], f"unknown; allowed: {', '.join(NOISE_FIELDS)}"
            )
    snr = spec.get("audio_snr_db")
    if snr is not None and not (_number(snr) and SNR_RANGE[0] <= snr <= SNR_RANGE[1]):
        raise ConfigError(
            f"{field}.audio_snr_db",
            snr,
            f"a number of dB in [{SNR_RANGE[0]:g}, {SNR_RANGE[1]:g}] or null (no audio noise)",
        )
    occ = spec.get("occlusion", 0.0)
    if not (_number(occ) and 0.0 <= occ < 1.0):
        raise ConfigError(f"{field}.occlusion", occ, "a fraction of the image area in [0, 1)")
    seed = spec.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ConfigError(f"{field}.seed", seed, "an int in [0, 2**32)")
    splits = spec.get("splits", list(SPLIT_NAMES))
    splits = [splits] if isinstance(splits, str) else splits
    if (
        not isinstance(splits, (list, tuple))
        or not splits
        or any(s not in SPLIT_NAMES for s in splits)
    ):
        raise ConfigError(
            f"{field}.splits", splits, f"a non-empty list of: {', '.join(SPLIT_NAMES)}"
        )
    return Noise(
        None if snr is None else float(snr), float(occ), seed, tuple(dict.fromkeys(splits))
    )


def sample_generator(seed: int, sample_id: int, salt: int) -> torch.Generator:
    """The generator of one sample's corruption ``salt``: a pure function of its arguments."""
    mixed = (int(seed) * 0x9E3779B97F4A7C15 + int(sample_id) * 4 + salt) % (2**63)
    return torch.Generator().manual_seed(mixed)


def noisy_waves(waves, ids: torch.Tensor, snr_db: float, seed: int, length: int) -> torch.Tensor:
    """``(N, length)``: each wave centre-cropped / zero-padded to ``length`` samples (as
    :func:`~crossdistill.data.audio.log_mels` does) plus white Gaussian noise of power
    ``mean(wave**2) / 10**(snr_db / 10)``; sample ``i``'s noise comes from ``ids[i]``."""
    out = torch.empty(len(waves), length)
    scale = 10.0 ** (-snr_db / 20.0)
    for i, (w, sid) in enumerate(zip(waves, ids.tolist())):
        w = w.reshape(-1).float()
        sigma = float(w.square().mean().sqrt()) * scale
        g = sample_generator(seed, sid, _AUDIO)
        out[i] = fit_length(w, length) + sigma * torch.randn(length, generator=g)
    return out


def occlude(
    images: torch.Tensor, ids: torch.Tensor, fraction: float, seed: int, fill: float
) -> torch.Tensor:
    """A copy of ``images`` (N, C, H, W) with one ``fill``-valued square per image covering
    about ``fraction`` of its area (side ``round(sqrt(fraction * H * W))``, at most
    ``min(H, W)``), at a position drawn from ``ids[i]``'s generator."""
    h, w = images.shape[-2:]
    side = min(round(math.sqrt(fraction * h * w)), h, w)
    out = images.clone()
    if side == 0:
        return out
    for i, sid in enumerate(ids.tolist()):
        g = sample_generator(seed, sid, _IMAGE)
        top = int(torch.randint(0, h - side + 1, (1,), generator=g))
        left = int(torch.randint(0, w - side + 1, (1,), generator=g))
        out[i, ..., top : top + side, left : left + side] = fill
    return out
