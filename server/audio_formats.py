"""Encoding synthesized speech (float32 mono numpy at the model rate) for HTTP responses.

Formats follow the OpenAI ``response_format`` names. ``wav`` and ``pcm`` are written here
directly; ``flac``, ``mp3`` and ``opus`` go through libsndfile (via soundfile), which has
written MPEG layer III (format ``MP3``) and Ogg Opus (format ``OGG``/``OPUS``) since 1.1;
``aac`` (AAC-LC in ADTS frames) through FFmpeg's encoder in PyAV (:mod:`server.aac`).

``pcm`` is raw 16-bit little-endian mono at the model rate with no header at all, so a
response carrying it should also say the rate, e.g. ``Content-Type: audio/pcm`` plus
``X-Sample-Rate: 24000`` (see :func:`response_headers`).

Streaming (:func:`stream_encoder`) always produces ONE continuous container: a WAV header
whose sizes say "unknown" (0xFFFFFFFF) followed by raw PCM16, a bare PCM16 byte stream, a
run of MPEG or ADTS frames, or one Ogg Opus logical stream. It never emits one complete file per
chunk, which leaves audible seams between chunks.

:func:`change_speed` implements the OpenAI ``speed`` parameter (0.25-4.0) as a WSOLA time
stretch, which changes tempo but keeps the pitch.
"""

from __future__ import annotations

import io
import math
import struct
from functools import cache
from typing import Any, Final, Literal, get_args

import numpy as np
import soundfile as sf
from scipy.signal import correlate

from server import aac

AudioFormat = Literal["wav", "flac", "pcm", "mp3", "opus", "aac"]

FORMATS: Final[tuple[str, ...]] = get_args(AudioFormat)
DEFAULT_SAMPLE_RATE: Final = 24_000

CONTENT_TYPES: Final[dict[str, str]] = {
    "wav": "audio/wav",
    "flac": "audio/flac",
    # Raw 16-bit little-endian mono at the model rate; send the rate as X-Sample-Rate.
    "pcm": "audio/pcm",
    "mp3": "audio/mpeg",
    # Ogg Opus.
    "opus": "audio/ogg",
    # AAC-LC, one ADTS header per frame.
    "aac": "audio/aac",
}

# Formats that stream as one continuous container. FLAC is left out on purpose: a streamed
# FLAC must say "length unknown" in its STREAMINFO block (total samples 0, no MD5), which is
# valid but which libsndfile itself cannot read back.
STREAMABLE: Final[frozenset[str]] = frozenset({"wav", "pcm", "mp3", "opus", "aac"})

OPUS_SAMPLE_RATES: Final[tuple[int, ...]] = (8_000, 12_000, 16_000, 24_000, 48_000)
MP3_SAMPLE_RATES: Final[tuple[int, ...]] = (
    8_000, 11_025, 12_000, 16_000, 22_050, 24_000, 32_000, 44_100, 48_000,
)  # fmt: skip

MIN_SPEED: Final = 0.25
MAX_SPEED: Final = 4.0

