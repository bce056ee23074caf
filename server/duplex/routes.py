"""`GET /duplex` and `GET /api/chat`: a WebSocket per conversation, in the Moshi / PersonaPlex
binary framing. `/api/chat` is the path Kyutai's and NVIDIA's clients connect to: the same
session, with Ogg/Opus audio both ways unless `encoding` says otherwise (`/duplex`: PCM16).

connect -> auth -> resolve the speaker -> the engine conditions the session -> 0x00 handshake
-> 0x04 metadata -> audio in, audio + text out, until either side closes. Two tasks run per
socket: one receives (decode, re-frame, queue into the engine), one sends what the engine made.
All sends go through the sending task, so nothing writes the socket concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

import anyio
import msgspec
from litestar import WebSocket, websocket
from litestar.exceptions import WebSocketDisconnect

from server.admission import Metered, count_request, start_duplex
from server.auth import AuthError, Unauthorized, secret_from_headers
from server.duplex import protocol as proto
from server.duplex.codec import make_codec
from server.duplex.engine import Closed, DuplexEngine, LiveSession, SessionLimit
from server.duplex.voices import duplex_voicing
from server.engine.bank import BankFull
from server.errors import NotFound, ServiceError, public_text
from server.limits import LimitExceeded

log = logging.getLogger("voicefoundry.duplex")

CLIENT_PATH = "/api/chat"  # Moshi / PersonaPlex clients: Opus by default
OGG_MAGIC = b"OggS"
OGG_IN_PCM_HINT = (
    "this session reads raw PCM16 (encoding=pcm16) but got Ogg pages: connect with "
    "encoding=opus to send Ogg/Opus audio"
)


class _Rejected(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _params(socket: WebSocket) -> proto.DuplexParams:
    query = {k: v for k, v in socket.query_params.items()}
    try:
        params = msgspec.convert(query, proto.DuplexParams, strict=False)
        params.sampling()
        params.voice_name()
    except (msgspec.ValidationError, ValueError) as exc:
        raise _Rejected(proto.CloseCode.UNPROCESSABLE, f"invalid query parameters: {exc}") from exc
    if params.encoding is None:
        params.encoding = "opus" if socket.scope["path"].rstrip("/") == CLIENT_PATH else "pcm16"
    return params


def _voice(socket: WebSocket, engine: DuplexEngine, params: proto.DuplexParams) -> str:
    """The voice the session speaks with: the one asked for, else the configured
    `duplex_default_voice`, else the first PersonaPlex model loaded."""
    asked = params.voice_name()
    if asked:
        return asked
    default = getattr(socket.app.state.settings, "duplex_default_voice", None)
    return default or next(iter(engine.models))


def _authenticate(socket: WebSocket, params: proto.DuplexParams) -> Metered:
    """The key's session: counted as a request, holding one of its duplex_sessions."""
    state = socket.app.state
    secret = secret_from_headers(socket.headers) or params.api_key
    try:
        key = state.api_keys.authenticate(secret, "speak")
        count_request(state, key)
        return start_duplex(state, key)
    except Unauthorized as exc:
        raise _Rejected(proto.CloseCode.UNAUTHORIZED, str(exc)) from exc
    except AuthError as exc:
        raise _Rejected(proto.CloseCode.FORBIDDEN, str(exc)) from exc
    except LimitExceeded as exc:
        reason = f"{exc.detail}; retry after {exc.retry_after} s"
        raise _Rejected(proto.CloseCode.TOO_MANY, reason) from exc


