"""AAC-LC in ADTS (`response_format: "aac"`): FFmpeg's native AAC encoder through PyAV.

libsndfile, which writes every other format here, has no AAC. PyAV's wheels carry FFmpeg's
libraries (no `ffmpeg` program is needed or called); only its codec is used: each raw AAC packet
gets its 7-byte ADTS header here, so a whole clip and a stream are the same bytes, a run of
self-delimiting frames that any AAC decoder (or a browser's `<audio>`) reads from the start.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np

# ISO/IEC 14496-3 sampling_frequency_index.
ADTS_SAMPLE_RATES: Final[tuple[int, ...]] = (
    96_000, 88_200, 64_000, 48_000, 44_100, 32_000, 24_000, 22_050, 16_000, 12_000, 11_025,
    8_000, 7_350,
)  # fmt: skip
_AAC_LC_PROFILE: Final = 1  # ADTS profile field: audio object type 2 (LC) minus 1
_BIT_RATE_PER_CHANNEL: Final = 64_000
_MAX_FRAME_BYTES: Final = (1 << 13) - 1


def available() -> bool:
    """Whether PyAV (with FFmpeg's AAC encoder) is installed."""
    try:
        import av

        av.codec.Codec("aac", "w")
    except Exception:  # ImportError, or a PyAV built without the encoder
        return False
    return True


def adts_header(payload_bytes: int, sample_rate: int, channels: int = 1) -> bytes:
    """The 7-byte ADTS header (MPEG-4, no CRC) of one AAC-LC frame of `payload_bytes`."""
    length = payload_bytes + 7
    if length > _MAX_FRAME_BYTES:
        raise ValueError(f"an ADTS frame cannot hold {payload_bytes} bytes")
    rate_index = ADTS_SAMPLE_RATES.index(sample_rate)
    bits = (
        (0xFFF << 44)  # syncword
        | (0 << 43)  # ID: MPEG-4
        | (0 << 41)  # layer
        | (1 << 40)  # protection_absent: no CRC
        | (_AAC_LC_PROFILE << 38)
        | (rate_index << 34)
        | (0 << 33)  # private bit
        | (channels << 30)
        | (length << 13)  # aac_frame_length (original/copy, home, copyright bits: 0)
        | (0x7FF << 2)  # adts_buffer_fullness: variable bit rate
        | 0  # number_of_raw_data_blocks_in_frame - 1
    )
    return bits.to_bytes(7, "big")


class AacEncoder:
    """Mono float32 in, ADTS frames out: `encode(samples)*` then `finish()` (or `close()`)."""

    def __init__(self, sample_rate: int) -> None:
        import av

        if sample_rate not in ADTS_SAMPLE_RATES:
            raise ValueError(f"AAC cannot be written at {sample_rate} Hz")
        self.sample_rate = sample_rate
        self._av: Any = av
        self._codec: Any = av.CodecContext.create("aac", "w")
        self._codec.sample_rate = sample_rate
        self._codec.layout = "mono"
        self._codec.format = "fltp"
        self._codec.bit_rate = _BIT_RATE_PER_CHANNEL
        self._codec.open()
        self._frame_size: int = self._codec.frame_size  # 1024 samples
        self._pending = np.zeros(0, np.float32)
        self._pts = 0
        self._closed = False

    def _frame(self, samples: np.ndarray) -> Any:
        frame = self._av.AudioFrame.from_ndarray(
            np.ascontiguousarray(samples, np.float32)[None, :], format="fltp", layout="mono"
        )
        frame.sample_rate = self.sample_rate
        frame.pts = self._pts
        self._pts += samples.size
        return frame

    def _packets(self, frame: Any) -> bytes:
        out = bytearray()
        for packet in self._codec.encode(frame):
            payload = bytes(packet)
            out += adts_header(len(payload), self.sample_rate) + payload
        return bytes(out)

    def encode(self, samples: np.ndarray) -> bytes:
        """The frames that `samples` completes (the codec works in 1024-sample frames)."""
        if self._closed:
            raise RuntimeError("encode() after finish() or close()")
        self._pending = np.concatenate([self._pending, np.asarray(samples, np.float32)])
        out = bytearray()
        whole = self._pending.size - self._pending.size % self._frame_size
        for start in range(0, whole, self._frame_size):
            out += self._packets(self._frame(self._pending[start : start + self._frame_size]))
        self._pending = self._pending[whole:]
        return bytes(out)

    def finish(self) -> bytes:
        """The last (short) frame and everything the codec still holds."""
        if self._closed:
            return b""
        out = bytearray()
        if self._pending.size:
            out += self._packets(self._frame(self._pending))
            self._pending = np.zeros(0, np.float32)
        out += self._packets(None)
        self.close()
        return bytes(out)

    def close(self) -> None:
        self._closed = True
        self._codec = None


def encode(audio: np.ndarray, sample_rate: int) -> bytes:
    """A whole mono clip as ADTS AAC-LC."""
    encoder = AacEncoder(sample_rate)
    return encoder.encode(audio) + encoder.finish()
