"""The voices page in a real Chromium against `serve --demo`: it lists what GET /voices lists,
its filters narrow the list to exactly the voices of that kind / base model, Play streams a
sample into the page, and Delete (behind a confirm step) removes a voice or says why not."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
from playwright.sync_api import Page, expect

from tests.browser.conftest import PageErrors, open_page

DEMO = ("demo-baked", "demo-adapter", "demo-clone")


def voices(demo_url: str) -> list[dict]:
    return httpx.get(f"{demo_url}/voices", timeout=30).json()["voices"]


def shown(page: Page) -> list[str]:
    rows = page.locator("#voices-table tbody tr[data-voice]")
    return sorted(rows.evaluate_all("rows => rows.map(r => r.dataset.voice)"))


def expect_shown(page: Page, names: list[str]) -> None:
    expect(page.locator("#voices-table tbody tr[data-voice]")).to_have_count(len(names))
    assert shown(page) == sorted(names)


def test_voices_are_listed_and_filters_narrow_to_what_the_api_says(
    page: Page, demo_url: str
) -> None:
    listed = voices(demo_url)
    open_page(page, "voices")
    expect_shown(page, [v["name"] for v in listed])
    assert set(DEMO) <= set(shown(page))
    expect(page.locator("#voices-count")).to_have_text(
        f"{len(listed)} of {len(listed)} voices shown."
    )
    row = page.locator('tr[data-voice="demo-baked"]')
    baked = next(v for v in listed if v["name"] == "demo-baked")
    expect(row.locator("td").nth(0)).to_have_text(baked["kind"])
    expect(row.locator("td").nth(1)).to_have_text(baked["default_language"])
    expect(row.locator("td").nth(2)).to_have_text(baked["base_model"])
    expect(row.locator("a.use")).to_have_attribute("href", "#/playground?voice=demo-baked")
    # Similarity from a fine-tuned voice's quality report (the demo voices have none; voices
    # other tests fine-tuned on this server do).
    for voice in listed:
        cell = page.locator(f'tr[data-voice="{voice["name"]}"] td.similarity')
        similarity = voice["meta"].get("similarity")
        if isinstance(similarity, (int, float)):
            shown_value = float((cell.text_content() or "nan").split()[0])
            assert abs(shown_value - similarity) <= 0.0005 + 1e-9, (voice["name"], shown_value)
        elif voice["meta"].get("similarity_reason"):
            expect(cell).to_contain_text(voice["meta"]["similarity_reason"])
        else:
            expect(cell).to_have_text("–")

    # The filters' choices come from the data.
    kinds = sorted({v["kind"] for v in listed})
    models = sorted({v["base_model"] for v in listed})
    options = page.locator("#voices-kind option").evaluate_all("os => os.map(o => o.value)")
    assert options == ["", *kinds]
    options = page.locator("#voices-model option").evaluate_all("os => os.map(o => o.value)")
    assert options == ["", *models]

    for kind in kinds:
        page.select_option("#voices-kind", kind)
        expect_shown(page, [v["name"] for v in listed if v["kind"] == kind])
    page.select_option("#voices-kind", "")
    for model in models:
        page.select_option("#voices-model", model)
        expect_shown(page, [v["name"] for v in listed if v["base_model"] == model])

    # Both at once, then the search box (name or meta) on top.
    page.select_option("#voices-model", baked["base_model"])
    page.select_option("#voices-kind", baked["kind"])
    expect_shown(
        page,
        [
            v["name"]
            for v in listed
            if v["kind"] == baked["kind"] and v["base_model"] == baked["base_model"]
        ],
    )
    page.select_option("#voices-model", "")
    page.select_option("#voices-kind", "")
    page.fill("#voices-search", "x_vector")  # in demo-clone's meta, not in its name
    expect_shown(page, [v["name"] for v in listed if "x_vector" in str(v["meta"])])
    assert "demo-clone" in shown(page)
    page.fill("#voices-search", "no-such-voice-anywhere")
    expect_shown(page, [])
    expect(page.locator("#voices-table tbody")).to_contain_text("No voice matches.")


def test_play_streams_a_sample_into_the_page(page: Page) -> None:
    open_page(page, "voices")
    samples = page.locator("#voices-samples")
    expect(samples).to_have_text("0")
    page.locator('tr[data-voice="demo-baked"] button.play').click()
    page.wait_for_function(
        "() => Number(document.getElementById('voices-samples').textContent) > 0",
        timeout=120_000,
    )
    expect(page.locator("#voices-playing")).to_contain_text("demo-baked")
    # A duplex voice talks on the Conversation page: no Play here.
    expect(page.locator('tr[data-voice="demo-duplex"] button.play')).to_be_disabled()


def _clone(demo_url: str, name: str, clip: Path) -> None:
    created = httpx.post(
        f"{demo_url}/voices",
        data={"name": name, "strategy": "clone", "base_model": "qwen3-tiny"},
        files={"ref": ("ref.wav", clip.read_bytes(), "audio/wav")},
        timeout=120,
    )
    assert created.status_code == 201, created.text


def test_delete_asks_first_then_removes_the_voice_or_says_why_not(
    page: Page, demo_url: str, microphone_wav: Path, page_errors: PageErrors
) -> None:
    keep, stale = f"pw-del-{uuid.uuid4().hex[:6]}", f"pw-stale-{uuid.uuid4().hex[:6]}"
    _clone(demo_url, keep, microphone_wav)
    _clone(demo_url, stale, microphone_wav)
    open_page(page, "voices")
    page.fill("#voices-search", "pw-")
    row = page.locator(f'tr[data-voice="{keep}"]')

    # Delete asks first; "Keep" leaves it.
    row.locator("button.delete").click()
    expect(row).to_contain_text(f"Delete {keep}? This cannot be undone.")
    row.get_by_role("button", name=f"Keep {keep}").click()
    expect(row.locator("button.delete")).to_be_focused()
    assert keep in {v["name"] for v in voices(demo_url)}

    row.locator("button.delete").click()
    row.get_by_role("button", name=f"Yes, delete {keep}").click()
    expect(page.locator("#voices-status")).to_have_text(f"Deleted {keep}.")
    expect(row).to_have_count(0)
    assert keep not in {v["name"] for v in voices(demo_url)}

    # A voice deleted behind the page's back: the server's 404, in words.
    page_errors.expect_status(404)
    assert httpx.delete(f"{demo_url}/voices/{stale}", timeout=60).status_code == 200
    stale_row = page.locator(f'tr[data-voice="{stale}"]')
    stale_row.locator("button.delete").click()
    stale_row.get_by_role("button", name=f"Yes, delete {stale}").click()
    problem = page.locator("#problem-text")
    expect(problem).to_be_visible()
    detail = httpx.delete(f"{demo_url}/voices/{stale}", timeout=60).json()["detail"]
    expect(problem).to_have_text(detail)
    expect(stale_row).to_have_count(0)  # the list, asked again, no longer has it