async def _open(socket: WebSocket, params: proto.DuplexParams) -> LiveSession:
    state = socket.app.state
    engine: DuplexEngine | None = getattr(state, "duplex", None)
    if engine is None or not engine.models:
        raise _Rejected(proto.CloseCode.NOT_FOUND, "no duplex (PersonaPlex) model is loaded")
    try:
        voicing = await anyio.to_thread.run_sync(
            duplex_voicing, state.registry, engine, _voice(socket, engine, params)
        )
    except NotFound as exc:
        raise _Rejected(proto.CloseCode.NOT_FOUND, exc.detail) from exc
    except ServiceError as exc:
        raise _Rejected(proto.CloseCode.UNPROCESSABLE, exc.detail) from exc
    if params.text_prompt is not None:
        voicing.text_prompt = params.text_prompt or None  # "": no system prompt
    seed, text_seed, audio_seed = params.seeds()
    try:
        return await engine.open(
            voicing,
            seed=seed,
            text_seed=text_seed,
            audio_seed=audio_seed,
            sampling=params.sampling(),
        )
    except SessionLimit as exc:
        # A refusal like every other: 44xx with the reason (1013 is kept for sessions the
        # server ends itself, e.g. at shutdown).
        raise _Rejected(proto.CloseCode.TOO_MANY, f"{exc}; try again shortly") from exc
    except BankFull as exc:  # every adapter slot is held by a live session's voice
        raise _Rejected(proto.CloseCode.TOO_MANY, str(exc)) from exc
    except Exception as exc:  # a corrupt adapter or voice prompt: the client learns why
        reason = f"cannot start the session: {public_text(str(exc))}"
        raise _Rejected(proto.CloseCode.UNPROCESSABLE, reason) from exc


def _internal(exc: Exception, when: str = "to open") -> _Rejected:
    """An unexpected failure: logged with its traceback under an id the client gets, never a
    bare close without a reason."""
    error_id = uuid.uuid4().hex[:12]
    log.error("duplex session failed %s (error %s)", when, error_id, exc_info=exc)
    return _Rejected(proto.CloseCode.INTERNAL, f"internal error {error_id}")


@websocket(["/duplex", CLIENT_PATH])
async def duplex_socket(socket: WebSocket) -> None:
    await socket.accept()
    metrics = socket.app.state.metrics
    metered: Metered | None = None
    try:
        params = _params(socket)
        metered = _authenticate(socket, params)
        session = await _open(socket, params)
    except Exception as exc:
        if metered is not None:
            metered.end()
        rejected = exc if isinstance(exc, _Rejected) else _internal(exc)
        if isinstance(exc, _Rejected):
            log.info("duplex session refused (%d): %s", rejected.code, rejected.reason)
        metrics.duplex_rejected(rejected.code)
        with contextlib.suppress(Exception):
            await socket.send_bytes(proto.error_message(rejected.reason))
            await socket.close(code=rejected.code, reason=rejected.reason[:120])
        return
    assert metered is not None  # set before any session opens
    engine: DuplexEngine = socket.app.state.duplex
    started = time.monotonic()
    try:
        await _converse(socket, engine, session, params)
    except Exception as exc:  # never the framework's bare 4500: a reason, a log line, a count
        failed = _internal(exc, "mid-session")
        metrics.duplex_closed(failed.code)
        with contextlib.suppress(Exception):
            await socket.send_bytes(proto.error_message(failed.reason))
            await socket.close(code=failed.code, reason=failed.reason)
    finally:
        metered.add("duplex_seconds", time.monotonic() - started)
        metered.end()
        await engine.close(session)
        metrics.duplex_session(session)


async def _converse(
    socket: WebSocket, engine: DuplexEngine, session: LiveSession, params: proto.DuplexParams
) -> None:
    encoding = params.encoding or "pcm16"
    decoder, encoder = make_codec(encoding)
    await socket.send_bytes(proto.HANDSHAKE)
    info = proto.SessionInfo(
        session_id=session.id,
        model=session.voicing.model,
        speaker=session.voicing.speaker,
        encoding=encoding,
    )
    await socket.send_bytes(proto.metadata_message(info))
    unread: str | None = None
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(_send_loop, socket, session, encoder, tasks.cancel_scope)
        unread = await _receive_loop(socket, engine, session, decoder, encoding)
        tasks.cancel_scope.cancel()
    if unread is not None:
        await _close_unread(socket, session, unread)


