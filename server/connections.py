"""What one connection may hold: request bodies read within a time limit (slowloris), and a
bounded number of uploads at once.

- `body_limits` (app-wide ASGI middleware): a request body whose next bytes take longer than
  `body_read_timeout_s`, or which is not all in after `body_total_timeout_s`, is answered 408
  (problem+json) and its connection closed; the handler's cleanup (partial files) runs as for
  any error. A response sent before its request body was read whole also closes the connection.
- `upload_slot` (a dependency of the upload routes, resolved after their guards): at most
  `max_concurrent_uploads` run at once, the others get 503 + Retry-After; the slot is given back
  however the request ends (done, refused, client gone).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from typing import Any

import anyio
from litestar import Request
from litestar.di import NamedDependency, Provide
from litestar.types import ASGIApp, Message, Receive, ReceiveMessage, Scope, Send

from server.errors import Overloaded, ServiceError
from server.settings import Settings

UPLOAD_RETRY_AFTER_S = 5


class RequestTimeout(ServiceError):
    status, title = 408, "Request timeout"


class ClientGone(ServiceError):
    """The client closed its connection before its whole body came: an ordinary 4xx for the
    handler's cleanup (no one reads the answer), never logged as an internal error."""

    status, title = 400, "Client closed request"


class _TimedBody:
    """`receive` for one request, timed while its body is still coming."""

    def __init__(self, receive: Receive, scope: Scope, settings: Settings) -> None:
        self._receive = receive
        self.read_timeout = settings.body_read_timeout_s
        self.deadline = time.monotonic() + settings.body_total_timeout_s
        self.total_s = settings.body_total_timeout_s
        self.complete = not _has_body(scope)

    async def receive(self) -> ReceiveMessage:
        if self.complete:  # e.g. waiting for a disconnect while a response streams
            return await self._receive()
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self._total_timeout()
        try:
            with anyio.fail_after(min(self.read_timeout, left)):
                message = await self._receive()
        except TimeoutError:
            if self.read_timeout < left:
                raise RequestTimeout(
                    f"no request body bytes for {self.read_timeout:g} s "
                    "(the server's body_read_timeout_s)"
                ) from None
            raise self._total_timeout() from None
        if message["type"] == "http.disconnect":
            self.complete = True
            raise ClientGone("the connection closed before the whole request body came")
        if not message.get("more_body", False):
            self.complete = True
        return message

    def _total_timeout(self) -> RequestTimeout:
        return RequestTimeout(
            f"the request body took longer than {self.total_s:g} s "
            "(the server's body_total_timeout_s)"
        )


def _has_body(scope: Scope) -> bool:
    headers = dict(scope.get("headers", []))
    length = headers.get(b"content-length")
    if length is not None:
        return length.strip() != b"0"
    return b"transfer-encoding" in headers


def body_limits(app: ASGIApp) -> ASGIApp:
    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        body = _TimedBody(receive, scope, scope["app"].state.settings)

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and not body.complete:
                # The rest of the body is never read: the connection cannot carry a next request.
                headers = [*message.get("headers", []), (b"connection", b"close")]
                message = {**message, "headers": headers}
            await send(message)

        await app(scope, body.receive, send_closing)

    return middleware


class UploadGate:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def acquire(self) -> None:
        if self.active >= self.limit:
            raise Overloaded(
                f"{self.active} uploads are in progress (the server's max_concurrent_uploads); "
                "retry shortly",
                retry_after=UPLOAD_RETRY_AFTER_S,
            )
        self.active += 1

    def release(self) -> None:
        self.active -= 1


def upload_gate(state: Any) -> UploadGate:
    gate = getattr(state, "upload_gate", None)
    if gate is None:  # one per app, made on first use (no await in between: no race)
        gate = UploadGate(state.settings.max_concurrent_uploads)
        state.upload_gate = gate
    return gate


async def _upload_slot(request: Request) -> AsyncGenerator[None, None]:
    gate = upload_gate(request.app.state)
    gate.acquire()
    try:
        yield
    finally:
        gate.release()


# `dependencies=UPLOAD_SLOT` on an upload route, and a parameter `upload_slot: UploadSlot`.
UPLOAD_SLOT = {"upload_slot": Provide(_upload_slot)}
UploadSlot = NamedDependency[None]
