"""The web console's files as the server serves them: from the package, under a strict CSP,
never from elsewhere (the demo runs offline). The console in a browser: tests/browser."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from server import console

STATIC = console.STATIC_DIR
TEXT_FILES = sorted(p for p in STATIC.rglob("*") if p.suffix in {".html", ".js", ".css"})


@pytest.fixture(scope="module")
def client():
    with TestClient(Litestar(route_handlers=console.routes())) as client:
        yield client


def test_index_is_served_at_the_root_with_a_strict_policy(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy
    assert "unsafe-inline" not in policy
    assert response.headers["x-content-type-options"] == "nosniff"


def test_every_file_the_pages_load_is_served(client: TestClient) -> None:
    index = (STATIC / "index.html").read_text()
    referenced = re.findall(r'(?:src|href)="(/console/[^"]+)"', index)
    assert referenced, "index.html loads nothing from /console/"
    for path in TEXT_FILES:
        referenced.append(f"{console.PREFIX}/{path.relative_to(STATIC).as_posix()}")
    for url in referenced:
        response = client.get(url)
        assert response.status_code == 200, url
        assert "content-security-policy" in response.headers, url
    modules = [p for p in TEXT_FILES if p.suffix == ".js"]
    for module in modules:
        assert (
            client.get(f"/console/{module.relative_to(STATIC).as_posix()}")
            .headers["content-type"]
            .startswith("text/javascript")
        ), module


def test_every_page_the_router_names_exists() -> None:
    app_js = (STATIC / "app.js").read_text()
    pages = re.search(r"const PAGES = \[([^\]]+)\]", app_js)
    assert pages
    names = re.findall(r'"([a-z]+)"', pages.group(1))
    assert names
    for name in names:
        page = STATIC / "pages" / f"{name}.js"
        assert page.is_file(), f"the router names page {name!r} but {page} is missing"
        assert "export async function render(" in page.read_text(), page


@pytest.mark.parametrize("path", TEXT_FILES, ids=lambda p: p.relative_to(STATIC).as_posix())
def test_nothing_is_fetched_from_elsewhere(path: Path) -> None:
    text = path.read_text()
    external = re.findall(r"""["'(]\s*((?:https?:)?//[^"')\s]+)""", text)
    assert external == [], f"{path.name} refers to other hosts: {external}"
    if path.suffix == ".html":
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", text), "inline script (CSP forbids)"
        assert " style=" not in text, "inline style attribute (CSP forbids)"


def test_the_console_is_not_in_the_api_schema() -> None:
    from server.app import create_app
    from server.settings import Settings

    app = create_app(Settings())
    assert "/" not in app.openapi_schema.paths
    assert not any(p.startswith(console.PREFIX) for p in app.openapi_schema.paths)