async def _receive_loop(
    socket: WebSocket, engine: DuplexEngine, session: LiveSession, decoder: Any, encoding: str
) -> str | None:
    """Read the client's messages until it leaves (None), or until it left so many replies
    unread that the session's outbound queue stayed full (the reason to close it with). While
    the queue is full, the client's next messages wait: a client sending faster than it reads
    is slowed down to its reading pace first. A PCM session sent Ogg pages (an Opus client
    that did not ask for encoding=opus) drops them and says so once, instead of playing them
    to the model as noise."""
    hinted = False
    while True:
        try:
            event = await socket.receive()
        except WebSocketDisconnect:
            return None
        if event["type"] == "websocket.disconnect":
            return None
        raw = event.get("bytes")
        data = raw if isinstance(raw, bytes) else str(event.get("text") or "")
        reply: bytes | None = None
        try:
            kind, payload = proto.parse(data)
            if kind is proto.Kind.AUDIO and encoding == "pcm16" and payload[:4] == OGG_MAGIC:
                if not hinted:
                    hinted = True
                    log.info("duplex session %s: Ogg pages on a PCM16 session", session.id)
                    reply = proto.error_message(OGG_IN_PCM_HINT)
            elif kind is proto.Kind.AUDIO:
                frames = decoder.feed(payload)
                if frames:
                    engine.feed(session, frames)
            elif kind is proto.Kind.PING:
                reply = proto.PONG
            else:
                reply = await _control(engine, session, proto.Control(payload[0]))
        except proto.MalformedMessage as exc:
            reply = proto.error_message(str(exc))
        if reply is not None and not await session.reply(reply, engine.unread_grace_s):
            return f"too many unread messages ({session.out.qsize()} waiting for the client)"


async def _control(
    engine: DuplexEngine, session: LiveSession, control: proto.Control
) -> bytes | None:
    """Apply a control message; the reply it gets, if any."""
    if control is proto.Control.PAUSE:
        session.paused = True
    elif control is proto.Control.START:
        session.paused = False
    elif control is proto.Control.RESTART:
        await engine.restart(session)
        return proto.HANDSHAKE
    # END_TURN: a full-duplex model takes turns by itself; nothing to do.
    return None


async def _close_unread(socket: WebSocket, session: LiveSession, reason: str) -> None:
    """Close a session whose client stopped reading while it kept sending: its replies would
    otherwise pile up without bound. The send loop has stopped, so nothing else writes."""
    code = proto.CloseCode.UNREAD
    log.warning("duplex session %s closed (%d): %s", session.id, code, reason)
    socket.app.state.metrics.duplex_closed(code)
    with contextlib.suppress(Exception):
        await socket.close(code=code, reason=reason)


async def _send_loop(socket: WebSocket, session: LiveSession, encoder: Any, scope: Any) -> None:
    try:
        while True:
            item = await session.out.get()
            if isinstance(item, bytes):
                await socket.send_bytes(item)
            elif isinstance(item, Closed):
                await socket.send_bytes(proto.error_message(item.reason))
                await socket.close(code=proto.CloseCode.TRY_AGAIN, reason=item.reason)
                scope.cancel()
                return
            elif isinstance(item, BaseException):
                await socket.send_bytes(proto.error_message(f"session failed: {item}"))
                await socket.close(code=proto.CloseCode.INTERNAL, reason="session failed")
                scope.cancel()
                return
            else:
                audio = encoder.encode(item.pcm)
                if audio:
                    await socket.send_bytes(proto.message(proto.Kind.AUDIO, audio))
                if item.text:
                    await socket.send_bytes(proto.text_message(item.text))
    except (WebSocketDisconnect, OSError, RuntimeError):
        scope.cancel()  # the client went away mid-send
    except asyncio.CancelledError:
        raise