# libsndfile (major format, subtype) for the formats it encodes for us.
_SNDFILE_CODECS: Final[dict[str, tuple[str, str]]] = {
    "flac": ("FLAC", "PCM_16"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
    "opus": ("OGG", "OPUS"),
}
_CODEC_LIBRARIES: Final[dict[str, str]] = {
    "flac": "libFLAC",
    "mp3": "LAME and mpg123",
    "opus": "libopus and libogg",
}
# Constant bit rate MP3: ~64 kbit/s at 24 kHz (MPEG-2), ~128 kbit/s at 44.1/48 kHz (MPEG-1).
# CBR keeps a streamed MP3 (whose Xing/Info frame cannot be patched afterwards) readable
# by decoders that estimate the length from the first frame.
_MP3_COMPRESSION_LEVEL: Final = 0.6
# Ogg page latency while streaming Opus; libsndfile's default holds about a second per page.
_STREAM_OPUS_PAGE_MS: Final = 100.0
_SFC_SET_OGG_PAGE_LATENCY_MS: Final = 0x1302  # sndfile.h, libsndfile >= 1.1
_UNKNOWN_SIZE: Final = 0xFFFFFFFF


class UnsupportedFormat(ValueError):
    """A response format that is not one of FORMATS (or not streamable, for streams)."""


class CodecUnavailable(RuntimeError):
    """The installed libsndfile cannot write this format (built without the codec)."""


def check_format(fmt: str) -> AudioFormat:
    """Normalise a requested format name ("MP3 " -> "mp3") or raise UnsupportedFormat."""
    name = fmt.strip().lower() if isinstance(fmt, str) else fmt
    if name not in FORMATS:
        raise UnsupportedFormat(
            f"unsupported audio format {fmt!r}; allowed formats: {', '.join(FORMATS)}"
        )
    return name  # type: ignore[return-value]


@cache
def codec_available(fmt: str) -> bool:
    """Whether this machine can encode ``fmt`` (wav and pcm always can)."""
    name = check_format(fmt)
    if name == "aac":
        return aac.available()
    if name not in _SNDFILE_CODECS:
        return True
    major, subtype = _SNDFILE_CODECS[name]
    return major in sf.available_formats() and subtype in sf.available_subtypes(major)


def available_formats() -> tuple[str, ...]:
    """The formats this machine can actually encode, in FORMATS order."""
    return tuple(f for f in FORMATS if codec_available(f))


def response_headers(fmt: str, sample_rate: int = DEFAULT_SAMPLE_RATE) -> dict[str, str]:
    """Content-Type for ``fmt``, plus X-Sample-Rate for headerless pcm."""
    name = check_format(fmt)
    headers = {"Content-Type": CONTENT_TYPES[name]}
    if name == "pcm":
        headers["X-Sample-Rate"] = str(int(sample_rate))
    return headers


def _require_codec(fmt: AudioFormat) -> None:
    if fmt == "aac" and not codec_available(fmt):
        raise CodecUnavailable(
            "this server cannot write aac: it needs PyAV (`pip install av`, FFmpeg's AAC "
            f"encoder); available here: {', '.join(available_formats())}"
        )
    if not codec_available(fmt):
        major, subtype = _SNDFILE_CODECS[fmt]
        raise CodecUnavailable(
            f"this libsndfile ({sf.__libsndfile_version__}) cannot write {fmt} "
            f"(needs format {major}, subtype {subtype}: libsndfile >= 1.1 built with "
            f"{_CODEC_LIBRARIES[fmt]}); "
            f"available here: {', '.join(available_formats())}"
        )


def _check_sample_rate(fmt: AudioFormat, sample_rate: int) -> int:
    rate = int(sample_rate)
    if rate != sample_rate or rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer, got {sample_rate!r}")
    allowed = {
        "opus": OPUS_SAMPLE_RATES,
        "mp3": MP3_SAMPLE_RATES,
        "aac": aac.ADTS_SAMPLE_RATES,
    }.get(fmt)
    if allowed is not None and rate not in allowed:
        raise ValueError(
            f"{fmt} cannot be written at {rate} Hz; allowed rates: "
            f"{', '.join(str(r) for r in allowed)}"
        )
    return rate


def _as_mono(audio: np.ndarray) -> np.ndarray:
    """A finite float32 1-D copy clipped to [-1, 1]; (n, 1) arrays are accepted."""
    x = np.asarray(audio, dtype=np.float32)
    if x.ndim == 2 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 1:
        raise ValueError(f"expected mono audio of shape (n,), got shape {x.shape}")
    x = np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)
    return np.clip(x, -1.0, 1.0)


def _pcm16(audio: np.ndarray) -> np.ndarray:
    return np.round(_as_mono(audio) * 32767.0).astype("<i2")


def to_pcm16(audio: np.ndarray) -> bytes:
    """Float audio -> raw 16-bit little-endian PCM (clipped to [-1, 1], scaled by 32767)."""
    return _pcm16(audio).tobytes()


