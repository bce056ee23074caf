"""The console's shell (index.html, app.js, api.js, ui.js) in a real Chromium: served at `/`
with its CSP, every page reached from the nav by keyboard and rendered without console errors,
every control labelled (Playwright's accessible-name computation), and the API key: asked for
in words when the server has keys and none is entered, kept in localStorage once entered, a
wrong one refused in words."""

from __future__ import annotations

import re

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import KeyedServer, PageErrors, open_page

# The nav's pages, in its order (index.html); "job" (#/job/ID) is reached from the jobs.
PAGES = ["voices", "playground", "clone", "finetune", "jobs", "conversation"]
KEY_STORE = "voicefoundry.apiKey"  # api.js


def test_root_serves_the_console_with_its_csp(demo_url: str) -> None:
    index = httpx.get(f"{demo_url}/", timeout=10)
    assert index.status_code == 200
    assert index.headers["content-type"].startswith("text/html")
    csp = index.headers["content-security-policy"]
    for directive in ("default-src 'self'", "script-src 'self'", "style-src 'self'"):
        assert directive in csp
    assert "unsafe-inline" not in csp and "http" not in csp, "nothing from elsewhere, no inline"
    assert index.headers["x-content-type-options"] == "nosniff"
    # No inline script or style in the markup (the CSP would block it).
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", index.text)
    assert " style=" not in index.text
    # Every page module of the nav and the shell's own files ship, with the same headers.
    for path in ["app.js", "api.js", "ui.js", "audio.js", "style.css"] + [
        f"pages/{name}.js" for name in PAGES
    ]:
        served = httpx.get(f"{demo_url}/console/{path}", timeout=10)
        assert served.status_code == 200, path
        assert served.headers["content-security-policy"] == csp, path
        if path.endswith(".js"):  # module scripts load only with a JavaScript type
            assert "javascript" in served.headers["content-type"], path


def test_the_nav_reaches_every_page_by_keyboard(page: Page) -> None:
    page.goto("/")
    page.wait_for_selector('#view[data-page="voices"][data-ready="1"]')
    page.keyboard.press("Tab")
    expect(page.locator(":focus")).to_have_text("Skip to content")
    for name in PAGES:
        for _ in range(40):
            if page.evaluate("document.activeElement?.dataset?.page") == name:
                break
            page.keyboard.press("Tab")
        else:
            pytest.fail(f"Tab never reached the nav link of {name}")
        page.keyboard.press("Enter")
        page.wait_for_selector(f'#view[data-page="{name}"][data-ready="1"]')
        assert page.url.endswith(f"#/{name}")
        link = page.locator(f'#nav a[data-page="{name}"]')
        expect(link).to_have_attribute("aria-current", "page")
        expect(page.locator('#nav a[aria-current="page"]')).to_have_count(1)
        expect(page.locator("#view h2")).not_to_have_count(0)  # the page said what it is
        expect(page.locator("#problem")).to_be_hidden()  # and nothing went wrong


def unlabelled_controls(page: Page) -> list[str]:
    """The visible inputs, selects, textareas and buttons whose accessible name (as Playwright
    computes it: labels, aria-label(ledby), a button's text) is empty."""
    missing = []
    controls = page.locator("input:not([type=hidden]), select, textarea, button")
    for i in range(controls.count()):
        control = controls.nth(i)
        if not control.is_visible():
            continue
        try:
            expect(control).to_have_accessible_name(re.compile(r"\S"), timeout=500)
        except AssertionError:
            missing.append(control.evaluate("e => e.outerHTML.slice(0, 160)"))
    return missing


def test_every_control_on_every_page_has_a_label(page: Page) -> None:
    found = {}
    for name in PAGES:
        open_page(page, name)
        missing = unlabelled_controls(page)
        if missing:
            found[name] = missing
    assert found == {}, f"controls without an accessible name: {found}"


def test_with_keys_on_the_console_asks_for_a_key_keeps_it_and_refuses_a_wrong_one(
    keyed_page: Page, keyed_demo: KeyedServer, page_errors: PageErrors
) -> None:
    page = keyed_page
    page_errors.expect_status(401)  # the key-less and the wrong-key calls, on purpose
    listed = httpx.get(
        f"{keyed_demo.url}/voices",
        headers={"Authorization": f"Bearer {keyed_demo.admin_key}"},
        timeout=10,
    ).json()["voices"]
    names = [v["name"] for v in listed]
    assert {"demo-baked", "demo-duplex"} <= set(names)

    open_page(page, "voices")
    expect(page.locator("#problem-text")).to_contain_text("This needs an API key")
    expect(page.locator("#key-state")).to_have_text("no key")
    assert page.evaluate(f"localStorage.getItem('{KEY_STORE}')") is None

    page.fill("#api-key", keyed_demo.admin_key)
    page.press("#api-key", "Enter")  # the header form submits: saved, the page shown again
    page.wait_for_selector('#view[data-page="voices"][data-ready="1"]')
    expect(page.locator("#key-state")).to_have_text("key saved")
    expect(page.locator("#problem")).to_be_hidden()
    for name in ("demo-baked", "demo-duplex"):
        expect(page.locator("#view")).to_contain_text(name)
    assert page.evaluate(f"localStorage.getItem('{KEY_STORE}')") == keyed_demo.admin_key

    # Kept in the browser: a new visit uses it without asking.
    page.reload()
    page.wait_for_selector('#view[data-page="voices"][data-ready="1"]')
    expect(page.locator("#api-key")).to_have_value(keyed_demo.admin_key)
    expect(page.locator("#view")).to_contain_text("demo-duplex")
    expect(page.locator("#problem")).to_be_hidden()

    page.fill("#api-key", "vf_nosuchkey_0123456789abcdef0123456789abcdef")
    page.click("#key-form button[type=submit]")
    page.wait_for_selector('#view[data-page="voices"][data-ready="1"]')
    expect(page.locator("#problem-text")).to_contain_text("The API key was refused")

    page.click("#key-forget")
    page.wait_for_selector('#view[data-page="voices"][data-ready="1"]')
    assert page.evaluate(f"localStorage.getItem('{KEY_STORE}')") is None
    expect(page.locator("#problem-text")).to_contain_text("This needs an API key")
