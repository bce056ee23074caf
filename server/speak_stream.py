"""`/speak/stream`: a WebSocket that takes text as it is written (an LLM's deltas) and answers
with audio as soon as each sentence of it is whole.

Client -> server, JSON text messages: the first names the voice, the format and any sampling
(`StreamStart`, it may carry text too); then `{"text": "..."}` deltas, `{"flush": true}` (speak
what is buffered now) and `{"close": true}` (speak the rest, then end); a message may combine
them. Server -> client: binary messages of audio in the session's format, one continuous stream
(`/speak`'s streamed encodings: WAV with an unknown-length header, PCM, MP3, Ogg Opus), a JSON
`{"type": "segment", "text", "audio_seconds"}` after each piece's audio, and at the end
`{"type": "done", "usage": {...}}`, then close 1000.

A piece is cut where the buffered text ends a sentence (server/text_split.py, once the next
word confirms it), at a word boundary once `chunk_chars` are buffered (when the session asks
for it), on flush and close, and when no delta came for `flush_after_s` (a bounded wait,
`speak_stream_flush_s`). Pieces are spoken in order through the engine path `/speak` uses
(server/app.py `Synthesis`). Auth is `/duplex`'s: a key in the headers or the `api_key` query
parameter. Refusals close with 44xx and the reason: 4400 bad message, 4401 / 4403 auth, 4404
unknown voice, 4409 voice unavailable, 4413 text too long, 4422 bad values, 4429 over a limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import uuid
from typing import Annotated, Any

import anyio
import msgspec
from litestar import WebSocket, websocket
from litestar.exceptions import WebSocketDisconnect
from msgspec import Meta

from server import admission, audio_formats
from server.auth import AuthError, Unauthorized, secret_from_headers
from server.engine.requests import Sampling
from server.errors import ServiceError, public_text
from server.limits import LimitExceeded
from server.registry import Voice
from server.schemas import (
    MaxTokens,
    RepetitionPenalty,
    Seed,
    Strict,
    Temperature,
    TopK,
    TopP,
    VoiceName,
)
from server.settings import Settings
from server.text_split import whole_sentences_end

log = logging.getLogger("voicefoundry.speak")

SAMPLE_RATE = 24_000
CLOSE_BY_STATUS = {
    **{status: 4000 + status for status in (400, 401, 403, 404, 409, 413, 422, 429)},
    503: 4429,  # a full queue: a refusal like the others, the reason says to retry
}
_END = object()  # the piece queue's end marker


class StreamStart(Strict):
    """The first message of a session."""

    voice: VoiceName
    format: str = "pcm"
    language: str | None = None
    text: str = ""
    flush: bool = False
    close: bool = False
    # Also cut a piece at a word boundary once this many characters wait for a sentence end.
    chunk_chars: Annotated[int, Meta(ge=10, le=5000)] | None = None
    # Speak buffered text after this long without a delta (at most speak_stream_flush_s).
    flush_after_s: Annotated[float, Meta(gt=0, le=60)] | None = None
    seed: Seed | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    repetition_penalty: RepetitionPenalty | None = None
    max_tokens: MaxTokens | None = None


class StreamDelta(Strict):
    text: str = ""
    flush: bool = False
    close: bool = False


class _Refused(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclasses.dataclass
class _Session:
    voice: Voice
    start: StreamStart
    fmt: str
    sampling: Sampling
    flush_after_s: float
    metered: admission.Metered
    pieces: asyncio.Queue[Any] = dataclasses.field(default_factory=asyncio.Queue)
    characters: int = 0
    audio_seconds: float = 0.0
    segments: int = 0


def _decode(data: str | bytes, kind: type[Any]) -> Any:
    try:
        return msgspec.json.decode(data, type=kind)
    except msgspec.ValidationError as exc:  # out of bounds: 4422; unknown / missing / type: 4400
        raise _Refused(4422 if re.search(r"[<>]=? ?-?\d", str(exc)) else 4400, str(exc)) from exc
    except msgspec.DecodeError as exc:
        raise _Refused(4400, f"malformed JSON: {exc}") from exc


def _payload(message: Any) -> str | bytes:
    """A websocket.receive message's text or bytes."""
    data = message.get("text") or message.get("bytes") or b""
    return data if isinstance(data, str | bytes) else b""


