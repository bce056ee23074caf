"""Full-duplex conversations over the server's `/duplex` WebSocket (Moshi-compatible framing).

Every binary message starts with its kind byte. Server -> client: 0x00 handshake (extra bytes
ignored), 0x04 metadata JSON, then 0x01 audio and 0x02 text pieces; 0x05 error (the server may
close after it); 0x06 pong. Client -> server: 0x01 audio, 0x03 control (one byte), 0x06 ping.
Close codes map onto the SDK's exceptions: 4400 BadRequest, 4401 Unauthorized, 4403 Forbidden,
4404 NotFound, 4409 Conflict, 4413 PayloadTooLarge, 4422 Validation, 4429 RateLimited (also the
server's session limit), 1008 BadRequest, 1013 ServiceUnavailable.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator
from enum import IntEnum
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from voicefoundry_client.errors import (
    APIConnectionError,
    APITimeoutError,
    DuplexClosed,
    VoicefoundryError,
    error_from_close,
    error_from_problem,
)

if TYPE_CHECKING:
    from voicefoundry_client._core import Config

SAMPLE_RATE = 24_000
FRAME_SAMPLES = 1920  # 80 ms at 24 kHz
ENCODINGS = ("pcm16", "opus")
NORMAL_CLOSE = (1000, 1001)


class Kind(IntEnum):
    HANDSHAKE = 0x00
    AUDIO = 0x01
    TEXT = 0x02
    CONTROL = 0x03
    METADATA = 0x04
    ERROR = 0x05
    PING = 0x06


class Control(IntEnum):
    START = 0x00
    END_TURN = 0x01
    PAUSE = 0x02
    RESTART = 0x03


class DuplexMetadata(msgspec.Struct, kw_only=True, frozen=True):
    """The 0x04 message: what the session runs with."""

    session_id: str = ""
    sample_rate: int = SAMPLE_RATE
    frame_samples: int = FRAME_SAMPLES
    encoding: str = "pcm16"
    speaker: str = ""
    model: str = ""


class AudioFrame(msgspec.Struct, frozen=True):
    """Audio from the server: pcm16 little-endian mono bytes (or an int16 array with
    `as_numpy=True`), or Ogg/Opus page bytes for `encoding="opus"` (then `samples` is 0)."""

    pcm: Any
    samples: int


class TextPiece(msgspec.Struct, frozen=True):
    """One token piece of the model's inner monologue."""

    text: str


class DuplexError(msgspec.Struct, frozen=True):
    """An 0x05 error from the server; it may close the session after it."""

    reason: str


DuplexEvent = AudioFrame | TextPiece | DuplexError


class _End(msgspec.Struct, frozen=True):
    code: int
    reason: str


def duplex_url(base_url: str, params: dict[str, Any]) -> str:
    scheme, rest = base_url.split("://", 1)
    ws_scheme = "wss" if scheme == "https" else "ws"
    query = urlencode({k: v for k, v in params.items() if v is not None})
    return f"{ws_scheme}://{rest}/duplex?{query}"


