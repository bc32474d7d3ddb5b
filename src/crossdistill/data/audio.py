"""Audio front end without torchaudio: WAV reading (stdlib ``wave``), an HTK mel filterbank
and log-mel spectrograms via ``torch.stft``.

Log-mels are shaped like one-channel images, ``(1, n_mels, frames)``, so the audio models of
the zoo and the image pipeline (batching, taps, projectors) apply unchanged. Clips are made
a fixed number of frames long by centre-cropping or zero-padding the *waveform* before the
STFT, so padded frames are the log-mel of silence rather than an arbitrary constant and a
batch of clips is one batched ``torch.stft`` call.
"""

from __future__ import annotations

import math
import wave
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError

LOG_EPS = 1e-6  # floor of the mel power before the log: silence maps to log(1e-6) ~ -13.8


WAV_FORMATS = {2: "ADPCM", 3: "IEEE float", 6: "A-law", 7: "mu-law", 0xFFFE: "extensible"}


def _check_riff(path: Path, field: str) -> None:
    """The 12-byte RIFF/WAVE preamble, checked before ``wave`` (whose errors are terse)."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except FileNotFoundError:
        raise ConfigError(field, str(path), "no such file") from None
    except OSError as err:
        raise ConfigError(field, str(path), f"cannot read it ({err.strerror})") from None
    if len(head) < 12:
        raise ConfigError(
            field, str(path), f"truncated: {len(head)} bytes, shorter than a WAV header"
        )
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise ConfigError(
            field, str(path), f"not a WAV file: it starts {head[:4]!r}...{head[8:12]!r}, "
            "a WAV file starts b'RIFF'...b'WAVE'"
        )


def _wav_problem(e: Exception) -> str:
    text = str(e)
    if text.startswith("unknown format: "):
        code = int(text.split(":")[1])
        name = WAV_FORMATS.get(code, "unknown")
        return f"unsupported WAV format {code} ({name}); only integer PCM (format 1) is read"
    if isinstance(e, EOFError):
        return "truncated WAV file (a chunk ends early)"
    why = f"{type(e).__name__}: {e}" if text else type(e).__name__
    return f"not a readable PCM WAV file ({why})"


def read_wav(
    path,
    sample_rate: int | None = 8000,
    field: str = "data.audio",
    *,
    resample: bool = False,
) -> torch.Tensor:
    """The samples of a PCM WAV file as a float32 tensor ``(T,)`` in [-1, 1] (channels are
    averaged to mono).

    A different sample rate than ``sample_rate`` is an error rather than a silent resample:
    the mel bins would be wrong. ``resample=True`` converts it with :func:`resample_wave` (a
    windowed-sinc low-pass interpolator) instead; ``sample_rate=None`` accepts any rate.
    """
    path = Path(path)
    _check_riff(path, field)
    try:
        with wave.open(str(path), "rb") as w:
            channels, width, rate, n = (
                w.getnchannels(),
                w.getsampwidth(),
                w.getframerate(),
                w.getnframes(),
            )
            raw = w.readframes(n)
    except FileNotFoundError:
        raise ConfigError(field, str(path), "no such file") from None
    except Exception as e:  # corrupt headers raise wave.Error, EOFError, RuntimeError, ...
        raise ConfigError(field, str(path), _wav_problem(e)) from None
    if sample_rate is not None and rate != sample_rate and not resample:
        raise ConfigError(
            field,
            str(path),
            f"sample rate is {rate} Hz but {sample_rate} Hz is expected "
            "(resample the file, declare its rate, or resample on load: resample: true)",
        )
    if width not in (1, 2, 3, 4):
        raise ConfigError(field, str(path), f"unsupported sample width {width} bytes")
    if n == 0 or len(raw) < n * width * channels:
        got = len(raw) // max(width * channels, 1)
        raise ConfigError(
            field, str(path), f"truncated or empty WAV: header says {n} frames, data holds {got}"
        )
    if width == 1:  # 8-bit WAV is unsigned
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 3:  # 24-bit little-endian: widen to int32
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
    else:
        dt = "<i2" if width == 2 else "<i4"
        x = np.frombuffer(raw, dt).astype(np.float32) / float(1 << (8 * width - 1))
    x = x.reshape(-1, channels).mean(1)
    out = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if sample_rate is not None and rate != sample_rate:
        out = resample_wave(out, rate, sample_rate)
    return out


def resample_wave(
    x: torch.Tensor, orig_rate: int, new_rate: int, *, zeros: int = 16, rolloff: float = 0.945
) -> torch.Tensor:
    """``x`` (..., T) from ``orig_rate`` to ``new_rate`` Hz by band-limited (windowed-sinc)
    interpolation: output sample ``n`` sits at input time ``p = n * orig_rate / new_rate``
    and is ``sum_k x[k] h(p - k)`` with ``h(d) = 2 f_c sinc(2 f_c d) w(d)``, a low-pass at
    ``f_c = rolloff * min(orig, new) / (2 orig)`` cycles per input sample (below both
    Nyquists, so downsampling does not alias), ``w`` a Hann window spanning ``zeros`` zero
    crossings of the sinc each side. Samples beyond the ends count as 0. Output length
    ``ceil(T * new_rate / orig_rate)``; computed in float64 and returned as ``x``'s dtype."""
    for name, v in (("orig_rate", orig_rate), ("new_rate", new_rate)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"data.{name}", v, "a positive int (Hz)")
    if orig_rate == new_rate:
        return x
    t = x.shape[-1]
    n_out = math.ceil(t * new_rate / orig_rate)
    fc = 0.5 * rolloff * min(orig_rate, new_rate) / orig_rate
    half = zeros / (2 * fc)  # window half-width, in input samples
    p = torch.arange(n_out, dtype=torch.float64) * (orig_rate / new_rate)  # (n_out,)
    offs = torch.arange(-math.ceil(half), math.ceil(half) + 1)
    k = torch.floor(p).long()[:, None] + offs  # (n_out, taps) input indices
    d = p[:, None] - k
    h = 2 * fc * torch.sinc(2 * fc * d) * torch.where(
        d.abs() < half, 0.5 * (1 + torch.cos(math.pi * d / half)), torch.zeros(())
    ).double()
    valid = (k >= 0) & (k < t)
    xs = x.double()[..., k.clamp(0, t - 1)] * valid  # (..., n_out, taps)
    return (xs * h).sum(-1).to(x.dtype)


