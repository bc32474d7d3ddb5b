"""Audio-visual digit strings: a toy lip-reading task for LIBS (Zhao et al., "Hearing Lips:
Improving Lip Reading by Distilling Speech Recognizers", AAAI 2020).

Each sample is a string of ``min_len..max_len`` random digits. Its audio is the FSDD clips of
those digits by one speaker (one speaker per string), joined in time; its "video" is MNIST
images of the same digits side by side, read left to right one pixel column at a time (28
frames of 28 values per digit), so the two modalities have different, unaligned lengths,
as lips and speech do. Splits reuse :mod:`crossdistill.data.av`: speakers by
:func:`~crossdistill.data.av.speaker_split` (test speaker unseen), images from the MNIST
split of the same name, so no clip and no image is shared across splits.

Audio: each clip (at most ``max_clip`` samples, cut at the end) becomes a log-mel
(:func:`~crossdistill.data.audio.log_mels`, ``hop`` samples per frame, 20 ms by default);
a string's frames are its clips' frames joined, standardised by the string's own mean/std.

Keys (padded along time with 0; lengths give the valid part): ``audio`` (N, T_a, n_mels),
``audio_len``; ``video`` (N, T_v, 28), ``video_len``; ``text`` (N, max_len) digit ids,
-100 after the end; ``text_len``; ``labels`` (N, max_len + 1): the digits, then ``EOS`` (10),
then -100 -- the decoder's targets (the task's target key); ``speaker`` (index into the
split's speakers); ``clip_ids`` / ``image_ids`` (N, max_len): the FSDD clip (index into
:func:`~crossdistill.data.av.fsdd_index`) and MNIST image id of each digit, -1 after the
end (provenance: splits share none); ``idx``. Everything is drawn from one generator
seeded by ``seed`` and the split.
"""

from __future__ import annotations

import functools

import torch

from ..errors import ConfigError
from ..registry import DATASETS
from .audio import log_mels
from .av import FSDD_RATE, _fsdd_waves, find_fsdd_root, speaker_split
from .dataset import IGNORE_INDEX, Dataset

EOS = 10  # end of string: the decoder's last target
BOS = 11  # start symbol: the decoder's first input
VOCAB = 12  # digits, EOS, BOS (outputs: the first 11)
SIZES = {"train": 2000, "val": 300, "test": 300}
SPLIT_OFFSET = 1_000_000


