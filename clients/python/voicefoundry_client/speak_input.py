"""Text streamed in, speech streamed out: the server's `/speak/stream` WebSocket.

The first message names the voice, the format and any sampling; then each text delta goes out
as it comes (an LLM's tokens), and the server answers with audio as soon as a sentence is
whole. `Client.speak_streaming_input` and `AsyncClient.speak_streaming_input` yield, in order,
audio `bytes` (one continuous stream in the chosen format), a `SpeechSegment` after each piece
of text was spoken, and a final `SpeechDone` with the session's usage.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import ClientConnection as SyncConnection
from websockets.sync.client import connect as sync_connect

from voicefoundry_client.errors import (
    APIConnectionError,
    DuplexClosed,
    VoicefoundryError,
    error_class,
    error_from_close,
    error_from_problem,
)

if TYPE_CHECKING:
    from voicefoundry_client._core import Config

NORMAL_CLOSE = (1000, 1001)
START_FIELDS = (
    "language",
    "chunk_chars",
    "flush_after_s",
    "seed",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "max_tokens",
)


class SpeechSegment(msgspec.Struct, frozen=True):
    """A piece of the text, spoken: its audio came before this."""

    text: str
    audio_seconds: float


class SpeechDone(msgspec.Struct, frozen=True):
    """The session ended; `usage`: characters, audio_seconds, segments."""

    usage: dict[str, Any]


SpeechEvent = bytes | SpeechSegment | SpeechDone


def stream_url(base_url: str) -> str:
    scheme, rest = base_url.split("://", 1)
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest}/speak/stream"


def start_message(voice: str, fmt: str, options: dict[str, Any]) -> str:
    if not isinstance(voice, str) or not voice:
        raise ValueError("voice must be a non-empty string")
    body: dict[str, Any] = {"voice": voice, "format": fmt}
    body.update({k: options[k] for k in START_FIELDS if options.get(k) is not None})
    return msgspec.json.encode(body).decode()


def _delta(text: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"text deltas must be strings, got {type(text).__name__}")
    return msgspec.json.encode({"text": text}).decode()


CLOSE = msgspec.json.encode({"close": True}).decode()


def _event(message: str | bytes) -> SpeechEvent | None:
    if isinstance(message, bytes):
        return message
    data = msgspec.json.decode(message)
    if data.get("type") == "segment":
        return SpeechSegment(str(data["text"]), float(data["audio_seconds"]))
    if data.get("type") == "done":
        return SpeechDone(dict(data["usage"]))
    return None  # a message kind this SDK does not know yet


def closed_error(code: int, reason: str) -> VoicefoundryError:
    """The typed error for a session the server closed with `code` (44xx: HTTP status + 4000)."""
    if 4400 <= code < 4500 and code not in (4401, 4403, 4404, 4422):
        status = code - 4000
        return error_class(status)(
            reason or f"closed with {code}",
            status=status,
            problem={"status": status, "detail": reason, "close_code": code},
        )
    error = error_from_close(code, reason)
    if isinstance(error, DuplexClosed):
        return VoicefoundryError(f"speech stream closed ({code}): {reason or 'no reason given'}")
    return error


def _handshake_error(exc: Exception) -> VoicefoundryError:
    if isinstance(exc, InvalidStatus):
        response = exc.response
        return error_from_problem(response.status_code, bytes(response.body or b""), {})
    return APIConnectionError(f"cannot open the speech stream: {exc}")


def _headers(config: Config) -> dict[str, str]:
    return {k: v for k, v in config.headers().items() if k != "User-Agent"}


# --- blocking -------------------------------------------------------------------------------
def speak_streaming_input(
    config: Config, deltas: Iterable[str], voice: str, fmt: str, options: dict[str, Any]
) -> Iterator[SpeechEvent]:
    """Send `deltas` from a thread while the caller reads what the server says."""
    start = start_message(voice, fmt, options)
    opened = False
    try:
        with sync_connect(
            stream_url(config.base_url),
            additional_headers=_headers(config),
            max_size=None,
            open_timeout=60,
        ) as ws:
            opened = True
            yield from _session_sync(ws, start, deltas)
    except (OSError, InvalidHandshake) as exc:
        if opened:
            raise
        raise _handshake_error(exc) from exc


def _session_sync(ws: SyncConnection, start: str, deltas: Iterable[str]) -> Iterator[SpeechEvent]:
    failure: list[BaseException] = []

    def send() -> None:
        try:
            ws.send(start)
            for text in deltas:
                ws.send(_delta(text))
            ws.send(CLOSE)
        except ConnectionClosed:
            pass  # the reader reports why
        except BaseException as exc:  # the caller's iterator failed: end the session
            failure.append(exc)
            ws.close()

    sender = threading.Thread(target=send, name="speak-stream-sender", daemon=True)
    sender.start()
    try:
        yield from _receive_sync(ws, failure)
    finally:
        ws.close()
        sender.join(timeout=5)
    if failure:
        raise failure[0]


def _receive_sync(ws: SyncConnection, failed: list[BaseException]) -> Iterator[SpeechEvent]:
    while True:
        try:
            message = ws.recv()
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
            if failed or (rcvd is not None and rcvd.code in NORMAL_CLOSE):
                return
            raise closed_error(rcvd.code if rcvd else 1006, rcvd.reason if rcvd else "") from exc
        event = _event(message)
        if event is not None:
            yield event


# --- asyncio --------------------------------------------------------------------------------
async def aspeak_streaming_input(
    config: Config,
    deltas: AsyncIterable[str] | Iterable[str],
    voice: str,
    fmt: str,
    options: dict[str, Any],
) -> AsyncIterator[SpeechEvent]:
    import asyncio

    start = start_message(voice, fmt, options)
    try:
        ws = await connect(
            stream_url(config.base_url),
            additional_headers=_headers(config),
            max_size=None,
            open_timeout=60,
        )
    except (OSError, InvalidHandshake) as exc:
        raise _handshake_error(exc) from exc

    failure: list[Exception] = []

    async def send(conn: ClientConnection) -> None:
        try:
            await conn.send(start)
            if isinstance(deltas, AsyncIterable):
                async for text in deltas:
                    await conn.send(_delta(text))
            else:
                for text in deltas:
                    await conn.send(_delta(text))
            await conn.send(CLOSE)
        except ConnectionClosed:
            pass  # the reader reports why
        except Exception as exc:  # the caller's iterator failed: end the session
            failure.append(exc)
            await conn.close()

    sender = asyncio.create_task(send(ws))
    try:
        while True:
            try:
                message = await ws.recv()
            except ConnectionClosed as exc:
                rcvd = exc.rcvd
                if failure or (rcvd is not None and rcvd.code in NORMAL_CLOSE):
                    break
                code, reason = (rcvd.code, rcvd.reason) if rcvd else (1006, "")
                raise closed_error(code, reason) from exc
            event = _event(message)
            if event is not None:
                yield event
    finally:
        sender.cancel()
        with contextlib.suppress(BaseException):
            await sender
        await ws.close()
    if failure:
        raise failure[0]