def wav_header(sample_rate: int = DEFAULT_SAMPLE_RATE, data_bytes: int | None = None) -> bytes:
    """A 44-byte RIFF/WAVE header for PCM16 mono.

    ``data_bytes=None`` writes 0xFFFFFFFF into both the RIFF and the data size fields, the
    usual way to say "length unknown" in a streamed WAV.
    """
    if data_bytes is None:
        riff_size = data_size = _UNKNOWN_SIZE
    else:
        if not 0 <= data_bytes <= _UNKNOWN_SIZE - 36:
            raise ValueError(f"a WAV data chunk cannot hold {data_bytes} bytes")
        riff_size, data_size = 36 + data_bytes, data_bytes
    rate = int(sample_rate)
    fmt_chunk = struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, 1, rate, rate * 2, 2, 16)
    return (
        struct.pack("<4sI4s", b"RIFF", riff_size, b"WAVE")
        + fmt_chunk
        + struct.pack("<4sI", b"data", data_size)
    )


def _sndfile_options(fmt: AudioFormat) -> dict[str, Any]:
    major, subtype = _SNDFILE_CODECS[fmt]
    options: dict[str, Any] = {"format": major, "subtype": subtype}
    if fmt == "mp3":
        options.update(compression_level=_MP3_COMPRESSION_LEVEL, bitrate_mode="CONSTANT")
    return options


def _min_frames(sample_rate: int) -> int:
    # Codecs cannot represent an empty clip; 20 ms of silence keeps the file playable.
    return max(1, sample_rate // 50)


def encode(audio: np.ndarray, fmt: str, sample_rate: int = DEFAULT_SAMPLE_RATE) -> bytes:
    """Encode a whole clip as ``fmt``.

    wav/pcm/flac carry exactly the samples of :func:`to_pcm16`. An empty clip gives an
    empty pcm body or a header-only wav; flac, mp3 and opus get 20 ms of silence instead,
    since those codecs cannot write an empty file.
    """
    name = check_format(fmt)
    rate = _check_sample_rate(name, sample_rate)
    if name == "pcm":
        return to_pcm16(audio)
    if name == "wav":
        data = to_pcm16(audio)
        return wav_header(rate, len(data)) + data
    _require_codec(name)
    x = _as_mono(audio)
    if x.size == 0:
        x = np.zeros(_min_frames(rate), dtype=np.float32)
    if name == "aac":
        return aac.encode(x, rate)
    out = io.BytesIO()
    # FLAC gets the exact int16 samples of wav/pcm; the lossy codecs take float input.
    samples = _pcm16(x) if name == "flac" else x
    sf.write(out, samples, rate, **_sndfile_options(name))
    return out.getvalue()


class _ForwardSink:
    """A file object for libsndfile that hands written bytes on as soon as they exist.

    Bytes already taken by :meth:`take` have been sent to the client and cannot change.
    libsndfile seeks back to patch a header when it closes (MP3's Xing/Info frame); such
    patches are applied while the bytes are still pending and dropped (counted in
    ``dropped``) once they were taken. Taken bytes are released, so memory stays bounded.
    """

    def __init__(self) -> None:
        self._pending = bytearray()
        self._taken = 0
        self._pos = 0
        self.dropped = 0

    @property
    def size(self) -> int:
        return self._taken + len(self._pending)

    def write(self, data: bytes) -> int:
        chunk = bytes(data)
        start, end = self._pos, self._pos + len(chunk)
        if end > self.size:
            self._pending.extend(b"\0" * (end - self.size))
        lo = max(start, self._taken)
        if lo < end:
            self._pending[lo - self._taken : end - self._taken] = chunk[lo - start :]
        if start < self._taken:
            self.dropped += min(end, self._taken) - start
        self._pos = end
        return len(chunk)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, size: int = -1) -> bytes:
        # Write-only in practice; only still-pending bytes can be read back.
        if self._pos < self._taken:
            return b""
        start = self._pos - self._taken
        stop = len(self._pending) if size < 0 else min(len(self._pending), start + size)
        data = bytes(self._pending[start:stop])
        self._pos += len(data)
        return data

    def take(self) -> bytes:
        data = bytes(self._pending)
        self._taken += len(data)
        self._pending.clear()
        return data


