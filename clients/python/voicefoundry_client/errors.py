"""Typed exceptions: every server error is RFC 9457 problem+json, mapped here by its status."""

from __future__ import annotations

import http
import json
from collections.abc import Mapping
from typing import Any

from voicefoundry_client._retry import parse_retry_after


class VoicefoundryError(Exception):
    """Base class of every error the SDK raises.

    `status` is the HTTP status (None when no response came back), `title` and `detail` come from
    the problem+json body, `problem` is that body as a dict (with any extra members the server
    added, e.g. `errors` or `problems`).
    """

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        title: str | None = None,
        problem: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title or _phrase(status)
        self.detail = detail
        self.problem: dict[str, Any] = dict(problem or {})
        self.headers: dict[str, str] = dict(headers or {})

    def __str__(self) -> str:
        if self.status is None:
            return self.detail
        return f"{self.status} {_phrase(self.status) or self.title}: {self.detail}"


class APIConnectionError(VoicefoundryError):
    """The request never got an answer: connection refused, reset, or a protocol error."""


class APITimeoutError(APIConnectionError):
    """The server did not answer within the timeout."""


class InvalidResponse(VoicefoundryError):
    """The server answered 2xx with a body the SDK cannot read."""


class BadRequest(VoicefoundryError):
    """400: the request body could not be read (e.g. malformed JSON)."""


class Unauthorized(VoicefoundryError):
    """401: no API key, or one the server does not know."""


class Forbidden(VoicefoundryError):
    """403: a valid API key without the scope the operation needs."""


class NotFound(VoicefoundryError):
    """404: unknown speaker, voice or job."""


class Conflict(VoicefoundryError):
    """409: the name is taken, or the job is already finished."""


class PayloadTooLarge(VoicefoundryError):
    """413: text or upload over the server's limit."""


class Validation(VoicefoundryError):
    """422: the request was read but a value is not acceptable (the detail says which)."""


class _RetryAfterMixin:
    headers: dict[str, str]

    @property
    def retry_after(self) -> float | None:
        """Seconds the server asked to wait (from `Retry-After`), or None."""
        return parse_retry_after(_header(self.headers, "retry-after"))


class RateLimited(_RetryAfterMixin, VoicefoundryError):
    """429: too many requests; `retry_after` says how long to wait."""


class ServerError(VoicefoundryError):
    """5xx: the server failed."""


class ServiceUnavailable(_RetryAfterMixin, ServerError):
    """503: overloaded (full queue, no duplex slot) or not ready yet."""


class JobFailed(VoicefoundryError):
    """A fine-tune job ended failed or cancelled; `job` is its final record."""

    def __init__(self, job: Any) -> None:
        reason = getattr(job, "reason", None) or getattr(job, "note", None) or "no reason given"
        super().__init__(f"job {job.id} {job.state}: {reason}")
        self.job = job
        self.reason: str = reason


class WaitTimeout(VoicefoundryError, TimeoutError):
    """`jobs.wait(..., timeout=...)` ran out before the job finished; `job` is its last record."""

    def __init__(self, job: Any, timeout: float) -> None:
        super().__init__(f"job {job.id} still {job.state} after {timeout:g} s")
        self.job = job


class DuplexClosed(VoicefoundryError):
    """A duplex session closed with a code that maps to no more specific error."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"duplex session closed ({code}): {reason or 'no reason given'}")
        self.code = code
        self.reason = reason


BY_STATUS: dict[int, type[VoicefoundryError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: Validation,
    429: RateLimited,
    503: ServiceUnavailable,
}

# WebSocket close codes of the duplex route, mapped onto the same classes.
BY_CLOSE_CODE: dict[int, tuple[type[VoicefoundryError], int]] = {
    1008: (BadRequest, 400),
    1011: (ServerError, 500),
    1013: (ServiceUnavailable, 503),
    4400: (BadRequest, 400),
    4401: (Unauthorized, 401),
    4403: (Forbidden, 403),
    4404: (NotFound, 404),
    4409: (Conflict, 409),
    4413: (PayloadTooLarge, 413),
    4422: (Validation, 422),
    4429: (RateLimited, 429),
}


def error_class(status: int) -> type[VoicefoundryError]:
    if status in BY_STATUS:
        return BY_STATUS[status]
    return ServerError if status >= 500 else VoicefoundryError


def error_from_problem(
    status: int, body: bytes, headers: Mapping[str, str] | None = None
) -> VoicefoundryError:
    """The typed error for an HTTP error response; a non-JSON body still maps by status."""
    problem: dict[str, Any] = {}
    try:
        decoded = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        decoded = None
    if isinstance(decoded, dict):
        problem = decoded
    detail = problem.get("detail")
    if not isinstance(detail, str) or not detail:
        text = body.decode("utf-8", "replace").strip() if body else ""
        detail = text[:500] if text and not problem else (_phrase(status) or f"HTTP {status}")
    title = problem.get("title") if isinstance(problem.get("title"), str) else None
    return error_class(status)(detail, status=status, title=title, problem=problem, headers=headers)


def error_from_close(code: int, reason: str) -> VoicefoundryError:
    """The typed error for a duplex WebSocket closed with `code`."""
    if code in BY_CLOSE_CODE:
        kind, status = BY_CLOSE_CODE[code]
        detail = reason or _phrase(status) or f"closed with {code}"
        problem = {"status": status, "detail": detail, "close_code": code}
        return kind(detail, status=status, problem=problem)
    return DuplexClosed(code, reason)


def _phrase(status: int | None) -> str | None:
    if status is None:
        return None
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return None


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None
