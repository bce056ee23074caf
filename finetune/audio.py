"""Audio utilities for fine-tuning data preparation (numpy/scipy/soundfile only)."""

from __future__ import annotations

import io
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

from finetune.fsutil import atomic_write

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

__all__ = [
    "TARGET_SAMPLE_RATE",
    "AudioError",
    "decode_audio_bytes",
    "duration_s",
    "load_audio",
    "normalize_loudness",
    "resample",
    "rms_dbfs",
    "speaker_mel",
    "trim_silence",
    "write_wav",
]

TARGET_SAMPLE_RATE = 24_000

# Speaker-encoder mel parameters (mlx_audio qwen3_tts.mel_spectrogram defaults).
_MEL_N_FFT = 1024
_MEL_N_MELS = 128
_MEL_HOP = 256
_MEL_WIN = 1024
_MEL_FMIN = 0.0
_MEL_FMAX = 12_000.0


class AudioError(ValueError):
    """Audio could not be loaded or decoded; the message names the source and reason."""


def _decode(
    source: str | BinaryIO,
    name: str,
    target_sr: int,
    mono: bool,
    max_seconds: float | None = None,
) -> np.ndarray:
    """Decode ``source`` with soundfile, down-mix, resample and validate.

    With ``max_seconds``, a longer file is refused from its header, before it is decoded, and
    at most that much is ever decoded (a header can lie): a small compressed file of hours of
    audio never reaches memory whole.
    """
    try:
        with sf.SoundFile(source) as handle:
            sr = handle.samplerate
            limit = None if max_seconds is None else int(max_seconds * sr) + 1
            if limit is not None and handle.frames > limit:
                raise AudioError(_too_long(name, handle.frames / sr, max_seconds))
            data = handle.read(
                frames=-1 if limit is None else limit, dtype="float32", always_2d=True
            )
    except (sf.SoundFileError, RuntimeError, ValueError, TypeError, EOFError) as exc:
        if isinstance(exc, AudioError):
            raise
        reason = str(exc)
        if isinstance(source, str):  # soundfile quotes the path it opened: never show it
            reason = reason.replace(source, name)
        raise AudioError(f"{name}: cannot decode audio ({reason})") from exc
    if limit is not None and data.shape[0] >= limit:
        raise AudioError(_too_long(name, data.shape[0] / sr, max_seconds))
    if data.shape[0] == 0:
        raise AudioError(f"{name}: audio is empty (zero samples)")
    if not np.all(np.isfinite(data)):
        raise AudioError(f"{name}: audio contains NaN or infinite samples")
    audio = data.mean(axis=1) if mono else data
    return resample(audio, int(sr), target_sr)


def _too_long(name: str, seconds: float, max_seconds: float | None) -> str:
    return f"{name}: {seconds:.1f} s of audio or more; the limit is {max_seconds:g} s"


def load_audio(
    path: str | os.PathLike[str],
    target_sr: int = TARGET_SAMPLE_RATE,
    *,
    mono: bool = True,
    max_seconds: float | None = None,
    name: str | None = None,
) -> np.ndarray:
    """Load an audio file as float32 at ``target_sr`` (``name``: how errors call it).

    Returns shape ``[samples]`` when ``mono`` (channels averaged), else ``[samples, channels]``.
    Raises AudioError for a missing, undecodable or empty file.
    """
    p = Path(path)
    if not p.exists():
        raise AudioError(f"{p}: file not found")
    if not p.is_file():
        raise AudioError(f"{p}: not a regular file")
    if p.stat().st_size == 0:
        raise AudioError(f"{p}: file is empty (0 bytes)")
    return _decode(str(p), name or str(p), target_sr, mono, max_seconds)


def decode_audio_bytes(
    data: bytes,
    target_sr: int = TARGET_SAMPLE_RATE,
    *,
    mono: bool = True,
    name: str = "<bytes>",
    max_seconds: float | None = None,
) -> np.ndarray:
    """Decode an in-memory audio file (wav, flac, ogg, ...) like :func:`load_audio`."""
    if not data:
        raise AudioError(f"{name}: audio buffer is empty (0 bytes)")
    return _decode(io.BytesIO(bytes(data)), name, target_sr, mono, max_seconds)