@functools.lru_cache(maxsize=2)
def _clip_mels(root: str, n_mels: int, hop: int, max_clip: int, resample: bool = False):
    """Every FSDD clip's log-mel frames ``(T_c, n_mels)`` (a list), digit and speaker."""
    waves, digits, speakers = _fsdd_waves(root, resample)
    mels = []
    for w in waves:
        w = w.reshape(-1)[:max_clip]
        m = log_mels([w], FSDD_RATE, n_mels=n_mels, hop=hop, frames=len(w) // hop + 1)
        mels.append(m[0, 0].T.contiguous())
    return mels, digits, speakers


def _int(field: str, v, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ConfigError(field, v, f"an int >= {lo}")
    return v


def _pad(seqs: list[torch.Tensor], value: float = 0.0, length: int | None = None) -> torch.Tensor:
    """Sequences stacked along a new first dim, padded with ``value`` to ``length`` (default:
    the longest)."""
    length = max(len(x) for x in seqs) if length is None else length
    out = torch.full((len(seqs), length, *seqs[0].shape[1:]), value, dtype=seqs[0].dtype)
    for i, x in enumerate(seqs):
        out[i, : len(x)] = x
    return out


def av_seq(
    split: str,
    *,
    n: int | dict | None = None,
    min_len: int = 2,
    max_len: int = 4,
    seed: int = 0,
    n_mels: int = 40,
    hop: int = 160,
    max_clip: int = 6000,
    mnist_root: str | None = None,
    fsdd_root: str | None = None,
    resample: bool = False,
    video_noise: float = 0.0,
) -> Dataset:
    """One split of the digit strings (module docstring). ``n``: strings in the split (an
    int or ``{split: int}``; default 2,000 / 300 / 300). ``video_noise``: the std of white
    Gaussian noise added to every video frame (standardised pixel units, seeded by ``seed``
    and the split; 0 = clean): a knob that makes "lip reading" harder than hearing, as it
    is in the paper, so that an audio teacher has something to teach."""
    from . import SPLITS, load

    if split not in SPLITS:
        raise ConfigError("data.split", split, f"allowed: {', '.join(SPLITS)}")
    size = (n.get(split, SIZES[split]) if isinstance(n, dict) else n) if n is not None else None
    size = _int("data.n", SIZES[split] if size is None else size)
    min_len, max_len = _int("data.min_len", min_len), _int("data.max_len", max_len)
    if max_len < min_len:
        raise ConfigError("data.max_len", max_len, f">= min_len ({min_len})")
    for f, v in (("n_mels", n_mels), ("hop", hop), ("max_clip", max_clip)):
        _int(f"data.{f}", v)
    _int("data.seed", seed, 0)
    if isinstance(video_noise, bool) or not isinstance(video_noise, (int, float)) or not (
            0 <= video_noise <= 100):
        raise ConfigError("data.video_noise", video_noise, "a number in [0, 100] (0 = clean)")
    images = load("mnist", split, root=mnist_root)
    root = str(find_fsdd_root(fsdd_root))
    mels, rec_y, rec_spk = _clip_mels(root, n_mels, hop, max_clip, resample)
    speakers = speaker_split(rec_spk)[split]
    spk_of = torch.tensor([speakers.index(s) if s in speakers else -1 for s in rec_spk])
    pools = {(s, d): ((spk_of == s) & (rec_y == d)).nonzero().flatten()
             for s in range(len(speakers)) for d in range(10)}
    img_pools = {d: (images.y == d).nonzero().flatten() for d in range(10)}
    for key, pool in [*pools.items(), *((("img", d), p) for d, p in img_pools.items())]:
        if len(pool) == 0:
            raise ConfigError(f"data.{split}", key, "every digit needs clips of every speaker "
                              "and images in this split")
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + SPLITS.index(split))
    audio, video, text, labels, spk, clip_ids, image_ids = [], [], [], [], [], [], []
    cols = images.x[:, 0].transpose(1, 2)  # (N, W, H): one row per image column
    for _ in range(size):
        length = int(torch.randint(min_len, max_len + 1, (), generator=g))
        digits = torch.randint(0, 10, (length,), generator=g)
        s = int(torch.randint(0, len(speakers), (), generator=g))
        clips, frames, cids, iids = [], [], [], []
        for d in digits.tolist():
            pool, ipool = pools[(s, d)], img_pools[d]
            c = int(pool[torch.randint(0, len(pool), (), generator=g)])
            k = int(ipool[torch.randint(0, len(ipool), (), generator=g)])
            clips.append(mels[c])
            frames.append(cols[k])
            cids.append(c)
            iids.append(int(images.idx[k]))
        clip_ids.append(torch.tensor(cids))
        image_ids.append(torch.tensor(iids))
        a = torch.cat(clips)
        audio.append((a - a.mean()) / a.std().clamp_min(1e-5))
        video.append(torch.cat(frames))
        text.append(digits)
        labels.append(torch.cat([digits, torch.tensor([EOS])]))
        spk.append(s)
    if video_noise:
        gn = torch.Generator().manual_seed(int(seed) * 1_000_003 + SPLITS.index(split) + 7)
        video = [v + video_noise * torch.randn(v.shape, generator=gn) for v in video]
    lens = lambda xs: torch.tensor([len(x) for x in xs])  # noqa: E731
    n_out = len(audio)
    return Dataset(
        {
            "audio": _pad(audio).float(),
            "audio_len": lens(audio),
            "video": _pad(video).float(),
            "video_len": lens(video),
            "text": _pad(text, IGNORE_INDEX, max_len).long(),
            "text_len": lens(text),
            "labels": _pad(labels, IGNORE_INDEX, max_len + 1).long(),
            "speaker": torch.tensor(spk),
            "clip_ids": _pad(clip_ids, -1, max_len).long(),
            "image_ids": _pad(image_ids, -1, max_len).long(),
            "idx": torch.arange(n_out) + SPLIT_OFFSET * SPLITS.index(split),
        },
        {
            "audio": "audio", "audio_len": "value", "video": "value", "video_len": "value",
            "text": "tokens", "text_len": "value", "labels": "tokens", "speaker": "value",
            "clip_ids": "value", "image_ids": "value",
        },
        name="av-seq",
        split=split,
        num_classes=EOS + 1,
        info={
            "construction": f"{size} strings of {min_len}-{max_len} digits: FSDD clips of one "
            f"{split} speaker joined (log-mel, hop {hop}) and MNIST {split} images read "
            "column by column" + (f", white noise std {video_noise} on the video"
                                  if video_noise else ""),
            "speakers": speakers,
            "seed": seed,
            "n_mels": n_mels,
            "hop": hop,
            "max_clip": max_clip,
            "eos": EOS,
            "bos": BOS,
            "vocab": VOCAB,
            "video_noise": video_noise,
        },
    )


@DATASETS.register(
    "av_seq",
    description="strings of 2-4 digits: FSDD clips of one speaker joined (audio) and MNIST "
    "images read column by column (video), digit labels + EOS (lip reading, LIBS)",
    splits=True,
    task="cer",
)
def _av_seq(
    split,
    root: str | None = None,
    split_seed: int = 0,
    n: int | dict | None = None,
    min_len: int = 2,
    max_len: int = 4,
    n_mels: int = 40,
    hop: int = 160,
    max_clip: int = 6000,
    fsdd_root: str | None = None,
    video_noise: float = 0.0,
):
    return av_seq(split, n=n, min_len=min_len, max_len=max_len, seed=split_seed, n_mels=n_mels,
                  hop=hop, max_clip=max_clip, mnist_root=root, fsdd_root=fsdd_root,
                  video_noise=video_noise)
