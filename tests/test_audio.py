"""Tests for finetune.audio."""

from __future__ import annotations

import math
from pathlib import Path

from finetune.audio import (
    TARGET_SAMPLE_RATE,
    AudioError,
    decode_audio_bytes,
    duration_s,
    load_audio,
    normalize_loudness,
    resample,
    rms_dbfs,
    speaker_mel,
    trim_silence,
    write_wav,
)

import numpy as np
import pytest
import soundfile as sf

SR = TARGET_SAMPLE_RATE


def _sine(freq: float, seconds: float, sr: int, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(audio: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(audio.shape[0])))
    return float(np.fft.rfftfreq(audio.shape[0], 1.0 / sr)[np.argmax(spectrum)])


def test_write_read_round_trip(tmp_path: Path) -> None:
    audio = _sine(440.0, 0.5, SR)
    path = tmp_path / "sub" / "tone.wav"
    write_wav(path, audio)
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["tone.wav"]  # no temp file left
    info = sf.info(str(path))
    assert (info.samplerate, info.channels, info.subtype) == (SR, 1, "PCM_16")
    back = load_audio(path)
    assert back.dtype == np.float32 and back.ndim == 1
    assert back.shape == audio.shape
    np.testing.assert_allclose(back, audio, atol=1.0 / 32768 + 1e-6)
    assert duration_s(back) == pytest.approx(0.5)


def test_write_wav_clips_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "x.wav"
    write_wav(path, np.full(100, 0.1, dtype=np.float32))
    write_wav(path, np.array([2.0, -2.0, 0.0], dtype=np.float32))
    back = load_audio(path)
    assert back.shape == (3,)
    assert back[0] == pytest.approx(1.0, abs=1e-3)
    assert back[1] == pytest.approx(-1.0, abs=1e-3)


