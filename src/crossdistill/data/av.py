"""Audio-visual digits: MNIST images paired with spoken digits from FSDD by class label (the
AV-MNIST construction), for cross-modal distillation (an audio or fusion teacher, an image
student, or the reverse).

Speaker split (test speakers are unseen in training): the sorted speaker names are split
into train = all but the last two, val = the second last, test = the last. For the six
FSDD speakers that is train = george, jackson, lucas, nicolas; val = theo;
test = yweweler. Images come from the MNIST split of the same name (``load``'s fixed split),
so both modalities are disjoint across splits.

Each image gets one recording of its digit from its split's speakers, drawn uniformly with
a fixed pairing seed (recordings repeat: 6,000 train images share ~2,000 recordings).
Audio is a log-mel ``(1, n_mels, frames)`` standardised per utterance (each clip to zero
mean, unit std: robust to the unseen speakers' loudness; ``audio_norm="train"`` uses the
train speakers' per-mel-bin mean/std instead), so no real sample is all zeros: an
all-zero input can mean "modality missing" (see the ``fusion`` model).

``noise`` gives the corrupted variant (audio noise at an SNR, image occlusion; see
:mod:`crossdistill.data.av_noise`), e.g. ``data: {name: av, params: {noise:
{audio_snr_db: 10, occlusion: 0.25, seed: 0}}}``.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import torch

from ..errors import ConfigError
from ..schema import Width
from .audio import log_mels, read_wav
from .dataset import Dataset

FSDD_DEFAULT_ROOTS = (
    "$CROSSDISTILL_DATA/fsdd/recordings",
    "../shared/data/fsdd/recordings",
    "data/fsdd/recordings",
)
FSDD_RATE = 8000
HOP = 80  # log_mels' default hop (10 ms at 8 kHz)
AUDIO_NORMS = {
    "train": "per mel bin, mean/std of all train-speaker log-mels",
    "utterance": "per clip, its own mean/std",
}
_NAME = re.compile(r"^(\d)_([A-Za-z0-9-]+)_(\d+)\.wav$")


def find_fsdd_root(root: str | None = None) -> Path:
    """The directory holding ``{digit}_{speaker}_{index}.wav`` (``root`` itself or its
    ``recordings/`` subfolder, as in the FSDD repository)."""
    from .sources import PROJECT

    defaults = [Path(os.path.expandvars(r)) for r in FSDD_DEFAULT_ROOTS]
    candidates = (
        [root]
        if root
        else [str(p if p.is_absolute() else (PROJECT / p).resolve()) for p in defaults
              if "$" not in str(p)]
    )
    for c in candidates:
        for p in (Path(c), Path(c) / "recordings"):
            if p.is_dir() and any(_NAME.match(f.name) for f in p.iterdir()):
                return p
    raise ConfigError(
        "data.fsdd_root",
        root or candidates,
        "no FSDD recordings there; give the directory of {digit}_{speaker}_{index}.wav files",
    )


def fsdd_index(root: str | None = None) -> list[tuple[Path, int, str, int]]:
    """Every recording as ``(path, digit, speaker, index)``, sorted by speaker, digit and
    index (a stable order that does not depend on the file system)."""
    r = find_fsdd_root(root)
    out = []
    for f in r.iterdir():
        m = _NAME.match(f.name)
        if m:
            out.append((f, int(m.group(1)), m.group(2), int(m.group(3))))
    out.sort(key=lambda t: (t[2], t[1], t[3]))
    return out


def speaker_split(speakers) -> dict[str, list[str]]:
    """Fixed split of speakers: test = last, val = second last, train = the rest (sorted)."""
    s = sorted(set(speakers))
    if len(s) < 3:
        raise ConfigError("data.fsdd_root", s, "need recordings from at least 3 speakers")
    return {"train": s[:-2], "val": [s[-2]], "test": [s[-1]]}


def pair_recordings(labels: torch.Tensor, rec_labels: torch.Tensor, seed: int) -> torch.Tensor:
    """For each label, the index of a recording with the same label, drawn uniformly and
    reproducibly (one generator, classes in increasing order). A label without recordings
    raises a ValueError naming it (callers turn it into a ConfigError)."""
    g = torch.Generator().manual_seed(int(seed))
    out = torch.empty(len(labels), dtype=torch.long)
    for c in torch.unique(labels).tolist():
        want = (labels == c).nonzero().flatten()
        pool = (rec_labels == c).nonzero().flatten()
        if len(pool) == 0:
            raise ValueError(c)
        out[want] = pool[torch.randint(0, len(pool), (len(want),), generator=g)]
    return out


@functools.lru_cache(maxsize=1)
def _fsdd_waves(root: str, resample: bool = False):
    """Every FSDD clip's samples at 8 kHz, digit and speaker (cached per process; callers
    never modify them). A file of another rate is refused (a ConfigError naming it, its
    rate and 8000 Hz) unless ``resample`` (then :func:`~crossdistill.data.audio.resample_wave`)."""
    index = fsdd_index(root)
    waves = [read_wav(p, FSDD_RATE, field="data.fsdd_root", resample=resample) for p, *_ in index]
    return waves, torch.tensor([t[1] for t in index]), [t[2] for t in index]


@functools.lru_cache(maxsize=2)
def _fsdd_log_mels(root: str, n_mels: int, frames: int, resample: bool = False):
    """Every FSDD clip's log-mel (N, 1, n_mels, frames), digit and speaker. Cached per
    process: the train, val and test splits each need all of them (about 3 s for 3,000
    clips); callers never modify the returned tensors in place."""
    waves, digits, speakers = _fsdd_waves(root, resample)
    mels = log_mels(waves, FSDD_RATE, n_mels=n_mels, frames=frames)
    return mels, digits, speakers


def _noisy_log_mels(root, pick, ids, noise, n_mels, frames, resample, chunk=1024):
    """Log-mels of recordings ``pick`` with each sample's own noise (see ``av_noise``)."""
    from .av_noise import noisy_waves

    waves = _fsdd_waves(root, resample)[0]
    length = (frames - 1) * HOP
    out = []
    for i in range(0, len(pick), chunk):  # bounded STFT memory
        sel = pick[i : i + chunk].tolist()
        batch = noisy_waves([waves[j] for j in sel], ids[i : i + chunk], noise.audio_snr_db,
                            noise.seed, length)
        out.append(log_mels(batch, FSDD_RATE, n_mels=n_mels, hop=HOP, frames=frames))
    return torch.cat(out)