def _authenticate(socket: WebSocket) -> Any:
    state = socket.app.state
    secret = secret_from_headers(socket.headers) or socket.query_params.get("api_key")
    try:
        key = state.api_keys.authenticate(secret, "speak")
        admission.count_request(state, key)
        return key
    except Unauthorized as exc:
        raise _Refused(4401, str(exc)) from exc
    except AuthError as exc:
        raise _Refused(4403, str(exc)) from exc
    except LimitExceeded as exc:
        raise _Refused(4429, f"{exc.detail}; retry after {exc.retry_after} s") from exc


async def _open(socket: WebSocket, key: Any) -> _Session:
    state = socket.app.state
    settings: Settings = state.settings
    try:
        message = await asyncio.wait_for(socket.receive(), settings.body_read_timeout_s)
    except TimeoutError as exc:
        raise _Refused(4400, "no first message (voice and format) came in time") from exc
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(detail="the client left before its first message")
    start: StreamStart = _decode(_payload(message), StreamStart)
    try:
        fmt = audio_formats.check_format(start.format)
        if fmt not in audio_formats.STREAMABLE:
            raise _Refused(
                4422,
                f"format {fmt!r} cannot be streamed; use one of "
                f"{', '.join(sorted(audio_formats.STREAMABLE))}",
            )
        audio_formats.stream_encoder(fmt, SAMPLE_RATE).close()  # its codec is installed
        voice = await anyio.to_thread.run_sync(state.voices.get, start.voice)
        state.voices.voicing(voice)  # unavailable, duplex or model not loaded: refused now
        metered = admission.start_synthesis(state, key, 0)
    except (audio_formats.UnsupportedFormat, audio_formats.CodecUnavailable) as exc:
        raise _Refused(4422, str(exc)) from exc
    except ServiceError as exc:
        raise _Refused(CLOSE_BY_STATUS.get(exc.status, 4422), exc.detail) from exc
    except LimitExceeded as exc:
        raise _Refused(4429, f"{exc.detail}; retry after {exc.retry_after} s") from exc
    fields = {
        k: getattr(start, k)
        for k in ("temperature", "top_p", "top_k", "repetition_penalty", "max_tokens")
        if getattr(start, k) is not None
    }
    base = Sampling(max_tokens=settings.max_tokens_per_sentence)
    if "max_tokens" in fields:
        fields["max_tokens"] = min(fields["max_tokens"], settings.max_tokens_per_sentence)
    wait = settings.speak_stream_flush_s
    return _Session(
        voice=voice,
        start=start,
        fmt=fmt,
        sampling=dataclasses.replace(base, **fields),
        flush_after_s=min(start.flush_after_s or wait, wait),
        metered=metered,
    )


@websocket("/speak/stream")
async def speak_stream_socket(socket: WebSocket) -> None:
    await socket.accept()
    session: _Session | None = None
    try:
        key = _authenticate(socket)
        session = await _open(socket, key)
    except WebSocketDisconnect:
        return
    except Exception as exc:
        refused = exc if isinstance(exc, _Refused) else _internal(exc)
        log.info("speak stream refused (%d): %s", refused.code, refused.reason)
        with contextlib.suppress(Exception):
            await socket.close(code=refused.code, reason=refused.reason[:120])
        return
    try:
        await _serve(socket, session)
    finally:
        session.metered.add("characters", session.characters)
        session.metered.add("audio_seconds", session.audio_seconds)
        session.metered.end()


def _internal(exc: BaseException) -> _Refused:
    error_id = uuid.uuid4().hex[:12]
    log.error("speak stream failed (error %s)", error_id, exc_info=exc)
    return _Refused(1011, f"internal error {error_id}")


