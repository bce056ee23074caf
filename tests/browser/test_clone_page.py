"""The clone page in a real Chromium against `serve --demo`: a clip uploaded through the page's
file input, or recorded from the (fake) microphone, becomes a voice the server lists, and that
voice speaks in the page; a bad upload shows the server's reason."""

from __future__ import annotations

import io
import re
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf
from playwright.sync_api import Page, expect

from tests.browser.conftest import PageErrors, open_page

RATE = 24_000


def voiced_clip(path: Path, seconds: float = 3.0) -> Path:
    """A voiced-like clip: a wavering tone with a little noise, 24 kHz mono WAV."""
    rng = np.random.default_rng(1)
    t = np.arange(int(seconds * RATE)) / RATE
    audio = 0.3 * np.sin(2 * np.pi * (140 + 20 * np.sin(3 * t)) * t)
    audio += 0.02 * rng.normal(size=t.size)
    buffer = io.BytesIO()
    sf.write(buffer, audio.astype(np.float32), RATE, format="WAV", subtype="PCM_16")
    path.write_bytes(buffer.getvalue())
    return path


def listed(demo_url: str, name: str) -> dict | None:
    voices = httpx.get(f"{demo_url}/voices", timeout=30).json()["voices"]
    return next((v for v in voices if v["name"] == name), None)


def clone_from_page(page: Page, name: str) -> None:
    page.fill("#clone-name", name)
    page.select_option("#clone-model", "qwen3-tiny")
    page.click("#clone-submit")
    expect(page.locator("#clone-voice")).to_have_text(name, timeout=60_000)


def test_an_uploaded_clip_becomes_a_voice_that_speaks(
    page: Page, demo_url: str, tmp_path: Path
) -> None:
    name = "browser-upload"
    assert listed(demo_url, name) is None
    open_page(page, "clone")
    page.set_input_files("#clone-file", str(voiced_clip(tmp_path / "me.wav")))
    expect(page.locator("#clone-clip")).to_contain_text("me.wav")
    page.fill("#clone-transcript", "Hello there, this is my voice.")
    clone_from_page(page, name)

    voice = listed(demo_url, name)
    assert voice is not None and voice["kind"] == "clone" and voice["base_model"] == "qwen3-tiny"
    link = page.locator("#clone-playground")
    expect(link).to_have_attribute("href", f"#/playground?voice={name}")

    # Speech streams in: decoded samples arrive while the model is still speaking (the tiny
    # demo model babbles; leaving the page stops it).
    page.fill("#clone-sentence", "Hi there.")
    page.click("#clone-speak")
    samples = page.locator("#clone-samples")
    expect(samples).to_have_text(re.compile(r"^[1-9][0-9]*$"), timeout=120_000)
    assert int(samples.inner_text()) > 0


def test_a_clip_recorded_from_the_microphone_becomes_a_voice(page: Page, demo_url: str) -> None:
    name = "browser-recorded"
    open_page(page, "clone")
    page.click("#clone-record")
    expect(page.locator("#clone-record")).to_have_text("Stop recording")
    # The clone needs 2-30 s: record a little over 2.5 s of the fake microphone's tone.
    expect(page.locator("#clone-rec-seconds")).to_have_text(re.compile(r"^(2\.[6-9]|[3-9])"))
    page.click("#clone-record")
    expect(page.locator("#clone-clip")).to_contain_text("recording.wav (recorded")
    seconds = float(page.locator("#clone-clip").get_attribute("data-seconds") or 0)
    assert seconds >= 2.0, seconds
    clone_from_page(page, name)
    voice = listed(demo_url, name)
    assert voice is not None and voice["kind"] == "clone"


def test_a_bad_upload_shows_the_servers_reason(
    page: Page, page_errors: PageErrors, demo_url: str, tmp_path: Path
) -> None:
    page_errors.expect_status(422)
    bad = tmp_path / "clip.wav"
    bad.write_text("this is not audio at all, only text pretending to be a clip\n" * 20)
    open_page(page, "clone")
    page.set_input_files("#clone-file", str(bad))
    expect(page.locator("#clone-clip")).to_contain_text("clip.wav")
    page.fill("#clone-name", "browser-bad")
    page.select_option("#clone-model", "qwen3-tiny")
    page.click("#clone-submit")
    problem = page.locator("#problem-text")
    expect(problem).to_be_visible(timeout=30_000)
    answer = httpx.post(
        f"{demo_url}/voices",
        data={"name": "browser-bad", "strategy": "clone", "base_model": "qwen3-tiny"},
        files=[("ref", ("clip.wav", bad.read_bytes(), "audio/wav"))],
        timeout=30,
    )
    assert answer.status_code == 422
    # The reason names the upload's temporary file, different each time: its first words.
    reason = answer.json()["detail"].split(" (")[0]
    assert reason.startswith("clip.wav: "), reason
    expect(problem).to_contain_text(reason)
    expect(page.locator("#clone-status")).to_have_text("Not cloned.")
    assert listed(demo_url, "browser-bad") is None
