"""`GET /duplex`: a WebSocket per conversation, in the Moshi / PersonaPlex binary framing.

connect -> auth -> resolve the speaker -> the engine conditions the session -> 0x00 handshake
-> 0x04 metadata -> audio in, audio + text out, until either side closes. Two tasks run per
socket: one receives (decode, re-frame, queue into the engine), one sends what the engine made.
All sends go through the sending task, so nothing writes the socket concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Any

import anyio
import msgspec
from litestar import WebSocket, websocket
from litestar.exceptions import WebSocketDisconnect

from server.auth import AuthError, KeyStore, Unauthorized, secret_from_headers
from server.duplex import protocol as proto
from server.duplex.codec import make_codec
from server.duplex.engine import Closed, DuplexEngine, LiveSession, SessionLimit
from server.duplex.voices import duplex_voicing
from server.errors import NotFound, ServiceError, public_text

log = logging.getLogger("voicefoundry.duplex")


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
    except (msgspec.ValidationError, ValueError) as exc:
        raise _Rejected(proto.CloseCode.UNPROCESSABLE, f"invalid query parameters: {exc}") from exc
    return params


def _authenticate(socket: WebSocket, params: proto.DuplexParams) -> None:
    keys: KeyStore = socket.app.state.api_keys
    secret = secret_from_headers(socket.headers) or params.api_key
    try:
        keys.authenticate(secret, "speak")
    except Unauthorized as exc:
        raise _Rejected(proto.CloseCode.UNAUTHORIZED, str(exc)) from exc
    except AuthError as exc:
        raise _Rejected(proto.CloseCode.FORBIDDEN, str(exc)) from exc


async def _open(socket: WebSocket, params: proto.DuplexParams) -> LiveSession:
    state = socket.app.state
    engine: DuplexEngine | None = getattr(state, "duplex", None)
    if engine is None or not engine.models:
        raise _Rejected(proto.CloseCode.NOT_FOUND, "no duplex (PersonaPlex) model is loaded")
    try:
        voicing = await anyio.to_thread.run_sync(
            duplex_voicing, state.registry, engine, params.speaker
        )
    except NotFound as exc:
        raise _Rejected(proto.CloseCode.NOT_FOUND, exc.detail) from exc
    except ServiceError as exc:
        raise _Rejected(proto.CloseCode.UNPROCESSABLE, exc.detail) from exc
    if params.text_prompt is not None:
        voicing.text_prompt = params.text_prompt
    try:
        return await engine.open(voicing, seed=params.seed, sampling=params.sampling())
    except SessionLimit as exc:
        raise _Rejected(proto.CloseCode.TRY_AGAIN, f"{exc}; try again shortly") from exc
    except Exception as exc:  # a corrupt adapter or voice prompt: the client learns why
        reason = f"cannot start the session: {public_text(str(exc))}"
        raise _Rejected(proto.CloseCode.UNPROCESSABLE, reason) from exc


def _internal(exc: Exception) -> _Rejected:
    """An unexpected failure while opening a session: logged with its traceback under an id the
    client gets, never a bare close without a reason."""
    error_id = uuid.uuid4().hex[:12]
    log.error("duplex session failed to open (error %s)", error_id, exc_info=exc)
    return _Rejected(proto.CloseCode.INTERNAL, f"internal error {error_id}")


@websocket("/duplex")
async def duplex_socket(socket: WebSocket) -> None:
    await socket.accept()
    metrics = socket.app.state.metrics
    try:
        params = _params(socket)
        _authenticate(socket, params)
        session = await _open(socket, params)
    except Exception as exc:
        rejected = exc if isinstance(exc, _Rejected) else _internal(exc)
        if isinstance(exc, _Rejected):
            log.info("duplex session refused (%d): %s", rejected.code, rejected.reason)
        metrics.duplex_rejected(rejected.code)
        with contextlib.suppress(Exception):
            await socket.send_bytes(proto.error_message(rejected.reason))
            await socket.close(code=rejected.code, reason=rejected.reason[:120])
        return
    engine: DuplexEngine = socket.app.state.duplex
    try:
        await _converse(socket, engine, session, params)
    finally:
        await engine.close(session)
        metrics.duplex_session(session)


async def _converse(
    socket: WebSocket, engine: DuplexEngine, session: LiveSession, params: proto.DuplexParams
) -> None:
    decoder, encoder = make_codec(params.encoding)
    await socket.send_bytes(proto.HANDSHAKE)
    info = proto.SessionInfo(
        session_id=session.id,
        model=session.voicing.model,
        speaker=session.voicing.speaker,
        encoding=params.encoding,
    )
    await socket.send_bytes(proto.metadata_message(info))
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(_send_loop, socket, session, encoder, tasks.cancel_scope)
        await _receive_loop(socket, engine, session, decoder)
        tasks.cancel_scope.cancel()


async def _receive_loop(
    socket: WebSocket, engine: DuplexEngine, session: LiveSession, decoder: Any
) -> None:
    while True:
        try:
            event = await socket.receive()
        except WebSocketDisconnect:
            return
        if event["type"] == "websocket.disconnect":
            return
        data = event.get("bytes")
        if data is None:
            data = event.get("text") or ""
        try:
            kind, payload = proto.parse(data)
            if kind is proto.Kind.AUDIO:
                frames = decoder.feed(payload)
                if frames:
                    engine.feed(session, frames)
            elif kind is proto.Kind.PING:
                session.out.put_nowait(proto.PONG)
            else:
                await _control(engine, session, proto.Control(payload[0]))
        except proto.MalformedMessage as exc:
            session.out.put_nowait(proto.error_message(str(exc)))


async def _control(engine: DuplexEngine, session: LiveSession, control: proto.Control) -> None:
    if control is proto.Control.PAUSE:
        session.paused = True
    elif control is proto.Control.START:
        session.paused = False
    elif control is proto.Control.RESTART:
        await engine.restart(session)
        session.out.put_nowait(proto.HANDSHAKE)
    # END_TURN: a full-duplex model takes turns by itself; nothing to do.


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