def _set_ogg_page_latency(handle: sf.SoundFile, milliseconds: float) -> None:
    """Ask libsndfile to close Ogg pages every ``milliseconds`` (best effort).

    soundfile has no public wrapper for SFC_SET_OGG_PAGE_LATENCY_MS; if its internals ever
    change the stream stays correct, it just arrives in bigger (about one second) pages.
    """
    try:
        ffi, lib = sf._ffi, sf._snd
        raw_handle = handle._file
        value = ffi.new("double[1]", [milliseconds])
        lib.sf_command(raw_handle, _SFC_SET_OGG_PAGE_LATENCY_MS, value, ffi.sizeof(value))
    except (AttributeError, TypeError):
        pass


class StreamEncoder:
    """Encodes one continuous stream: ``header() + encode_chunk(...)* + finish()``.

    Calling :meth:`header` is optional: whatever of the header was not fetched goes out in
    front of the first chunk. Each call returns only the new bytes (possibly ``b""`` while
    a codec buffers a frame or an Ogg page). Use :meth:`close` (or ``with``) to drop an
    abandoned stream, e.g. when the client disconnects.
    """

    def __init__(self, fmt: AudioFormat, sample_rate: int) -> None:
        self.fmt: AudioFormat = fmt
        self.sample_rate = sample_rate
        self.content_type = CONTENT_TYPES[fmt]
        self.frames_written = 0
        self._header_sent = False
        self._finished = False
        self._sink: _ForwardSink | None = None
        self._file: sf.SoundFile | None = None
        self._aac: aac.AacEncoder | None = aac.AacEncoder(sample_rate) if fmt == "aac" else None
        if fmt in ("mp3", "opus"):
            self._sink = _ForwardSink()
            self._file = sf.SoundFile(
                self._sink, "w", samplerate=sample_rate, channels=1, **_sndfile_options(fmt)
            )
            if fmt == "opus":
                _set_ogg_page_latency(self._file, _STREAM_OPUS_PAGE_MS)

    def _header_bytes(self) -> bytes:
        if self.fmt == "wav":
            return wav_header(self.sample_rate, None)
        if self._sink is not None:
            return self._sink.take()  # whatever the codec wrote on open (usually nothing)
        return b""

    def header(self) -> bytes:
        """The bytes that open the stream; ``b""`` if already sent."""
        if self._header_sent:
            return b""
        self._header_sent = True
        return self._header_bytes()

    def encode_chunk(self, audio: np.ndarray) -> bytes:
        """The stream bytes for the next piece of audio (raw PCM16 for wav and pcm)."""
        if self._finished:
            raise RuntimeError("encode_chunk() after finish() or close()")
        head = self.header()
        x = _as_mono(audio)
        self.frames_written += int(x.size)
        if self._aac is not None:
            return head + self._aac.encode(x)
        if self._file is None:
            return head + _pcm16(x).tobytes()
        assert self._sink is not None
        if x.size:
            self._file.write(x)
        return head + self._sink.take()

    def finish(self) -> bytes:
        """Flush the codec and end the stream; ``b""`` if already finished."""
        if self._finished:
            return b""
        head = self.header()
        if self._aac is not None:
            self._finished = True
            if self.frames_written == 0:
                self._aac.encode(np.zeros(_min_frames(self.sample_rate), dtype=np.float32))
            return head + self._aac.finish()
        if self._file is not None and self.frames_written == 0:
            # An Ogg or MPEG stream with no audio at all is malformed; send 20 ms of silence.
            self._file.write(np.zeros(_min_frames(self.sample_rate), dtype=np.float32))
        self._finished = True
        if self._file is None:
            return head
        assert self._sink is not None
        self._file.close()
        self._file = None
        return head + self._sink.take()

    def close(self) -> None:
        """Abandon the stream and release the codec (no more bytes are produced)."""
        self._finished = True
        if self._aac is not None:
            self._aac.close()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._sink is not None:
            self._sink.take()

    def __enter__(self) -> StreamEncoder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def stream_encoder(fmt: str, sample_rate: int = DEFAULT_SAMPLE_RATE) -> StreamEncoder:
    """A :class:`StreamEncoder` for one of STREAMABLE."""
    name = check_format(fmt)
    if name not in STREAMABLE:
        raise UnsupportedFormat(
            f"audio format {name!r} cannot be streamed; streamable formats: "
            f"{', '.join(f for f in FORMATS if f in STREAMABLE)}"
        )
    rate = _check_sample_rate(name, sample_rate)
    if name in _SNDFILE_CODECS or name == "aac":
        _require_codec(name)
    return StreamEncoder(name, rate)