def resample(audio: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Polyphase resampling along axis 0 (ratio reduced by gcd); float32 out."""
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {target_sr}")
    x = np.asarray(audio, dtype=np.float32)
    if orig_sr == target_sr or x.shape[0] == 0:
        return x
    g = math.gcd(int(orig_sr), int(target_sr))
    out = resample_poly(x, int(target_sr) // g, int(orig_sr) // g, axis=0)
    return np.asarray(out, dtype=np.float32)


def rms_dbfs(audio: np.ndarray) -> float:
    """RMS level in dBFS (full scale = 1.0); ``-inf`` for silent or empty audio."""
    x = np.asarray(audio, dtype=np.float64)
    if x.size == 0:
        return float("-inf")
    rms = math.sqrt(float(np.mean(x * x)))
    return 20.0 * math.log10(rms) if rms > 0.0 else float("-inf")


def normalize_loudness(
    audio: np.ndarray, target_dbfs: float = -23.0, peak_limit: float = 0.999
) -> np.ndarray:
    """Scale to ``target_dbfs`` RMS, then down so that ``|peak| <= peak_limit``.

    Silent (or empty) input is returned unchanged.
    """
    x = np.asarray(audio, dtype=np.float32)
    level = rms_dbfs(x)
    if not math.isfinite(level):
        return x
    gain = 10.0 ** ((target_dbfs - level) / 20.0)
    peak = float(np.max(np.abs(x))) * gain
    if peak > peak_limit:
        gain *= peak_limit / peak
    return (x.astype(np.float64) * gain).astype(np.float32)


def trim_silence(
    audio: np.ndarray,
    sr: int = TARGET_SAMPLE_RATE,
    *,
    threshold_db: float = -40.0,
    frame_ms: float = 20.0,
    pad_ms: float = 50.0,
) -> np.ndarray:
    """Trim leading/trailing frames quieter than ``threshold_db`` below the loudest frame.

    Keeps ``pad_ms`` of context on each side; an all-silent clip returns an empty array.
    """
    x = np.asarray(audio, dtype=np.float32)
    n = x.shape[0]
    if n == 0:
        return x
    frame = max(1, round(sr * frame_ms / 1000.0))
    pad = max(0, round(sr * pad_ms / 1000.0))
    n_frames = -(-n // frame)
    mono = x if x.ndim == 1 else x.mean(axis=tuple(range(1, x.ndim)))
    padded = np.zeros(n_frames * frame, dtype=np.float64)
    padded[:n] = mono
    rms = np.sqrt(np.mean(padded.reshape(n_frames, frame) ** 2, axis=1))
    ref = float(rms.max())
    if ref <= 0.0:
        return x[:0]
    with np.errstate(divide="ignore"):
        rel_db = 20.0 * np.log10(rms / ref)
    loud = np.flatnonzero(rel_db > threshold_db)
    if loud.size == 0:
        return x[:0]
    start = max(0, int(loud[0]) * frame - pad)
    end = min(n, (int(loud[-1]) + 1) * frame + pad)
    return x[start:end]


@lru_cache(maxsize=8)
def _slaney_mel_filters(
    sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float
) -> np.ndarray:
    """Slaney-scale, slaney-normalised mel filterbank ``[n_mels, n_fft // 2 + 1]``."""
    f_sp = 200.0 / 3.0
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0

    def hz_to_mel(freq: float) -> float:
        if freq >= min_log_hz:
            return min_log_mel + math.log(freq / min_log_hz) / logstep
        return freq / f_sp

    all_freqs = np.linspace(0.0, sample_rate // 2, n_fft // 2 + 1)
    m_pts = np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2)
    f_pts = np.where(
        m_pts >= min_log_mel,
        min_log_hz * np.exp(logstep * (m_pts - min_log_mel)),
        f_sp * m_pts,
    )
    f_diff = np.diff(f_pts)
    slopes = f_pts[None, :] - all_freqs[:, None]
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    fb = np.maximum(0.0, np.minimum(down, up))
    fb *= (2.0 / (f_pts[2 : n_mels + 2] - f_pts[:n_mels]))[None, :]
    out = np.ascontiguousarray(fb.T)
    out.setflags(write=False)
    return out


def speaker_mel(audio_24k: np.ndarray) -> np.ndarray:
    """Speaker-encoder log-mel ``[frames, 128]`` matching mlx_audio qwen3_tts.mel_spectrogram."""
    x = np.asarray(audio_24k, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"speaker_mel expects 1-D audio, got shape {x.shape}")
    padding = (_MEL_N_FFT - _MEL_HOP) // 2
    if x.shape[0] <= padding:
        raise ValueError(f"audio too short for speaker_mel: {x.shape[0]} samples")
    # Manual reflect pad (excluding the edge sample), then an uncentred STFT.
    x = np.concatenate([x[1 : padding + 1][::-1], x, x[-(padding + 1) : -1][::-1]])
    n_frames = 1 + (x.shape[0] - _MEL_N_FFT) // _MEL_HOP
    # mlx_audio's "hann" is the symmetric window (periodic=False).
    n = np.arange(_MEL_WIN)
    window = 0.5 * (1.0 - np.cos(2.0 * np.pi * n / (_MEL_WIN - 1)))
    if _MEL_WIN < _MEL_N_FFT:
        lead = (_MEL_N_FFT - _MEL_WIN) // 2
        window = np.pad(window, (lead, _MEL_N_FFT - _MEL_WIN - lead))
    frames = np.lib.stride_tricks.sliding_window_view(x, _MEL_N_FFT)[::_MEL_HOP][:n_frames]
    spec = np.fft.rfft(frames * window, axis=-1)
    mag = np.sqrt(spec.real**2 + spec.imag**2 + 1e-9)
    fb = _slaney_mel_filters(TARGET_SAMPLE_RATE, _MEL_N_FFT, _MEL_N_MELS, _MEL_FMIN, _MEL_FMAX)
    mel = mag @ fb.T
    return np.log(np.clip(mel, 1e-5, None)).astype(np.float32)


def duration_s(audio: np.ndarray, sr: int = TARGET_SAMPLE_RATE) -> float:
    """Duration in seconds (samples along axis 0 divided by ``sr``)."""
    return float(np.asarray(audio).shape[0]) / float(sr)


def write_wav(
    path: str | os.PathLike[str], audio: np.ndarray, sr: int = TARGET_SAMPLE_RATE
) -> None:
    """Write 16-bit PCM WAV atomically (`finetune.fsutil.atomic_write`)."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    data = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0)
    atomic_write(dest, lambda tmp: sf.write(tmp, data, sr, subtype="PCM_16", format="WAV"))