def encode_pcm16(pcm: Any) -> bytes:
    """bytes pass through; an int16 array is sent as is; a float array in [-1, 1] is scaled."""
    if isinstance(pcm, bytes | bytearray | memoryview):
        return bytes(pcm)
    import numpy as np

    array = np.asarray(pcm)
    if array.ndim == 2 and 1 in array.shape:
        array = array.reshape(-1)
    if array.ndim != 1:
        raise ValueError(f"audio must be mono (one dimension); got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        array = np.round(np.clip(array, -1.0, 1.0) * 32767.0)
    elif array.dtype != np.int16:
        raise TypeError(f"audio must be int16 or float samples; got {array.dtype}")
    return array.astype("<i2").tobytes()


class DuplexSession:
    """One conversation. Use `async with client.duplex(speaker) as session:`; inside it
    `metadata` is set, `send_audio` / `send_control` / `ping` talk and `events()` listens."""

    def __init__(
        self,
        config: Config,
        speaker: str,
        *,
        text_prompt: str | None = None,
        seed: int | None = None,
        encoding: str = "pcm16",
        as_numpy: bool = False,
        open_timeout: float = 120.0,
    ) -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}; got {encoding!r}")
        if as_numpy and encoding != "pcm16":
            raise ValueError("as_numpy needs encoding='pcm16'")
        params = {"speaker": speaker, "text_prompt": text_prompt, "seed": seed}
        params["encoding"] = encoding
        self.url = duplex_url(config.base_url, params)
        self.encoding = encoding
        self.as_numpy = as_numpy
        self.open_timeout = open_timeout
        self.metadata: DuplexMetadata | None = None
        self._headers = config.headers()
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[DuplexEvent | _End] = asyncio.Queue(maxsize=1024)
        self._early: list[bytes] = []
        self._pings: collections.deque[tuple[float, asyncio.Future[float]]] = collections.deque()
        self._end: _End | None = None
        self._last_error = ""
        self._closing = False

    # --- opening and closing ----------------------------------------------------------------
    async def __aenter__(self) -> DuplexSession:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Connect and wait for the handshake and metadata (the server primes the model first)."""
        try:
            self._ws = await connect(
                self.url,
                additional_headers=self._headers,
                open_timeout=self.open_timeout,
                max_size=None,
                compression=None,
            )
        except InvalidStatus as exc:
            response = exc.response
            raise error_from_problem(
                response.status_code,
                bytes(response.body or b""),
                dict(response.headers.raw_items()),
            ) from exc
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            kind = APITimeoutError if isinstance(exc, TimeoutError) else APIConnectionError
            raise kind(f"cannot open {self.url}: {type(exc).__name__}: {exc}") from exc
        try:
            await asyncio.wait_for(self._await_ready(), self.open_timeout)
        except TimeoutError as exc:
            await self._abort()
            raise APITimeoutError(
                f"{self.url}: no handshake within {self.open_timeout:g} s"
            ) from exc
        except BaseException:
            await self._abort()
            raise
        self._reader = asyncio.create_task(self._read_loop())

    async def _await_ready(self) -> None:
        assert self._ws is not None
        handshake = False
        while True:
            try:
                message = await self._ws.recv()
            except ConnectionClosed as exc:
                raise self._closed_error(exc) from None
            if isinstance(message, str) or not message:
                continue
            kind, payload = message[0], message[1:]
            if kind == Kind.ERROR:
                self._last_error = payload.decode("utf-8", "replace")
            elif kind == Kind.HANDSHAKE:
                handshake = True
            elif handshake and kind == Kind.METADATA:
                self.metadata = _decode_metadata(payload, self.encoding)
                return
            elif handshake:  # a server that sends no metadata: keep the message, go on
                self._early.append(message)
                self.metadata = DuplexMetadata(encoding=self.encoding)
                return

    async def close(self) -> None:
        """Close with 1000 and stop listening; safe to call twice."""
        if self._ws is None or self._closing:
            return
        self._closing = True
        with contextlib.suppress(Exception):
            await self._ws.close(1000, "client done")
        if self._reader is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._reader, 5.0)
            self._reader.cancel()
        for _, future in self._pings:
            future.cancel()

    async def _abort(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close(1000)

    # --- talking ----------------------------------------------------------------------------
    async def send_audio(self, pcm: Any) -> None:
        """Audio to the model: pcm16 bytes or an int16 / float numpy array (any length), or
        Ogg/Opus bytes for `encoding="opus"`."""
        if self.encoding == "pcm16":
            payload = encode_pcm16(pcm)
        elif isinstance(pcm, bytes | bytearray | memoryview):
            payload = bytes(pcm)
        else:
            raise TypeError("with encoding='opus' send Ogg/Opus bytes (as the sphn package makes)")
        await self._send(bytes([Kind.AUDIO]) + payload)

    async def send_control(self, control: Control | int) -> None:
        """A control byte: Control.START, END_TURN, PAUSE or RESTART."""
        await self._send(bytes([Kind.CONTROL, int(Control(control))]))

    async def ping(self, timeout: float = 10.0) -> float:
        """Send 0x06 and wait for the pong; the round trip in seconds."""
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pings.append((time.perf_counter(), future))
        await self._send(bytes([Kind.PING]))
        return await asyncio.wait_for(future, timeout)

    async def _send(self, message: bytes) -> None:
        if self._ws is None:
            raise RuntimeError("the duplex session is not open (use `async with`)")
        if self._end is not None:
            raise self._end_error(self._end) or APIConnectionError("the duplex session is closed")
        try:
            await self._ws.send(message)
        except ConnectionClosed as exc:
            raise self._closed_error(exc) from None

    # --- listening --------------------------------------------------------------------------
    async def events(self) -> AsyncIterator[DuplexEvent]:
        """AudioFrame / TextPiece / DuplexError as they arrive; ends when the session closes
        normally, raises the mapped error when the server closes it with an error code."""
        while True:
            if self._end is not None and self._queue.empty():
                error = self._end_error(self._end)
                if error is not None:
                    raise error
                return
            item = await self._queue.get()
            if isinstance(item, _End):
                self._end = item
                continue
            yield item

    async def _read_loop(self) -> None:
        assert self._ws is not None
        end = _End(1006, "connection lost")
        try:
            for message in self._early:
                await self._deliver(message)
            while True:
                received = await self._ws.recv()
                if isinstance(received, bytes):
                    await self._deliver(received)
        except ConnectionClosed as exc:
            close = exc.rcvd
            end = _End(close.code, close.reason) if close is not None else end
        finally:
            await self._queue.put(end)

    async def _deliver(self, message: bytes) -> None:
        if not message:
            return
        kind, payload = message[0], message[1:]
        if kind == Kind.AUDIO:
            await self._queue.put(self._audio(payload))
        elif kind == Kind.TEXT:
            await self._queue.put(TextPiece(payload.decode("utf-8", "replace")))
        elif kind == Kind.ERROR:
            self._last_error = payload.decode("utf-8", "replace")
            await self._queue.put(DuplexError(self._last_error))
        elif kind == Kind.PING:
            if self._pings:
                sent, future = self._pings.popleft()
                if not future.done():
                    future.set_result(time.perf_counter() - sent)
        elif kind == Kind.METADATA:
            self.metadata = _decode_metadata(payload, self.encoding)
        # 0x00 again, or kinds newer than this SDK: ignored

    def _audio(self, payload: bytes) -> AudioFrame:
        if self.encoding != "pcm16":
            return AudioFrame(payload, 0)
        if self.as_numpy:
            import numpy as np

            return AudioFrame(np.frombuffer(payload, dtype="<i2"), len(payload) // 2)
        return AudioFrame(payload, len(payload) // 2)

    # --- errors -----------------------------------------------------------------------------
    def _end_error(self, end: _End) -> VoicefoundryError | None:
        if end.code in NORMAL_CLOSE:
            return None
        return error_from_close(end.code, self._last_error or end.reason)

    def _closed_error(self, exc: ConnectionClosed) -> VoicefoundryError:
        close = exc.rcvd
        if close is None:
            return APIConnectionError(f"{self.url}: connection lost ({exc})")
        reason = self._last_error or close.reason
        if close.code in NORMAL_CLOSE:
            return DuplexClosed(close.code, reason or "the server ended the session")
        return error_from_close(close.code, reason)


def _decode_metadata(payload: bytes, encoding: str) -> DuplexMetadata:
    try:
        return msgspec.json.decode(payload, type=DuplexMetadata)
    except msgspec.DecodeError:
        return DuplexMetadata(encoding=encoding)
