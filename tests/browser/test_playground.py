"""The playground in a real Chromium against `serve --demo`: speech streamed into the page
(decoded sample by sample, counted, drawn, timed) is exactly what POST /speak answers for the
same request; its fields follow what the model takes (GET /models); a refused request shows
the server's reason."""

from __future__ import annotations

import io

import httpx
import soundfile as sf
from playwright.sync_api import Page, expect

from tests.browser.conftest import PageErrors

TEXT = "Hello there, playground."
SEED = 7
FRAMES = 12  # two streamed chunks of the demo's 6 frames: about a second of audio


def open_playground(page: Page, query: str = "") -> None:
    page.goto(f"/#/playground{query}")
    page.wait_for_selector('#view[data-page="playground"][data-ready="1"]')


def number(page: Page, selector: str) -> float:
    return float(page.locator(selector).text_content() or "nan")


def test_streamed_speech_arrives_in_the_page_as_the_api_answers_it(
    page: Page, demo_url: str, tmp_path
) -> None:
    open_playground(page, "?voice=demo-baked")
    expect(page.locator("#pg-voice")).to_have_value("demo-baked")
    page.fill("#pg-text", TEXT)
    page.click("#pg-form details summary")
    page.fill("#pg-seed", str(SEED))
    page.fill("#pg-max-tokens", str(FRAMES))
    # Every value #pg-samples takes, in order: playback must start before the end.
    page.evaluate(
        """() => {
          window.seenSamples = [];
          const out = document.getElementById('pg-samples');
          new MutationObserver(() => window.seenSamples.push(Number(out.textContent)))
            .observe(out, { childList: true, characterData: true, subtree: true });
        }"""
    )
    page.click("#pg-speak")
    expect(page.locator("#pg-status")).to_contain_text("Done", timeout=120_000)

    samples = int(number(page, "#pg-samples"))
    assert samples > 0
    seen = [n for n in page.evaluate("window.seenSamples") if n > 0]
    assert len(seen) >= 2 and seen == sorted(seen) and seen[-1] == samples, seen

    body = {
        "speaker": "demo-baked",
        "text": TEXT,
        "stream": True,
        "format": "pcm",
        "seed": SEED,
        "max_tokens": FRAMES,
    }
    answer = httpx.post(f"{demo_url}/speak", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    assert samples == len(answer.content) // 2

    ttfa, rtf = number(page, "#pg-ttfa"), number(page, "#pg-rtf")
    assert ttfa > 0 and rtf > 0
    seconds = samples / 24_000
    assert ttfa < rtf * seconds  # the first audio came before the whole of it
    assert number(page, "#pg-seed-used") == SEED

    # Download: a WAV of what arrived.
    page.select_option("#pg-format", "wav")
    with page.expect_download() as info:
        page.click("#pg-download")
    path = tmp_path / "speech.wav"
    info.value.save_as(path)
    audio, rate = sf.read(io.BytesIO(path.read_bytes()), dtype="int16")
    assert rate == 24_000 and len(audio) == samples


def test_the_fields_follow_what_the_model_takes(page: Page, demo_url: str) -> None:
    models = {m["name"]: m for m in httpx.get(f"{demo_url}/models", timeout=30).json()["models"]}
    open_playground(page, "?voice=demo-baked")
    qwen = models["qwen3-tiny"]
    options = page.locator("#pg-language option").evaluate_all("os => os.map(o => o.value)")
    assert options == ["", *qwen["languages"]] and qwen["languages"]
    expect(page.locator("#pg-language option").first).to_have_text("Voice default (english)")

    # The demo's Qwen3-TTS is a Base model: no instruct, and the server indeed refuses one.
    assert qwen["instruct"] is None
    expect(page.locator("#pg-instruct")).to_be_disabled()
    expect(page.locator("#pg-instruct-hint")).to_contain_text("takes no instruct")
    refused = httpx.post(
        f"{demo_url}/speak",
        json={"speaker": "demo-baked", "text": "Hi.", "instruct": "whisper"},
        timeout=60,
    )
    assert refused.status_code == 422 and "takes no instruct" in refused.json()["detail"]

    # CSM names no languages.
    assert models["csm-tiny"]["languages"] == []
    page.select_option("#pg-voice", "csm-tiny-0")
    expect(page.locator("#pg-language")).to_be_disabled()
    expect(page.locator("#pg-language-hint")).to_have_text("csm-tiny takes no language.")
    # Duplex voices do not speak through /speak: not offered.
    offered = page.locator("#pg-voice option").evaluate_all("os => os.map(o => o.value)")
    listed = httpx.get(f"{demo_url}/voices", timeout=30).json()["voices"]
    assert sorted(offered) == sorted(
        v["name"] for v in listed if v["base_model"] in models and v["available"]
    )


def test_a_refused_request_shows_the_servers_reason(
    page: Page, demo_url: str, page_errors: PageErrors
) -> None:
    page_errors.expect_status(413)
    too_long = "This sentence is far too long. " * 200  # 6,200 characters
    refused = httpx.post(
        f"{demo_url}/speak",
        json={"speaker": "demo-baked", "text": too_long, "stream": True, "format": "pcm"},
        timeout=60,
    )
    assert refused.status_code == 413
    open_playground(page, "?voice=demo-baked")
    page.fill("#pg-text", too_long)
    page.click("#pg-speak")
    problem = page.locator("#problem-text")
    expect(problem).to_have_text(refused.json()["detail"])
    expect(page.locator("#pg-status")).to_contain_text("did not speak")
    expect(page.locator("#pg-samples")).to_have_text("0")
    expect(page.locator("#pg-speak")).to_be_enabled()
