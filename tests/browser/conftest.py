"""The console in a real headless Chromium (Debian's, driven by Playwright) against a real
`serve --demo` process. Every test's page is screenshotted into tests/browser/artifacts/ and
must log no console error and throw no page error (an HTTP error the test provokes on purpose
is declared with `page_errors.expect_status(...)`)."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from playwright.sync_api import Browser, ConsoleMessage, Page, Playwright, sync_playwright

from server.auth import KeyStore
from tests.service_helpers import server_process

ARTIFACTS = Path(__file__).parent / "artifacts"
# Chromium reports a non-2xx fetch as a console error of this shape.
HTTP_ERROR = re.compile(r"Failed to load resource: the server responded with a status of (\d+)")


@dataclass(frozen=True)
class DemoServer:
    url: str
    data_dir: Path


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoServer]:
    """A `serve --demo` process (tiny Qwen3-TTS, CSM and PersonaPlex, demo voices), no keys."""
    data = tmp_path_factory.mktemp("console-demo") / "data"
    with server_process({"data_dir": str(data), "demo": True}, timeout=600) as url:
        yield DemoServer(url, data)


@pytest.fixture(scope="session")
def demo_url(demo_server: DemoServer) -> str:
    return demo_server.url


@pytest.fixture(scope="session")
def microphone_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What Chromium's fake microphone plays: 3 s of a voiced, pitch-gliding tone at 48 kHz."""
    rate = 48_000
    t = np.arange(3 * rate) / rate
    pitch = 140 + 60 * np.sin(2 * np.pi * 0.5 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    audio = sum(np.sin(k * phase) / k for k in range(1, 6)) * 0.25
    path = tmp_path_factory.mktemp("mic") / "mic.wav"
    sf.write(path, audio.astype(np.float32), rate, subtype="PCM_16")
    return path


@pytest.fixture(scope="session")
def playwright_session() -> Iterator[Playwright]:
    with sync_playwright() as pw:
        yield pw


@pytest.fixture(scope="session")
def browser(playwright_session: Playwright, microphone_wav: Path) -> Iterator[Browser]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "the browser tests need Debian's chromium: bash deploy/install-browser.sh"
    browser = playwright_session.chromium.launch(
        executable_path=chromium,
        headless=True,
        args=[
            "--no-sandbox",
            # No network beyond loopback here: keep Chromium from calling home (each refused
            # connection would otherwise be noise, and a slow start).
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={microphone_wav}",
            "--autoplay-policy=no-user-gesture-required",
        ],
    )
    yield browser
    browser.close()


@dataclass
class PageErrors:
    """Console errors and uncaught exceptions seen in a page."""

    errors: list[str] = field(default_factory=list)
    expected_statuses: set[int] = field(default_factory=set)

    def expect_status(self, *statuses: int) -> None:
        """HTTP answers the test provokes on purpose: their console lines are not errors."""
        self.expected_statuses.update(statuses)

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type != "error":
            return
        http = HTTP_ERROR.search(message.text)
        if http and int(http.group(1)) in self.expected_statuses:
            return
        self.errors.append(f"console: {message.text} ({message.location})")

    def unexpected(self) -> list[str]:
        return list(self.errors)


@pytest.fixture
def page_errors() -> PageErrors:
    return PageErrors()


@pytest.fixture
def page(
    browser: Browser, demo_url: str, page_errors: PageErrors, request: pytest.FixtureRequest
) -> Iterator[Page]:
    """A fresh browser context on the demo server, checked as `checked_page` says."""
    yield from checked_page(browser, demo_url, page_errors, _artifact_name(request))


def _artifact_name(request: pytest.FixtureRequest) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)


def open_page(page: Page, name: str) -> None:
    """Go to a console page and wait until its module has rendered."""
    page.goto(f"/#/{name}")
    page.wait_for_selector(f'#view[data-page="{name}"][data-ready="1"]')


# --- a server with API keys, and pages on servers other than the demo (shell / conversation) ---
@dataclass(frozen=True)
class KeyedServer:
    """A `serve --demo` process with API keys on, and the secrets of its keys."""

    url: str
    admin_key: str
    speak_key: str


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@pytest.fixture(scope="session")
def keyed_demo(
    tmp_path_factory: pytest.TempPathFactory, demo_server: DemoServer
) -> Iterator[KeyedServer]:
    """A second `serve --demo` process, with API keys configured: an admin and a speak key
    (written by the same KeyStore machinery as `voicefoundry keys create`). It starts from the
    first demo's built models and demo package (linked), so only its voices are imported."""
    data = tmp_path_factory.mktemp("console-keyed")
    built = demo_server.data_dir
    for part in ("models", "demo"):
        if (built / part).is_dir():
            shutil.copytree(built / part, data / "data" / part, copy_function=_link_or_copy)
    store = KeyStore()
    admin, _ = store.add("admin", "console-admin")
    speak, _ = store.add("speak", "console-speak")
    keys = data / "keys.json"
    store.save(keys)
    settings = {"data_dir": str(data / "data"), "demo": True, "api_keys_file": str(keys)}
    with server_process(settings, timeout=600) as url:
        yield KeyedServer(url=url, admin_key=admin, speak_key=speak)


def checked_page(
    browser: Browser, base_url: str, page_errors: PageErrors, name: str
) -> Iterator[Page]:
    """A fresh browser context on any server (a fixture's body: `yield from` it): microphone
    allowed, screenshotted into artifacts/<name>.png at the end, and failing on
    console errors and page errors."""
    context = browser.new_context(base_url=base_url, permissions=["microphone"])
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.on("console", page_errors.on_console)
    page.on("pageerror", lambda exc: page_errors.errors.append(f"pageerror: {exc}"))
    yield page
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    finally:
        context.close()
    assert page_errors.unexpected() == [], "the page logged errors"


@pytest.fixture
def keyed_page(
    browser: Browser,
    keyed_demo: KeyedServer,
    page_errors: PageErrors,
    request: pytest.FixtureRequest,
) -> Iterator[Page]:
    """A fresh page on the keyed server (no key entered yet), checked like `page`."""
    yield from checked_page(browser, keyed_demo.url, page_errors, _artifact_name(request))