async def _serve(socket: WebSocket, session: _Session) -> None:
    inbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    reader = asyncio.create_task(_read(socket, inbox))
    speaker = asyncio.create_task(_speak(socket, session))
    first = session.start
    buffering = asyncio.create_task(
        _buffer(socket, session, inbox, StreamDelta(first.text, first.flush, first.close))
    )
    try:
        await asyncio.wait({buffering, speaker}, return_when=asyncio.FIRST_COMPLETED)
        if speaker.done() and not buffering.done():  # it failed: a refusal or an error
            buffering.cancel()
            speaker.result()
        if not await buffering:  # the client left: nothing more to say
            speaker.cancel()
            return
        await speaker
        usage = {
            "characters": session.characters,
            "audio_seconds": round(session.audio_seconds, 3),
            "segments": session.segments,
        }
        await socket.send_text(msgspec.json.encode({"type": "done", "usage": usage}).decode())
        await socket.close(code=1000)
    except _Refused as exc:
        speaker.cancel()
        with contextlib.suppress(Exception):
            await socket.close(code=exc.code, reason=exc.reason[:120])
    except (WebSocketDisconnect, OSError):
        speaker.cancel()
    except Exception as exc:  # logged under an id the client gets, never a bare close
        speaker.cancel()
        refused = _internal(exc)
        with contextlib.suppress(Exception):
            await socket.close(code=refused.code, reason=refused.reason)
    finally:
        reader.cancel()
        buffering.cancel()
        for task in (speaker, buffering):
            with contextlib.suppress(BaseException):
                await task


async def _read(socket: WebSocket, inbox: asyncio.Queue[dict[str, Any] | None]) -> None:
    try:
        while True:
            message = await socket.receive()
            if message["type"] == "websocket.disconnect":
                break
            await inbox.put(dict(message))
    except (WebSocketDisconnect, OSError, RuntimeError):
        pass
    await inbox.put(None)


async def _buffer(
    socket: WebSocket,
    session: _Session,
    inbox: asyncio.Queue[dict[str, Any] | None],
    delta: StreamDelta,
) -> bool:
    """Take deltas, queueing whole pieces, until close (True) or the client leaves (False)."""
    settings: Settings = socket.app.state.settings
    chunk = session.start.chunk_chars
    buffer = ""
    while True:
        if len(delta.text) > settings.max_text_chars:
            raise _Refused(4413, f"a delta is over {settings.max_text_chars} characters")
        buffer = re.sub(r"\s+", " ", buffer + delta.text)
        end = whole_sentences_end(buffer)
        if end == 0 and chunk is not None and len(buffer) >= chunk:
            end = buffer.rfind(" ", 0, chunk + 1)
            end = chunk if end <= 0 else end
        if end == 0 and len(buffer) >= settings.max_text_chars:
            end = len(buffer)
        if delta.flush or delta.close:
            end = len(buffer)
        if end > 0:
            _queue_piece(session, buffer[:end])
            buffer = buffer[end:]
        if delta.close:
            await session.pieces.put(_END)
            return True
        wait = session.flush_after_s if buffer.strip() else None
        try:
            message = await asyncio.wait_for(inbox.get(), timeout=wait)
        except TimeoutError:
            delta = StreamDelta(flush=True)  # text that never ends a sentence: the bounded wait
            continue
        if message is None:
            return False
        delta = _decode(_payload(message), StreamDelta)


def _queue_piece(session: _Session, text: str) -> None:
    piece = text.strip()
    if piece:
        session.characters += len(piece)
        session.pieces.put_nowait(piece)


async def _speak(socket: WebSocket, session: _Session) -> None:
    """Speak the queued pieces in order, sending their audio as it is made."""
    from server.app import Synthesis  # the engine path /speak takes (app.py imports this)

    state = socket.app.state
    encoder = audio_formats.stream_encoder(session.fmt, SAMPLE_RATE)
    header = encoder.header()
    index = 0
    try:
        while True:
            piece = await session.pieces.get()
            if piece is _END:
                break
            seed = session.start.seed
            seed = None if seed is None else (seed + index) % 2**32
            synthesis = Synthesis(
                state, session.voice, piece, session.start.language, session.sampling, seed, True
            )
            await synthesis.prepare()
            synthesis.submit()
            seconds = 0.0
            async for chunk in synthesis.chunks():
                seconds += len(chunk) / SAMPLE_RATE
                data = encoder.encode_chunk(chunk)
                if header or data:
                    await socket.send_bytes(header + data)
                    header = b""
            session.audio_seconds += seconds
            session.segments += 1
            index += 1
            segment = {"type": "segment", "text": piece, "audio_seconds": round(seconds, 3)}
            await socket.send_text(msgspec.json.encode(segment).decode())
        tail = header + encoder.finish()
        if tail:
            await socket.send_bytes(tail)
    except ServiceError as exc:
        raise _Refused(CLOSE_BY_STATUS.get(exc.status, 1011), public_text(exc.detail)) from exc
    finally:
        encoder.close()
