"""Tests for server.audio_formats."""

from __future__ import annotations

import io
import struct
import wave

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import correlate

from server import audio_formats as af
from server.audio_formats import (
    CONTENT_TYPES,
    FORMATS,
    STREAMABLE,
    CodecUnavailable,
    UnsupportedFormat,
    change_speed,
    check_format,
    codec_available,
    encode,
    response_headers,
    stream_encoder,
    to_pcm16,
    wav_header,
)

SR = 24_000


def _sine(freq: float, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * SR)) / SR
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _voice_like(seconds: float) -> np.ndarray:
    """A harmonic tone with a vibrato and a fade, closer to speech than a pure sine."""
    t = np.arange(round(seconds * SR)) / SR
    f0 = 180.0 + 20.0 * np.sin(2 * np.pi * 3.0 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    tone = sum(np.sin(k * phase) / k for k in range(1, 6))
    return (0.3 * tone * np.minimum(1.0, 4.0 * t)).astype(np.float32)


def _harmonic(f0: float, seconds: float) -> np.ndarray:
    """Five harmonics of f0 with a 4 Hz syllable-like loudness envelope and a little noise."""
    t = np.arange(round(seconds * SR)) / SR
    tone = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 6))
    envelope = 0.6 + 0.4 * np.sin(2 * np.pi * 4.0 * t)
    noise = np.random.default_rng(0).normal(0.0, 0.01, t.size)
    return (0.25 * tone * envelope + noise).astype(np.float32)


def _peak_hz(audio: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(audio.shape[0])))
    return float(np.fft.rfftfreq(audio.shape[0], 1.0 / SR)[np.argmax(spectrum)])


def _rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))


