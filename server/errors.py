"""Domain errors and their ONE mapping to RFC 9457 problem+json responses."""

from __future__ import annotations

from typing import Any

from finetune.families.csm.generate import GenerationError
from finetune.lora import AdapterError

from litestar import Request, Response
from litestar.exceptions import HTTPException, NotAuthorizedException, PermissionDeniedException
from litestar.exceptions import ValidationException as LitestarValidation

from server.auth import Forbidden, Unauthorized
from server.registry import InvalidVoiceName, SlotInUse, VoiceExists, VoiceNotFound

PROBLEM_JSON = "application/problem+json"


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


def problem(status: int, title: str, detail: str, **extra: Any) -> Response[dict[str, Any]]:
    headers = {}
    if "retry_after" in extra:
        headers["Retry-After"] = str(extra.pop("retry_after"))
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return Response(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _domain(exc: Exception) -> ServiceError | None:
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, VoiceNotFound):
        return NotFound(str(exc))
    if isinstance(exc, VoiceExists | SlotInUse):
        return Conflict(str(exc))
    if isinstance(exc, InvalidVoiceName):
        return Unprocessable(str(exc))
    if isinstance(exc, AdapterError):
        return Unprocessable(str(exc), problems=exc.problems)
    if isinstance(exc, GenerationError):  # e.g. prompt + max_tokens beyond the model's window
        return Unprocessable(str(exc))
    return None


def exception_handler(request: Request, exc: Exception) -> Response[dict[str, Any]]:
    del request
    domain = _domain(exc)
    if domain is not None:
        extra = dict(domain.extra)
        if isinstance(domain, Overloaded):
            extra["retry_after"] = domain.retry_after
        return problem(domain.status, domain.title, domain.detail, **extra)
    if isinstance(exc, Unauthorized | NotAuthorizedException):
        return problem(401, "Unauthorized", str(exc) or "an API key is required")
    if isinstance(exc, Forbidden | PermissionDeniedException):
        return problem(403, "Forbidden", str(exc) or "this API key lacks the needed scope")
    if isinstance(exc, LitestarValidation):
        return _validation_problem(exc)
    if isinstance(exc, HTTPException):
        return problem(exc.status_code, exc.__class__.__name__, str(exc.detail))
    return problem(500, "Internal error", f"{type(exc).__name__}: {exc}")


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
