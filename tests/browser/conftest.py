"""The console in a real headless Chromium (Debian's, driven by Playwright) against a real
`serve --demo` process. Every test's page is screenshotted into tests/browser/artifacts/ and
must log no console error and throw no page error (an HTTP error the test provokes on purpose
is declared with `page_errors.expect_status(...)`)."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from playwright.sync_api import Browser, ConsoleMessage, Page, Playwright, sync_playwright

from tests.service_helpers import server_process

ARTIFACTS = Path(__file__).parent / "artifacts"
# Chromium reports a non-2xx fetch as a console error of this shape.
HTTP_ERROR = re.compile(r"Failed to load resource: the server responded with a status of (\d+)")


@pytest.fixture(scope="session")
def demo_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A `serve --demo` process (tiny Qwen3-TTS, CSM and PersonaPlex, demo voices), no keys."""
    data = tmp_path_factory.mktemp("console-demo")
    with server_process({"data_dir": str(data), "demo": True}, timeout=600) as url:
        yield url


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
    """A fresh browser context on the demo server, microphone allowed; screenshotted at the end
    and checked for console errors."""
    context = browser.new_context(base_url=demo_url, permissions=["microphone"])
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.on("console", page_errors.on_console)
    page.on("pageerror", lambda exc: page_errors.errors.append(f"pageerror: {exc}"))
    yield page
    ARTIFACTS.mkdir(exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    try:
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    finally:
        context.close()
    assert page_errors.unexpected() == [], "the page logged errors"


def open_page(page: Page, name: str) -> None:
    """Go to a console page and wait until its module has rendered."""
    page.goto(f"/#/{name}")
    page.wait_for_selector(f'#view[data-page="{name}"][data-ready="1"]')