def paired_av(
    split: str,
    *,
    mnist_root: str | None = None,
    fsdd_root: str | None = None,
    seed: int = 0,
    n_mels: Width = 40,
    frames: Width = 48,
    audio_norm: str = "utterance",
    noise: dict | None = None,
    resample: bool = False,
) -> Dataset:
    """The AV-MNIST-style split ``split``: keys ``image`` (N, 1, 28, 28), ``audio``
    (N, 1, n_mels, frames), ``y`` and ``idx`` (the MNIST image ids), N = the MNIST split's
    size. All FSDD log-mels are computed once per process and kept in memory (3,000 clips).

    ``audio_norm="utterance"`` (default) standardises each clip by its own mean/std, which
    removes per-speaker loudness: with ``"train"`` (each mel bin standardised by the train
    speakers' mean/std) the unseen test speaker sits about one std below zero, and a short
    fusion run (width 8, 300 steps) scored 61% vs 75% test accuracy with both modalities.

    ``noise`` (``{audio_snr_db, occlusion, seed, splits}``, see
    :mod:`crossdistill.data.av_noise`) corrupts the audio waveform at an SNR and occludes a
    square of each image, seeded per sample id: every run sees the same corrupted set.
    ``resample=True`` resamples recordings that are not at 8 kHz instead of refusing them.
    """
    from . import SPLITS, load
    from .av_noise import occlude, parse_noise

    if split not in SPLITS:
        raise ConfigError("data.split", split, f"allowed: {', '.join(SPLITS)}")
    if audio_norm not in AUDIO_NORMS:
        raise ConfigError("data.audio_norm", audio_norm, f"allowed: {', '.join(AUDIO_NORMS)}")
    if not isinstance(resample, bool):
        raise ConfigError("data.resample", resample, "true or false")
    spec = parse_noise(noise)
    images = load("mnist", split, root=mnist_root)
    root = str(find_fsdd_root(fsdd_root))
    mels, rec_y, rec_spk = _fsdd_log_mels(root, n_mels, frames, resample)
    speakers = speaker_split(rec_spk)
    if audio_norm == "utterance":
        mean, std = torch.zeros(1), torch.ones(1)
    else:
        train = torch.tensor([s in speakers["train"] for s in rec_spk])
        mean = mels[train].mean(dim=(0, 3), keepdim=True)[0]  # per mel bin: (1, n_mels, 1)
        std = mels[train].std(dim=(0, 3), keepdim=True)[0].clamp_min(1e-5)
    mine = torch.tensor([s in speakers[split] for s in rec_spk]).nonzero().flatten()
    img_classes, aud_classes = set(images.y.tolist()), set(rec_y[mine].tolist())
    for c in sorted(img_classes ^ aud_classes):
        have, lack = ("images", "recordings") if c in img_classes else ("recordings", "images")
        raise ConfigError(
            f"data.{split}",
            f"class {c}",
            f"class {c} has {have} but no {lack} in split {split!r} "
            f"(speakers {', '.join(speakers[split])}); both modalities need every class",
        )
    pick = mine[pair_recordings(images.y, rec_y[mine], seed * 1_000_003 + SPLITS.index(split))]
    noisy = spec is not None and spec.applies(split)
    if noisy and spec.audio_snr_db is not None:
        raw = _noisy_log_mels(root, pick, images.idx, spec, n_mels, frames, resample)
    else:
        raw = mels[pick]
    if audio_norm == "utterance":  # each clip by its own mean/std
        raw_mean = raw.mean(dim=(1, 2, 3), keepdim=True)
        raw_std = raw.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-5)
        audio = ((raw - raw_mean) / raw_std).contiguous()
    else:  # the clean train speakers' statistics, noisy or not
        audio = ((raw - mean) / std).contiguous()
    image = images.x
    if noisy and spec.occlusion > 0:
        fill = -images.info["mean"] / images.info["std"]  # raw 0 (background), standardised
        image = occlude(image, images.idx, spec.occlusion, spec.seed, fill)
    info = {
        **images.info,
        "construction": (
            f"MNIST {split} images, each paired with a random FSDD recording of the same "
            f"digit by the {split} speakers (pairing seed {seed})"
        ),
        "speakers": speakers,
        "seed": seed,
        "fsdd_root": root,
        "audio": {
            "sample_rate": FSDD_RATE,
            "n_mels": n_mels,
            "frames": frames,
            "n_fft": 256,
            "hop": HOP,
            "normalize": AUDIO_NORMS[audio_norm],
            "mean": mean.flatten().tolist() if audio_norm == "train" else None,
            "std": std.flatten().tolist() if audio_norm == "train" else None,
        },
        "recordings": len(mine),
        "noise": spec.describe() if noisy else None,
        "resample": resample,
    }
    return Dataset(
        {"image": image, "audio": audio, "y": images.y, "idx": images.idx},
        {"image": "image", "audio": "audio", "y": "label"},
        name="av-mnist",
        split=split,
        num_classes=images.num_classes,
        info=info,
    )