def _best_correlation(reference: np.ndarray, decoded: np.ndarray, max_lag: int = SR // 5) -> float:
    """Normalised correlation of decoded with reference at the best delay in [0, max_lag]."""
    n = min(reference.size, decoded.size - max_lag)
    ref = reference[:n].astype(np.float64)
    lag = int(np.argmax(correlate(decoded[: n + max_lag].astype(np.float64), ref, mode="valid")))
    seg = decoded[lag : lag + n].astype(np.float64)
    return float(ref @ seg / (np.linalg.norm(ref) * np.linalg.norm(seg) + 1e-12))


def _need(fmt: str) -> None:
    if not codec_available(fmt):
        pytest.skip(f"this libsndfile cannot write {fmt}")


def _read(data: bytes) -> tuple[np.ndarray, int]:
    """A whole body decoded: libsndfile's formats, or AAC (ADTS) through FFmpeg's decoder."""
    if data[:2] != b"\xff\xf1":
        decoded, rate = sf.read(io.BytesIO(data), dtype="float32")
        return decoded, rate
    import av

    with av.open(io.BytesIO(data), format="aac") as container:
        stream = container.streams.audio[0]
        frames = [f.to_ndarray()[0] for f in container.decode(stream)]
        return np.concatenate(frames), stream.codec_context.sample_rate


def _parse_wav(data: bytes) -> tuple[dict[str, int], bytes]:
    """A strict RIFF walk: header fields, and the data chunk (to EOF when its size is unknown)."""
    riff, riff_size, wave_id = struct.unpack_from("<4sI4s", data, 0)
    assert (riff, wave_id) == (b"RIFF", b"WAVE")
    fields = {"riff_size": riff_size}
    pos = 12
    while pos < len(data):
        chunk_id, size = struct.unpack_from("<4sI", data, pos)
        pos += 8
        if chunk_id == b"fmt ":
            tag, channels, rate, byte_rate, align, bits = struct.unpack_from("<HHIIHH", data, pos)
            fields.update(tag=tag, channels=channels, rate=rate, byte_rate=byte_rate)
            fields.update(align=align, bits=bits)
        elif chunk_id == b"data":
            fields["data_size"] = size
            end = len(data) if size == 0xFFFFFFFF else pos + size
            assert end == len(data), "data chunk must run to the end of the stream"
            return fields, data[pos:end]
        pos += size + (size & 1)
    raise AssertionError("no data chunk")


def _ogg_pages(data: bytes) -> list[tuple[int, int, int, int]]:
    """Walk every Ogg page: (header_type flags, granule, serial, sequence number)."""
    pages = []
    pos = 0
    while pos < len(data):
        assert data[pos : pos + 4] == b"OggS", f"no Ogg page at byte {pos}"
        flags, granule, serial, seq = struct.unpack_from("<xBqII", data, pos + 4)
        n_segments = data[pos + 26]
        body = sum(data[pos + 27 : pos + 27 + n_segments])
        pages.append((flags, granule, serial, seq))
        pos += 27 + n_segments + body
    assert pos == len(data)
    return pages


_MP3_BITRATES = {
    1: (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    2: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_MP3_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


def _mp3_frames(data: bytes) -> list[tuple[int, int]]:
    """Walk every MPEG layer III frame back to back: (sample rate, channel mode)."""
    frames = []
    pos = 0
    while pos < len(data):
        (header,) = struct.unpack_from(">I", data, pos)
        assert header >> 21 == 0x7FF, f"no frame sync at byte {pos}"
        version, layer = (header >> 19) & 3, (header >> 17) & 3
        assert layer == 1, "not layer III"
        rate = _MP3_RATES[version][(header >> 10) & 3]
        kbps = _MP3_BITRATES[1 if version == 3 else 2][(header >> 12) & 15]
        padding = (header >> 9) & 1
        frames.append((rate, (header >> 6) & 3))
        pos += (144 if version == 3 else 72) * kbps * 1000 // rate + padding
    assert pos == len(data)
    return frames


def _stream(fmt: str, audio: np.ndarray, chunk: int) -> tuple[bytes, list[bytes]]:
    encoder = stream_encoder(fmt)
    head = encoder.header()
    chunks = [encoder.encode_chunk(audio[i : i + chunk]) for i in range(0, audio.size, chunk)]
    tail = encoder.finish()
    return head + b"".join(chunks) + tail, chunks


# --- format table -------------------------------------------------------------------------


def test_format_table() -> None:
    assert FORMATS == ("wav", "flac", "pcm", "mp3", "opus", "aac")
    assert CONTENT_TYPES == {
        "wav": "audio/wav",
        "flac": "audio/flac",
        "pcm": "audio/pcm",
        "mp3": "audio/mpeg",
        "opus": "audio/ogg",
        "aac": "audio/aac",
    }
    assert {"wav", "pcm"} <= STREAMABLE <= set(FORMATS)
    assert response_headers("pcm") == {"Content-Type": "audio/pcm", "X-Sample-Rate": "24000"}
    assert response_headers("mp3") == {"Content-Type": "audio/mpeg"}
    assert check_format(" MP3 ") == "mp3"
    assert codec_available("wav") and codec_available("pcm")
    assert set(af.available_formats()) >= {"wav", "pcm"}


@pytest.mark.parametrize("bad", ["m4a", "ogg", "", "wave"])
def test_unsupported_format_lists_the_allowed_ones(bad: str) -> None:
    with pytest.raises(UnsupportedFormat) as info:
        encode(_sine(440, 0.1), bad)
    assert isinstance(info.value, ValueError)
    for fmt in FORMATS:
        assert fmt in str(info.value)
    with pytest.raises(UnsupportedFormat):
        stream_encoder(bad)


def test_missing_codec_is_reported_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(af.sf, "available_subtypes", lambda format=None: {})
    codec_available.cache_clear()
    try:
        with pytest.raises(CodecUnavailable, match=r"cannot write opus.*OPUS"):
            encode(_sine(440, 0.1), "opus")
        with pytest.raises(CodecUnavailable, match="cannot write mp3"):
            stream_encoder("mp3")
        assert af.available_formats() == ("wav", "pcm", "aac")
        monkeypatch.setattr(af.aac, "available", lambda: False)
        codec_available.cache_clear()
        with pytest.raises(CodecUnavailable, match=r"cannot write aac: it needs PyAV"):
            encode(_sine(440, 0.1), "aac")
        assert af.available_formats() == ("wav", "pcm")
    finally:
        codec_available.cache_clear()


def test_sample_rate_is_checked_per_codec() -> None:
    with pytest.raises(ValueError, match="24000"):
        encode(_sine(440, 0.1), "opus", sample_rate=22050)
    with pytest.raises(ValueError, match="mp3 cannot be written at 23000"):
        stream_encoder("mp3", sample_rate=23000)
    with pytest.raises(ValueError, match="positive"):
        encode(_sine(440, 0.1), "wav", sample_rate=0)


# --- whole clips --------------------------------------------------------------------------


def test_to_pcm16_clips_rounds_and_is_little_endian() -> None:
    audio = np.array([0.0, 1.0, -1.0, 2.0, -3.0, 0.5, 1e-6, np.nan, np.inf], dtype=np.float32)
    raw = to_pcm16(audio)
    assert isinstance(raw, bytes) and len(raw) == 2 * audio.size
    values = struct.unpack(f"<{audio.size}h", raw)
    assert values == (0, 32767, -32767, 32767, -32767, 16384, 0, 0, 32767)
    assert to_pcm16(np.array([1.0])) == b"\xff\x7f"
    assert to_pcm16(np.array([[0.25], [-0.25]])) == struct.pack("<2h", 8192, -8192)
    with pytest.raises(ValueError, match="mono"):
        to_pcm16(np.zeros((10, 2)))


def test_wav_is_exact_pcm16_with_true_sizes() -> None:
    audio = _voice_like(0.5)
    data = encode(audio, "wav")
    fields, payload = _parse_wav(data)
    assert fields["riff_size"] == len(data) - 8
    assert fields["data_size"] == 2 * audio.size
    assert (fields["tag"], fields["channels"], fields["rate"], fields["bits"]) == (1, 1, SR, 16)
    assert payload == to_pcm16(audio)
    assert data == wav_header(SR, 2 * audio.size) + to_pcm16(audio)


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "opus", "aac"])
def test_every_container_decodes_back(fmt: str) -> None:
    _need(fmt)
    audio = _voice_like(1.0)
    decoded, rate = _read(encode(audio, fmt))
    assert rate == SR
    assert decoded.ndim == 1
    if fmt in ("wav", "flac"):
        assert decoded.size == audio.size
        exact = np.frombuffer(to_pcm16(audio), dtype="<i2")
        as_int, _ = sf.read(io.BytesIO(encode(audio, fmt)), dtype="int16")
        np.testing.assert_array_equal(as_int, exact)
    else:
        assert abs(decoded.size - audio.size) <= SR // 10  # codec delay / padding
        assert _best_correlation(audio, decoded) > 0.9
        assert _rms(decoded) == pytest.approx(_rms(audio), rel=0.2)


def test_pcm_is_headerless_pcm16() -> None:
    audio = _sine(440, 0.25)
    data = encode(audio, "pcm")
    assert data == to_pcm16(audio)
    decoded, _ = sf.read(
        io.BytesIO(data), samplerate=SR, channels=1, format="RAW", subtype="PCM_16",
        endian="LITTLE", dtype="float32",
    )  # fmt: skip
    np.testing.assert_allclose(decoded, audio, atol=1.0 / 32000)


@pytest.mark.parametrize("fmt", ["flac", "mp3", "opus"])
def test_codecs_encode_other_sample_rates(fmt: str) -> None:
    _need(fmt)
    audio = _sine(440, 0.5)
    decoded, rate = sf.read(io.BytesIO(encode(audio, fmt, sample_rate=48_000)))
    assert rate == 48_000
    assert abs(decoded.size - audio.size) <= 4800


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_clip_still_gives_a_valid_body(fmt: str) -> None:
    _need(fmt)
    data = encode(np.zeros(0, dtype=np.float32), fmt)
    if fmt == "pcm":
        assert data == b""
        return
    decoded, rate = _read(data)
    assert rate == SR
    assert decoded.size <= SR // 20 + (3 * 1024 if fmt == "aac" else 0)  # AAC: priming, padding
    assert not np.any(np.abs(decoded) > 0.01)


# --- streaming ----------------------------------------------------------------------------


def test_streamed_wav_is_one_container_with_unknown_sizes() -> None:
    audio = _voice_like(1.3)
    data, chunks = _stream("wav", audio, chunk=2_000)
    assert data[4:8] == b"\xff\xff\xff\xff"
    fields, payload = _parse_wav(data)
    assert fields["riff_size"] == 0xFFFFFFFF
    assert fields["data_size"] == 0xFFFFFFFF
    assert (fields["tag"], fields["channels"], fields["rate"], fields["bits"]) == (1, 1, SR, 16)
    assert (fields["byte_rate"], fields["align"]) == (2 * SR, 2)
    # The data section is the chunks back to back, i.e. the PCM16 of the whole clip.
    assert payload == b"".join(chunks) == to_pcm16(audio)
    assert data.count(b"RIFF") == 1
    # Real readers accept the unknown sizes and find every sample.
    decoded, rate = sf.read(io.BytesIO(data), dtype="int16")
    assert rate == SR
    np.testing.assert_array_equal(decoded, np.frombuffer(to_pcm16(audio), dtype="<i2"))
    with wave.open(io.BytesIO(data)) as reader:
        assert reader.getframerate() == SR and reader.getnchannels() == 1
        assert reader.readframes(10**9) == to_pcm16(audio)


def test_streamed_pcm_equals_the_whole_clip() -> None:
    audio = _voice_like(0.7)
    for chunk in (7, 333, 4_800, audio.size):
        data, _ = _stream("pcm", audio, chunk)
        assert data == to_pcm16(audio) == encode(audio, "pcm")


def test_header_is_optional_and_sent_once() -> None:
    audio = _sine(440, 0.1)
    encoder = stream_encoder("wav")
    first = encoder.encode_chunk(audio)
    assert first == wav_header(SR, None) + to_pcm16(audio)
    assert encoder.header() == b""
    assert encoder.finish() == b""
    assert encoder.finish() == b""
    with pytest.raises(RuntimeError):
        encoder.encode_chunk(audio)
    assert encoder.frames_written == audio.size


def test_flac_does_not_stream() -> None:
    assert "flac" not in STREAMABLE
    with pytest.raises(UnsupportedFormat, match="cannot be streamed") as info:
        stream_encoder("flac")
    for fmt in STREAMABLE:
        assert fmt in str(info.value)


def test_streamed_opus_is_one_ogg_stream() -> None:
    _need("opus")
    assert "opus" in STREAMABLE
    audio = _voice_like(2.0)
    data, chunks = _stream("opus", audio, chunk=SR // 5)
    pages = _ogg_pages(data)
    flags = [p[0] for p in pages]
    assert flags[0] & 0x02 and not any(f & 0x02 for f in flags[1:]), "exactly one BOS page"
    assert flags[-1] & 0x04 and not any(f & 0x04 for f in flags[:-1]), "exactly one EOS page"
    assert len({p[2] for p in pages}) == 1, "one logical stream"
    assert [p[3] for p in pages] == list(range(len(pages)))
    granules = [p[1] for p in pages if p[1] >= 0]
    assert granules == sorted(granules)
    assert data.count(b"OpusHead") == 1
    # Pages go out while audio arrives instead of all at the end.
    assert sum(1 for c in chunks if c) >= len(chunks) * 0.6
    decoded, rate = sf.read(io.BytesIO(data), dtype="float32")
    assert rate == SR
    assert abs(decoded.size - audio.size) <= SR // 10
    assert _best_correlation(audio, decoded) > 0.9


def test_streamed_mp3_is_one_run_of_frames() -> None:
    _need("mp3")
    assert "mp3" in STREAMABLE
    audio = _voice_like(2.0)
    data, chunks = _stream("mp3", audio, chunk=SR // 10)
    frames = _mp3_frames(data)
    assert {f[0] for f in frames} == {SR}
    assert {f[1] for f in frames} == {3}  # mono
    assert abs(len(frames) * 576 - audio.size) <= 4 * 576
    assert sum(len(c) for c in chunks) > len(data) // 2  # frames leave as audio arrives
    # How the audio was chunked does not change the stream.
    assert _stream("mp3", audio, chunk=777)[0] == data
    assert _stream("mp3", audio, chunk=audio.size)[0] == data
    decoded, rate = sf.read(io.BytesIO(data), dtype="float32")
    assert rate == SR
    assert abs(decoded.size - audio.size) <= SR // 10
    assert _best_correlation(audio, decoded) > 0.9


@pytest.mark.parametrize("fmt", sorted(STREAMABLE))
def test_stream_without_audio_is_still_valid(fmt: str) -> None:
    _need(fmt)
    encoder = stream_encoder(fmt)
    data = encoder.header() + encoder.finish()
    if fmt == "pcm":
        assert data == b""
        return
    decoded, rate = _read(data)
    assert rate == SR
    assert decoded.size <= SR // 20 + (3 * 1024 if fmt == "aac" else 0)


def test_streamed_aac_is_the_whole_clip_in_adts_frames() -> None:
    audio = _voice_like(1.0)
    data, chunks = _stream("aac", audio, 1000)  # chunks that do not fit AAC's 1024-sample frames
    assert data == encode(audio, "aac")
    assert sum(1 for c in chunks if c) >= 10, "frames did not go out as they were complete"
    at, frames = 0, 0
    while at < len(data):
        assert data[at : at + 2] == b"\xff\xf1"  # sync word, MPEG-4, no CRC
        at += (int.from_bytes(data[at + 3 : at + 6], "big") >> 5) & 0x1FFF
        frames += 1
    assert at == len(data) and frames >= audio.size // 1024
    with pytest.raises(ValueError, match="aac cannot be written at 23000"):
        stream_encoder("aac", sample_rate=23000)


def test_abandoned_stream_can_be_closed() -> None:
    _need("opus")
    with stream_encoder("opus") as encoder:
        encoder.encode_chunk(_sine(440, 0.5))
    assert encoder.finish() == b""
    with pytest.raises(RuntimeError):
        encoder.encode_chunk(_sine(440, 0.1))


def test_forward_sink_drops_rewrites_of_bytes_already_sent() -> None:
    sink = af._ForwardSink()
    sink.write(b"abcdef")
    sink.seek(2)
    sink.write(b"XY")  # still pending: patched
    assert sink.take() == b"abXYef"
    sink.seek(0, io.SEEK_END)
    sink.write(b"ghij")
    sink.seek(4)
    sink.write(b"1234")  # two bytes were sent already, two are pending
    assert sink.dropped == 2
    assert sink.take() == b"34ij"
    assert sink.size == sink.tell() + 2 == 10


# --- speed --------------------------------------------------------------------------------


def test_speed_one_returns_the_input() -> None:
    audio = _voice_like(0.5)
    out = change_speed(audio, 1.0, SR)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, audio)


@pytest.mark.parametrize("speed", [0.25, 0.5, 0.8, 1.25, 2.0, 3.0, 4.0])
def test_speed_changes_duration_but_not_pitch(speed: float) -> None:
    audio = _sine(300.0, 1.0)
    out = change_speed(audio, speed, SR)
    assert out.dtype == np.float32
    assert abs(out.size - audio.size / speed) <= 0.05 * audio.size / speed
    assert _peak_hz(out) == pytest.approx(300.0, rel=0.03)
    # Overlapping frames stay in phase: no cancellation or level change.
    core = out[out.size // 10 : -out.size // 10]
    assert _rms(core) == pytest.approx(_rms(audio), rel=0.05)


@pytest.mark.parametrize("speed", [0.5, 2.0])
def test_speed_keeps_the_time_line(speed: float) -> None:
    audio = np.concatenate([_sine(300.0, 0.6), _sine(700.0, 0.6)])
    out = change_speed(audio, speed, SR)
    half = out.size // 2
    margin = out.size // 10
    assert _peak_hz(out[: half - margin]) == pytest.approx(300.0, rel=0.03)
    assert _peak_hz(out[half + margin :]) == pytest.approx(700.0, rel=0.03)


@pytest.mark.parametrize("speed", [0.7, 1.6])
def test_speed_on_a_voice_like_signal_keeps_its_pitch(speed: float) -> None:
    audio = _harmonic(170.0, 1.2)
    out = change_speed(audio, speed, SR)
    assert abs(out.size - audio.size / speed) <= 1
    assert _peak_hz(audio) == pytest.approx(170.0, rel=0.01)
    assert _peak_hz(out) == pytest.approx(170.0, rel=0.03)
    assert _rms(out) == pytest.approx(_rms(audio), rel=0.1)


def test_speed_rejects_out_of_range_values() -> None:
    for bad in (0.0, 0.2, 4.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="speed"):
            change_speed(_sine(440, 0.1), bad, SR)
    assert change_speed(np.zeros(0, dtype=np.float32), 2.0, SR).size == 0
    assert change_speed(np.zeros((100, 1), dtype=np.float32), 2.0, SR).shape == (50,)
