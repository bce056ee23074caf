"""Domain errors and their ONE mapping to RFC 9457 problem+json responses."""

from __future__ import annotations

import logging
import re
import uuid
from http import HTTPStatus
from pathlib import Path
from typing import Any

from finetune.families.csm.generate import GenerationError
from finetune.lora import AdapterError

from litestar import Request, Response
from litestar.exceptions import HTTPException, NotAuthorizedException, PermissionDeniedException
from litestar.exceptions import ValidationException as LitestarValidation

from server.artifacts import Artifacts
from server.auth import Forbidden, Unauthorized
from server.limits import LimitExceeded
from server.registry import InvalidVoiceName, SlotInUse, VoiceExists, VoiceNotFound

PROBLEM_JSON = "application/problem+json"

log = logging.getLogger("voicefoundry.errors")

# An absolute filesystem path inside a message (after a space, quote, bracket or at the start).
_ABSOLUTE_PATH_RE = re.compile(r"(?:^|(?<=[\s'\"(\[=]))/[^\s'\"()\[\],;]+")


class ServiceError(Exception):
    status = 500
    title = "Internal error"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class BadRequest(ServiceError):
    status, title = 400, "Bad request"


class NotFound(ServiceError):
    status, title = 404, "Not found"


class Conflict(ServiceError):
    status, title = 409, "Conflict"


class PayloadTooLarge(ServiceError):
    status, title = 413, "Payload too large"


class Unprocessable(ServiceError):
    status, title = 422, "Unprocessable request"


class Overloaded(ServiceError):
    status, title = 503, "Overloaded"

    def __init__(self, detail: str, retry_after: int = 1) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class NotReady(ServiceError):
    status, title = 503, "Not ready"


class TooManyRequests(ServiceError):
    """An API key over one of its limits (server/limits.py): 429 with Retry-After."""

    status, title = 429, "Too many requests"

    def __init__(self, detail: str, retry_after: int, **extra: Any) -> None:
        super().__init__(detail, **extra)
        self.retry_after = retry_after


def problem(status: int, title: str, detail: str, **extra: Any) -> Response[dict[str, Any]]:
    headers = {}
    if "retry_after" in extra:
        headers["Retry-After"] = str(extra.pop("retry_after"))
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return Response(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def html_errors_as_problems(response: Response) -> Response:
    """An `after_request` hook for routers whose handlers Litestar writes (the OpenAPI router
    answers an unknown `/schema/...` page with an HTML 404): their errors become problem+json."""
    media_type = str(getattr(response.media_type, "value", response.media_type) or "")
    code = response.status_code or 200
    if code >= 400 and media_type.startswith("text/html"):
        status = HTTPStatus(code)
        return problem(int(status), status.phrase, "no such documentation page under /schema")
    return response


def public_text(text: str) -> str:
    """`text` with every absolute server path replaced by ``<path>``: what clients may read."""
    return _ABSOLUTE_PATH_RE.sub("<path>", text)


def public_adapter_error(exc: AdapterError, voices_dir: Path | None = None) -> AdapterError:
    """`exc` naming its adapter as its package does (the folder under the voice's or staged
    package's folder), never by the server's path; what remains of paths is ``<path>``."""
    path = Path(exc.path)
    if path.is_absolute():
        parts = path.parts[-1:]
        if voices_dir is not None and path.is_relative_to(voices_dir):
            parts = path.relative_to(voices_dir).parts[1:] or parts  # <voice or staging>/...
        exc = exc.renamed(f"package {'/'.join(parts)!r}")
    return AdapterError(public_text(exc.path), [public_text(p) for p in exc.problems])


def _domain(exc: Exception, voices_dir: Path | None = None) -> ServiceError | None:
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, VoiceNotFound):
        return NotFound(str(exc))
    if isinstance(exc, VoiceExists | SlotInUse):
        return Conflict(str(exc))
    if isinstance(exc, InvalidVoiceName):
        return Unprocessable(str(exc))
    if isinstance(exc, AdapterError):
        public = public_adapter_error(exc, voices_dir)
        return Unprocessable(str(public), problems=public.problems)
    if isinstance(exc, GenerationError):  # e.g. prompt + max_tokens beyond the model's window
        return Unprocessable(str(exc))
    if isinstance(exc, LimitExceeded):
        return TooManyRequests(exc.detail, exc.retry_after, limit=exc.limit)
    return None


def exception_handler(request: Request, exc: Exception) -> Response[dict[str, Any]]:
    domain = _domain(exc, _voices_dir(request))
    if domain is not None:
        extra = dict(domain.extra)
        if isinstance(domain, Overloaded | TooManyRequests):
            extra["retry_after"] = domain.retry_after
        return problem(domain.status, domain.title, domain.detail, **extra)
    if isinstance(exc, Unauthorized | NotAuthorizedException):
        return problem(401, "Unauthorized", str(exc) or "an API key is required")
    if isinstance(exc, Forbidden | PermissionDeniedException):
        return problem(403, "Forbidden", str(exc) or "this API key lacks the needed scope")
    if isinstance(exc, LitestarValidation):
        return _validation_problem(exc)
    if isinstance(exc, HTTPException) and exc.status_code < 500:
        return problem(exc.status_code, exc.__class__.__name__, str(exc.detail))
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    return _internal_error(request, exc, status)


def _internal_error(request: Request, exc: Exception, status: int) -> Response[dict[str, Any]]:
    """A failure nobody expected: the client gets an id and nothing of the exception (it may
    name server paths); the log gets the traceback under that id."""
    error_id = uuid.uuid4().hex[:12]
    method = request.scope.get("method", "WEBSOCKET")
    # The path only: the query string may carry an API key.
    log.error("internal error %s on %s %s", error_id, method, request.url.path, exc_info=exc)
    detail = f"internal error {error_id}: the server log has the details under this id"
    return problem(status, "Internal error", detail, error_id=error_id)


def _voices_dir(request: Request) -> Path | None:
    settings = getattr(request.app.state, "settings", None)
    return Artifacts.of(settings).voices if settings is not None else None


def _validation_problem(exc: LitestarValidation) -> Response[dict[str, Any]]:
    detail = str(exc.detail)
    errors = exc.extra if isinstance(exc.extra, list) else []
    message = (
        "; ".join(str(e.get("message", e)) if isinstance(e, dict) else str(e) for e in errors)
        or detail
    )
    if "malformed" in message.lower() or "JSON is malformed" in message or "decode" in detail:
        return problem(400, "Malformed request body", message)
    return problem(422, "Invalid request", message, errors=errors)