def hz_to_mel(f):
    """HTK mel scale: ``2595 * log10(1 + f / 700)`` (float or tensor)."""
    if torch.is_tensor(f):
        return 2595.0 * torch.log10(1.0 + f / 700.0)
    return 2595.0 * math.log10(1.0 + f / 700.0)


def mel_to_hz(m):
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(
    n_mels: int, n_fft: int, sample_rate: int, *, fmin: float = 0.0, fmax: float | None = None
) -> torch.Tensor:
    """Triangular HTK mel filters, ``(n_mels, n_fft // 2 + 1)``, peak 1 (no area norm).

    Filter ``m`` rises from mel point ``m`` to ``m + 1`` and falls to ``m + 2``, with
    ``n_mels + 2`` points equally spaced in mel between ``fmin`` and ``fmax`` (default
    Nyquist). Weights are evaluated at each FFT bin's exact frequency (not rounded to bins),
    so narrow low filters are never empty, and between the first and last centres the
    filters sum to 1 per bin (a partition of unity: no band is over- or under-weighted).
    """
    for name, v in (("n_mels", n_mels), ("n_fft", n_fft), ("sample_rate", sample_rate)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"data.{name}", v, "a positive int")
    fmax = sample_rate / 2 if fmax is None else fmax
    if not 0 <= fmin < fmax <= sample_rate / 2:
        raise ConfigError("data.fmax", (fmin, fmax), f"need 0 <= fmin < fmax <= {sample_rate / 2}")
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    mels = torch.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2, dtype=torch.float64)
    hz = mel_to_hz(mels)
    lo, mid, hi = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    up = (freqs[None] - lo) / (mid - lo)
    down = (hi - freqs[None]) / (hi - mid)
    fb = torch.clamp(torch.minimum(up, down), min=0.0)
    return fb.float()


def mel_centers(n_mels: int, sample_rate: int, fmin: float = 0.0, fmax: float | None = None):
    """Centre frequency (Hz) of each filter of :func:`mel_filterbank`."""
    fmax = sample_rate / 2 if fmax is None else fmax
    mels = torch.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2, dtype=torch.float64)
    return mel_to_hz(mels)[1:-1].float()


def fit_length(wave_: torch.Tensor, length: int) -> torch.Tensor:
    """Centre-crop or zero-pad (at the end) the last dim to ``length`` samples. FSDD clips
    are trimmed to the word, so the middle of a long clip holds most of it."""
    t = wave_.shape[-1]
    if t >= length:
        start = (t - length) // 2
        return wave_[..., start : start + length]
    return torch.nn.functional.pad(wave_, (0, length - t))


def log_mels(
    waves: Sequence[torch.Tensor] | torch.Tensor,
    sample_rate: int = 8000,
    n_mels: int = 40,
    n_fft: int = 256,
    hop: int = 80,
    frames: int = 48,
) -> torch.Tensor:
    """Batched :func:`log_mel`: ``(N, 1, n_mels, frames)`` from N clips of any lengths."""
    for name, v in (("hop", hop), ("frames", frames)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"data.{name}", v, "a positive int")
    length = (frames - 1) * hop  # a centred STFT of (frames - 1) * hop samples has `frames`
    if torch.is_tensor(waves) and waves.dim() == 2:
        batch = fit_length(waves.float(), length)
    else:
        batch = torch.stack([fit_length(w.reshape(-1).float(), length) for w in waves])
    spec = torch.stft(
        batch,
        n_fft,
        hop_length=hop,
        window=torch.hann_window(n_fft),
        center=True,
        pad_mode="constant",
        return_complex=True,
    )
    power = spec.real.square() + spec.imag.square()  # (N, n_fft//2+1, frames)
    mel = mel_filterbank(n_mels, n_fft, sample_rate) @ power
    return torch.log(mel + LOG_EPS)[:, None, :, :frames].contiguous()


def log_mel(
    wave: torch.Tensor,
    sample_rate: int = 8000,
    n_mels: int = 40,
    n_fft: int = 256,
    hop: int = 80,
    frames: int = 48,
) -> torch.Tensor:
    """Log mel power spectrogram ``(1, n_mels, frames)`` of one clip ``(T,)``.

    Hann-windowed centred STFT (``n_fft=256``, ``hop=80``: 32 ms windows every 10 ms at
    8 kHz), power, HTK mel filters, ``log(mel + 1e-6)``. The waveform is centre-cropped or
    zero-padded to ``(frames - 1) * hop`` samples first (48 frames = 0.47 s at the defaults;
    FSDD clips last 0.2-0.9 s).
    """
    return log_mels([wave], sample_rate, n_mels, n_fft, hop, frames)[0]