def _hann(n: int) -> np.ndarray:
    # Periodic Hann: copies at hop n/2 sum to exactly one.
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)).astype(np.float32)


def change_speed(
    audio: np.ndarray, speed: float, sample_rate: int = DEFAULT_SAMPLE_RATE
) -> np.ndarray:
    """Play ``audio`` ``speed`` times faster (0.25-4.0) without changing its pitch.

    WSOLA (waveform-similarity overlap-add): 30 ms Hann frames are laid down every 15 ms of
    output and read from about every ``15 ms * speed`` of input; each frame's read position
    is moved by up to 12 ms to where the input best continues the previous frame, so the
    overlapping waveforms stay in phase. The result has ``round(len(audio) / speed)``
    samples. ``speed == 1`` returns the input unchanged.
    """
    if not math.isfinite(speed) or not MIN_SPEED <= speed <= MAX_SPEED:
        raise ValueError(f"speed must be between {MIN_SPEED} and {MAX_SPEED}, got {speed!r}")
    x = np.asarray(audio, dtype=np.float32)
    if x.ndim == 2 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 1:
        raise ValueError(f"expected mono audio of shape (n,), got shape {x.shape}")
    if speed == 1.0:
        return x
    target = round(x.size / speed)
    if target == 0:
        return np.zeros(0, dtype=np.float32)

    frame = max(16, 2 * round(0.015 * sample_rate))
    hop_out = frame // 2
    hop_in = hop_out * speed
    tol = max(1, round(0.012 * sample_rate))
    window = _hann(frame)

    n_frames = math.ceil((target + hop_out) / hop_out) + 1
    # x[0] sits at lead + hop_out so that frame k's centre maps output k*hop_out to input
    # k*hop_in; the zero padding keeps every search window inside the array.
    lead = tol
    last_read = lead + round((n_frames - 1) * hop_in) + tol + hop_out + frame
    padded = np.zeros(max(last_read, lead + hop_out + x.size) + 1, dtype=np.float32)
    padded[lead + hop_out : lead + hop_out + x.size] = x
    energy = np.concatenate(([0.0], np.cumsum(padded.astype(np.float64) ** 2)))

    out = np.zeros(n_frames * hop_out + frame, dtype=np.float32)
    prev = lead
    for k in range(n_frames):
        ideal = lead + round(k * hop_in)
        pos = ideal
        if k > 0:
            template = padded[prev + hop_out : prev + hop_out + frame]
            lo, hi = max(0, ideal - tol), ideal + tol
            if np.any(template):
                region = padded[lo : hi + frame]
                corr = correlate(region, template, mode="valid")
                power = energy[lo + frame : hi + frame + 1] - energy[lo : hi + 1]
                norms = np.sqrt(np.maximum(power, 0.0))
                score = corr / np.maximum(norms, 1e-9)
                if score.max() > 0.0:
                    pos = lo + int(np.argmax(score))
        out[k * hop_out : k * hop_out + frame] += window * padded[pos : pos + frame]
        prev = pos
    return out[hop_out : hop_out + target].copy()