def test_stereo_44k_to_mono_24k(tmp_path: Path) -> None:
    src_sr = 44_100
    seconds = 1.0
    left = _sine(1000.0, seconds, src_sr, amp=0.6)
    right = _sine(1000.0, seconds, src_sr, amp=0.2)
    path = tmp_path / "stereo.wav"
    sf.write(str(path), np.stack([left, right], axis=1), src_sr, subtype="FLOAT")

    audio = load_audio(path)
    assert audio.ndim == 1 and audio.dtype == np.float32
    assert audio.shape[0] == round(seconds * SR)
    assert _peak_hz(audio, SR) == pytest.approx(1000.0, abs=2.0)
    # Averaged channels: amplitude (0.6 + 0.2) / 2 = 0.4 away from the edges.
    mid = audio[SR // 4 : 3 * SR // 4]
    assert float(np.max(np.abs(mid))) == pytest.approx(0.4, abs=0.01)

    both = load_audio(path, mono=False)
    assert both.shape == (round(seconds * SR), 2)


def test_resample_identity_and_length() -> None:
    x = _sine(300.0, 0.25, 16_000)
    same = resample(x, 16_000, 16_000)
    np.testing.assert_array_equal(same, x)
    up = resample(x, 16_000, SR)
    assert up.dtype == np.float32
    assert up.shape[0] == x.shape[0] * 3 // 2
    assert _peak_hz(up, SR) == pytest.approx(300.0, abs=5.0)


@pytest.mark.parametrize(
    ("ext", "fmt", "subtype", "exact"),
    [("flac", "FLAC", "PCM_16", True), ("ogg", "OGG", "VORBIS", False)],
)
def test_read_flac_and_ogg(tmp_path: Path, ext: str, fmt: str, subtype: str, exact: bool) -> None:
    src_sr = 48_000
    tone = _sine(500.0, 1.0, src_sr, amp=0.5)
    path = tmp_path / f"tone.{ext}"
    sf.write(str(path), tone, src_sr, format=fmt, subtype=subtype)
    audio = load_audio(path)
    expected = SR
    if exact:
        assert audio.shape[0] == expected
    else:
        assert abs(audio.shape[0] - expected) <= 0.01 * expected
    assert _peak_hz(audio, SR) == pytest.approx(500.0, abs=3.0)
    # Same result from the in-memory path.
    from_bytes = decode_audio_bytes(path.read_bytes())
    np.testing.assert_allclose(from_bytes, audio, atol=1e-6)


def test_missing_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "nope.wav"
    with pytest.raises(AudioError, match="not found") as info:
        load_audio(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_garbage_file_and_bytes_raise(tmp_path: Path) -> None:
    garbage = b"this is definitely not an audio file\x00\x01\x02" * 50
    path = tmp_path / "garbage.wav"
    path.write_bytes(garbage)
    with pytest.raises(AudioError, match="cannot decode") as info:
        load_audio(path)
    assert str(path) in str(info.value)

    with pytest.raises(AudioError, match="cannot decode"):
        decode_audio_bytes(garbage)
    with pytest.raises(AudioError, match="empty"):
        decode_audio_bytes(b"")


def test_empty_audio_raises(tmp_path: Path) -> None:
    empty_file = tmp_path / "zero.wav"
    empty_file.write_bytes(b"")
    with pytest.raises(AudioError, match="empty") as info:
        load_audio(empty_file)
    assert str(empty_file) in str(info.value)

    header_only = tmp_path / "header_only.wav"
    sf.write(str(header_only), np.zeros(0, dtype=np.float32), SR, subtype="PCM_16")
    with pytest.raises(AudioError, match="empty") as info:
        load_audio(header_only)
    assert str(header_only) in str(info.value)


def test_normalize_loudness_hits_target() -> None:
    rng = np.random.default_rng(0)
    quiet = (0.01 * rng.standard_normal(SR)).astype(np.float32)
    assert rms_dbfs(quiet) == pytest.approx(-40.0, abs=0.2)
    out = normalize_loudness(quiet, target_dbfs=-23.0)
    assert out.dtype == np.float32
    assert rms_dbfs(out) == pytest.approx(-23.0, abs=0.1)
    assert float(np.max(np.abs(out))) <= 0.999


def test_normalize_loudness_peak_limit() -> None:
    # A single spike: reaching -10 dBFS RMS would push the peak far above 1.
    x = np.zeros(SR, dtype=np.float32)
    x[100] = 0.5
    x[200:300] = 0.001
    out = normalize_loudness(x, target_dbfs=-10.0, peak_limit=0.9)
    assert float(np.max(np.abs(out))) == pytest.approx(0.9, abs=1e-6)
    assert rms_dbfs(out) < -10.0


def test_normalize_loudness_silence_unchanged() -> None:
    silent = np.zeros(1000, dtype=np.float32)
    out = normalize_loudness(silent)
    np.testing.assert_array_equal(out, silent)
    assert rms_dbfs(silent) == -math.inf


def test_trim_silence_around_tone() -> None:
    lead, tone_len, tail = SR // 2, SR, SR // 4  # 0.5 s, 1 s, 0.25 s
    rng = np.random.default_rng(1)
    tone = _sine(440.0, 1.0, SR, amp=0.5)
    noise = 1e-4 * rng.standard_normal(lead + tone_len + tail).astype(np.float32)
    audio = np.concatenate([np.zeros(lead), tone, np.zeros(tail)]).astype(np.float32) + noise

    trimmed = trim_silence(audio, SR, pad_ms=50.0)
    frame = int(SR * 0.020)
    pad = int(SR * 0.050)
    # Tone plus ~50 ms each side, quantised to 20 ms frames.
    assert tone_len + 2 * pad <= trimmed.shape[0] <= tone_len + 2 * pad + 2 * frame
    start = int(np.flatnonzero(np.abs(audio) > 0.01)[0])
    end = int(np.flatnonzero(np.abs(audio) > 0.01)[-1])
    assert trimmed.shape[0] < audio.shape[0] - (lead + tail) // 2
    assert np.abs(trimmed).max() == pytest.approx(np.abs(audio[start : end + 1]).max())

    no_pad = trim_silence(audio, SR, pad_ms=0.0)
    assert tone_len <= no_pad.shape[0] <= tone_len + 2 * frame


def test_trim_silence_all_silent() -> None:
    assert trim_silence(np.zeros(SR, dtype=np.float32), SR).shape == (0,)
    assert trim_silence(np.zeros(0, dtype=np.float32), SR).shape == (0,)


def test_speaker_mel_matches_mlx_audio() -> None:
    import mlx.core as mx
    from mlx_audio.tts.models.qwen3_tts.qwen3_tts import mel_spectrogram

    n = int(1.5 * SR)
    t = np.arange(n) / SR
    rng = np.random.default_rng(42)
    signal = (
        0.3 * np.sin(2 * np.pi * 220.0 * t)
        + 0.2 * np.sin(2 * np.pi * 3100.0 * t + 0.3)
        + 0.05 * rng.standard_normal(n)
    ) * np.linspace(0.2, 1.0, n)
    signal = signal.astype(np.float32)

    ours = speaker_mel(signal)
    ref = np.array(mel_spectrogram(mx.array(signal)))[0]

    assert ours.dtype == np.float32
    assert ours.shape == ref.shape
    assert ours.shape[1] == 128
    assert ours.shape[0] == 1 + (n + 2 * ((1024 - 256) // 2) - 1024) // 256
    assert float(np.max(np.abs(ours - ref))) < 1e-3


def test_a_long_file_is_refused_from_its_header_before_it_is_decoded(tmp_path):
    """A small FLAC of minutes of 48 kHz stereo (a decompression bomb for a 30 s limit) is
    refused without decoding it: memory stays far below what decoding it would take."""
    import tracemalloc

    import soundfile as sf

    path = tmp_path / "long.flac"
    block = np.zeros((48_000 * 10, 2), np.float32)  # silence compresses to almost nothing
    with sf.SoundFile(str(path), "w", samplerate=48_000, channels=2, format="FLAC") as out:
        for _ in range(30):  # 5 minutes
            out.write(block)
    del block
    decoded_bytes = 5 * 60 * 48_000 * 2 * 4
    assert path.stat().st_size < decoded_bytes // 50

    tracemalloc.start()
    try:
        with pytest.raises(AudioError, match=r"300\.0 s of audio or more; the limit is 30 s"):
            load_audio(path, 24_000, max_seconds=30.0, name="long.flac")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < decoded_bytes // 20, f"peak {peak} bytes: the file was decoded"
    # Within the limit it loads as before.
    short = tmp_path / "short.flac"
    sf.write(str(short), np.zeros((48_000, 2), np.float32), 48_000, format="FLAC")
    assert load_audio(short, 24_000, max_seconds=30.0).shape == (24_000,)


def test_an_undecodable_file_named_for_the_client_keeps_the_server_path_out(tmp_path: Path):
    secret_dir = tmp_path / "jobs" / ".incoming-abc" / "upload"
    secret_dir.mkdir(parents=True)
    clip = secret_dir / "0000-clip.wav"
    clip.write_text("not audio at all")
    with pytest.raises(AudioError) as caught:
        load_audio(clip, name="clip.wav")
    message = str(caught.value)
    assert message.startswith("clip.wav: cannot decode audio"), message
    assert str(tmp_path) not in message and ".incoming" not in message, message
