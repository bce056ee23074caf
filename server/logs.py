"""What the server logs: its own loggers beside uvicorn's, and never a secret: the `api_key`
query parameter (how browsers authenticate on /duplex) is written as ``api_key=***`` in every
request line."""

from __future__ import annotations

import copy
import logging
import re
from typing import Any
from urllib.parse import unquote_plus

SECRET_PARAMS = frozenset({"api_key", "worker_auth_id", "email"})
# Loggers that write request lines: uvicorn's access log (HTTP) and its error log (WebSocket
# "accepted" / "403" lines carry the path with its query string too).
REQUEST_LOGGERS = ("uvicorn.access", "uvicorn.error")

_PARAM_RE = re.compile(r"([?&])([^=&#\s\"']+)=([^&#\s\"']*)")


def redact(text: str) -> str:
    """`text` with the value of every secret query parameter replaced by ``***`` (the name is
    matched as the server decodes it: ``api%5Fkey`` is ``api_key``)."""

    def replace(match: re.Match[str]) -> str:
        sep, name, _ = match.groups()
        if unquote_plus(name) in SECRET_PARAMS:
            return f"{sep}{name}=***"
        return match.group(0)

    return _PARAM_RE.sub(replace, text) if "=" in text else text


class RedactSecrets(logging.Filter):
    """Rewrites a record's message and string arguments; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            args = record.args.items()
            record.args = {k: redact(v) if isinstance(v, str) else v for k, v in args}
        return True


def redact_request_logs() -> None:
    """Attach the filter to the loggers that write request lines (once; safe to call again)."""
    for name in REQUEST_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())


def serve_log_config() -> dict[str, Any]:
    """uvicorn's logging config plus the service's own loggers (``voicefoundry.*``: refusals,
    internal errors with their tracebacks) on the same stderr handler."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["voicefoundry"] = {
        "handlers": ["default"],
        "level": "INFO",
        "propagate": False,
    }
    return config
