"""Audio in and out of a duplex socket: PCM16 (little-endian, 24 kHz mono) or Ogg/Opus (sphn).

Clients send audio in pieces of any length; the decoder re-frames it into 1920-sample steps.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from server.duplex.protocol import FRAME_SAMPLES, SAMPLE_RATE, MalformedMessage


class Decoder(Protocol):
    def feed(self, payload: bytes) -> list[np.ndarray]: ...


class Encoder(Protocol):
    def encode(self, pcm: np.ndarray) -> bytes: ...


class _Framer:
    """Collects float32 samples and hands out whole frames."""

    def __init__(self) -> None:
        self._pending = np.zeros(0, np.float32)

    def frames(self, samples: np.ndarray) -> list[np.ndarray]:
        buffer = np.concatenate([self._pending, samples.astype(np.float32, copy=False)])
        whole = len(buffer) // FRAME_SAMPLES
        self._pending = buffer[whole * FRAME_SAMPLES :]
        return [buffer[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES] for i in range(whole)]


class Pcm16Decoder:
    def __init__(self) -> None:
        self._framer = _Framer()
        self._odd = b""  # a sample split across two messages

    def feed(self, payload: bytes) -> list[np.ndarray]:
        data = self._odd + payload
        cut = len(data) - len(data) % 2
        self._odd = data[cut:]
        samples = np.frombuffer(data[:cut], dtype="<i2").astype(np.float32) / 32768.0
        return self._framer.frames(samples)


class Pcm16Encoder:
    def encode(self, pcm: np.ndarray) -> bytes:
        return np.round(np.clip(pcm, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


class OpusDecoder:
    def __init__(self) -> None:
        import sphn

        self._reader = sphn.OpusStreamReader(SAMPLE_RATE)
        self._framer = _Framer()

    def feed(self, payload: bytes) -> list[np.ndarray]:
        try:
            pcm = self._reader.append_bytes(payload)
        except Exception as exc:  # sphn raises its own error types for bad Ogg pages
            raise MalformedMessage(f"undecodable Opus audio: {exc}") from exc
        return self._framer.frames(np.asarray(pcm, np.float32).reshape(-1))


class OpusEncoder:
    def __init__(self) -> None:
        import sphn

        self._writer = sphn.OpusStreamWriter(SAMPLE_RATE)

    def encode(self, pcm: np.ndarray) -> bytes:
        return bytes(self._writer.append_pcm(np.asarray(pcm, np.float32)))


def make_codec(encoding: str) -> tuple[Decoder, Encoder]:
    if encoding == "opus":
        return OpusDecoder(), OpusEncoder()
    return Pcm16Decoder(), Pcm16Encoder()
