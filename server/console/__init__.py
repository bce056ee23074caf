"""The web console: plain ES modules and CSS served by the same app at `/`.

Everything it needs ships in `static/` (no CDN, no build step), so `serve --demo` works offline.
Pages talk to the public API only, with the key a person entered (kept in localStorage).
"""

from __future__ import annotations

from pathlib import Path

from litestar import Response, get
from litestar.response.base import ASGIResponse
from litestar.router import Router
from litestar.static_files import create_static_files_router
from litestar.types import ASGIApp, ControllerRouterHandler

STATIC_DIR = Path(__file__).parent / "static"
PREFIX = "/console"

# Pages load only our own files; audio may come from blob: URLs made in the page.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; "
        "connect-src 'self' ws: wss:; style-src 'self'; script-src 'self'; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@get("/", include_in_schema=False, media_type="text/html")
async def console_index() -> Response[bytes]:
    return Response((STATIC_DIR / "index.html").read_bytes(), headers=SECURITY_HEADERS)


async def _with_security_headers(response: ASGIApp) -> ASGIApp:
    if isinstance(response, ASGIResponse):  # a file the router found (errors go their own way)
        for name, value in SECURITY_HEADERS.items():
            response.headers[name] = value
    return response


def routes() -> list[ControllerRouterHandler]:
    """The console's route handlers: the page at `/`, its files under `/console/`."""
    files: Router = create_static_files_router(
        path=PREFIX,
        directories=[STATIC_DIR],
        include_in_schema=False,
        name="console",
        after_request=_with_security_headers,
    )
    return [console_index, files]
