"""The Conversation page (#/conversation) in a real Chromium with a fake microphone (the
`browser` fixture plays `microphone_wav` as the microphone), against real servers: the demo
(`demo-duplex` on the tiny PersonaPlex) and, for the model's text, a "talkative" variant of
the same tiny model served with the server's `codes_log` on, so the page's transcript can be
compared with the text tokens the server actually sampled.

Why two servers: the demo's random tiny PersonaPlex puts text on about one step in 75 (most of
its 32000 text ids lie past the tiny tokenizer's 200 pieces and carry no text), so within a
few seconds its transcript may be empty by chance. The talkative copy keeps only the text
head's rows that are tokenizer pieces (as tests/test_duplex_clients.py does), so text comes on
most steps.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from playwright.sync_api import Browser, Page, expect

from tests.browser.conftest import KeyedServer, PageErrors, checked_page, open_page
from tests.service_helpers import server_process

FRAME = 1920  # samples per duplex step (80 ms at 24 kHz): the server answers each with a frame
TALKATIVE = "personaplex-talkative"


def metric(url: str, name: str) -> float:
    """One unlabelled sample of the server's /metrics."""
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")


def number(page: Page, selector: str) -> int:
    text = (page.text_content(selector) or "").strip()
    return int(text) if text.isdigit() else 0


def wait_number(page: Page, selector: str, above: int, timeout_ms: float = 60_000) -> int:
    page.wait_for_function(
        "([sel, n]) => Number(document.querySelector(sel).textContent) > n",
        arg=[selector, above],
        timeout=timeout_ms,
    )
    return number(page, selector)


def wait_steady(page: Page, selector: str, still_ms: int = 600, timeout: float = 20.0) -> int:
    """The number in `selector` once it has not changed for `still_ms`."""
    deadline = time.monotonic() + timeout
    seen = number(page, selector)
    while True:
        page.wait_for_timeout(still_ms)
        now = number(page, selector)
        if now == seen:
            return now
        assert time.monotonic() < deadline, f"{selector} kept changing"
        seen = now


def wait_metric(url: str, name: str, value: float, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while (seen := metric(url, name)) != value:
        assert time.monotonic() < deadline, f"{name} stayed {seen}, expected {value}"
        time.sleep(0.2)


def test_talk_plays_the_models_audio_pauses_restarts_and_hangs_up(
    page: Page, demo_url: str
) -> None:
    voices = httpx.get(f"{demo_url}/voices", timeout=10).json()["voices"]
    duplex = {v["name"]: v for v in voices if v["kind"] == "duplex"}
    opened = metric(demo_url, "voicefoundry_duplex_sessions_opened_total")
    closed = metric(demo_url, "voicefoundry_duplex_sessions_closed_total")
    stepped = metric(demo_url, "voicefoundry_duplex_frames_total")

    open_page(page, "conversation")
    # The voice list is the server's duplex voices, and nothing else.
    offered = page.eval_on_selector_all("#conv-voice option", "os => os.map(o => o.value)")
    assert sorted(offered) == sorted(duplex)
    expect(page.locator("#conv-voice")).to_have_value("demo-duplex")
    expect(page.locator("#conv-prompt")).to_have_value(duplex["demo-duplex"]["meta"]["text_prompt"])

    page.click("#conv-talk")
    # The model answers each 80 ms microphone frame with one: a dozen decoded frames played.
    samples = wait_number(page, "#conv-samples", 12 * FRAME)
    assert samples % FRAME == 0, "whole 1920-sample frames are decoded"
    expect(page.locator("#conv-status")).to_have_attribute("data-state", "live")
    expect(page.locator("#conv-latency")).to_have_text(re.compile(r"^\d+ ms$"))
    latency = int((page.text_content("#conv-latency") or "").split()[0])
    assert 0 < latency < 10_000
    assert number(page, "#conv-sent") >= samples // FRAME, "each answered frame was sent first"
    assert metric(demo_url, "voicefoundry_duplex_sessions") == 1
    assert metric(demo_url, "voicefoundry_duplex_sessions_opened_total") == opened + 1

    # The microphone, resampled to 24 kHz in the worklet, is sent in real time: 80 ms a frame.
    sent, since = number(page, "#conv-sent"), time.monotonic()
    page.wait_for_timeout(2_500)
    pace = (number(page, "#conv-sent") - sent) * FRAME / 24_000 / (time.monotonic() - since)
    assert 0.75 < pace < 1.25, f"{pace:.2f} s of microphone audio sent per second"

    # Pause: the server stops stepping the model, so no more audio comes; Resume: it does.
    page.click("#conv-pause")
    expect(page.locator("#conv-status")).to_have_attribute("data-state", "paused")
    expect(page.locator("#conv-pause")).to_have_text("Resume")
    held = wait_steady(page, "#conv-samples")  # frames stepped before the pause arrive
    page.wait_for_timeout(1_500)
    assert number(page, "#conv-samples") == held, "a paused session sends no audio"
    page.click("#conv-pause")
    expect(page.locator("#conv-status")).to_have_attribute("data-state", "live")
    resumed = wait_number(page, "#conv-samples", held, timeout_ms=20_000)

    # Restart: the server conditions the session again and answers with a new handshake.
    page.click("#conv-restart")
    expect(page.locator("#conv-status")).to_have_text(re.compile("Restarted"), timeout=30_000)
    expect(page.locator("#conv-status")).to_have_attribute("data-state", "live")
    wait_number(page, "#conv-samples", resumed + 4 * FRAME, timeout_ms=20_000)

    # The transcript holds exactly the text messages counted (the demo model may send none).
    texts = number(page, "#conv-text-count")
    transcript = (page.text_content("#conv-text") or "").strip()
    assert bool(transcript) == (texts > 0)

    page.click("#conv-hangup")
    expect(page.locator("#conv-status")).to_have_attribute("data-state", "closed")
    expect(page.locator("#conv-status")).to_contain_text("Hung up")
    expect(page.locator("#conv-talk")).to_be_enabled()
    wait_metric(demo_url, "voicefoundry_duplex_sessions", 0)
    wait_metric(demo_url, "voicefoundry_duplex_sessions_closed_total", closed + 1)
    received = number(page, "#conv-samples") // FRAME
    assert metric(demo_url, "voicefoundry_duplex_frames_total") - stepped >= received
    expect(page.locator("#problem")).to_be_hidden()


@pytest.mark.parametrize(
    ("query", "code", "words"),
    [
        ("?voice=nobody-here", "4404", "unknown duplex speaker 'nobody-here'"),
        ("?seed=-7", "4422", "$.seed"),
    ],
    ids=["unknown-voice", "bad-seed"],
)
def test_a_refused_conversation_shows_the_servers_reason(
    page: Page, demo_url: str, query: str, code: str, words: str
) -> None:
    page.goto(f"/#/conversation{query}")
    page.wait_for_selector('#view[data-page="conversation"][data-ready="1"]')
    page.click("#conv-talk")
    problem = page.locator("#problem-text")
    expect(problem).to_contain_text(words)
    expect(problem).to_contain_text(f"close code {code}")
    expect(page.locator("#conv-status")).to_have_attribute("data-state", "closed")
    expect(page.locator("#conv-talk")).to_be_enabled()  # a person can fix it and try again
    assert number(page, "#conv-samples") == 0
    wait_metric(demo_url, "voicefoundry_duplex_sessions", 0)


def test_without_a_key_the_refused_socket_asks_for_one(
    keyed_page: Page, keyed_demo: KeyedServer, page_errors: PageErrors
) -> None:
    page_errors.expect_status(401)  # GET /voices without a key, on purpose
    keyed_page.goto("/#/conversation?voice=demo-duplex")
    keyed_page.wait_for_selector('#view[data-page="conversation"][data-ready="1"]')
    expect(keyed_page.locator("#problem-text")).to_contain_text("needs an API key")
    keyed_page.click("#conv-talk")
    problem = keyed_page.locator("#problem-text")
    expect(problem).to_contain_text("close code 4401")
    expect(problem).to_contain_text("needs an API key")

    # With the speak key entered, the same socket opens and the model's audio comes.
    keyed_page.fill("#api-key", keyed_demo.speak_key)
    keyed_page.click("#key-form button[type=submit]")
    keyed_page.wait_for_selector('#view[data-page="conversation"][data-ready="1"]')
    expect(keyed_page.locator("#conv-voice option[value=demo-duplex]")).to_have_count(1)
    keyed_page.click("#conv-talk")
    wait_number(keyed_page, "#conv-samples", 4 * FRAME)
    keyed_page.click("#conv-hangup")
    expect(keyed_page.locator("#conv-status")).to_have_attribute("data-state", "closed")
    expect(keyed_page.locator("#problem")).to_be_hidden()


# --- the model's text -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def talkative(tiny_personaplex: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A server of the tiny PersonaPlex whose text head keeps only the tokenizer's pieces, with
    `codes_log` on (every step's text token, per session)."""
    import finetune  # noqa: F401  (loads the BLAS before mlx)
    from finetune.families.personaplex.text_tokenizer import load_spm

    import mlx.core as mx

    root = tmp_path_factory.mktemp("talkative")
    model = root / "model"
    shutil.copytree(tiny_personaplex, model)
    tokenizer = load_spm(model / "tokenizer_spm_32k_3.model")
    weights, meta = mx.load(str(model / "model.safetensors"), return_metadata=True)
    head = np.array(weights["text_linear.weight"].astype(mx.float32))
    head[tokenizer.get_piece_size() :] = 0.0
    head[: tokenizer.get_piece_size()] *= 4.0
    weights["text_linear.weight"] = mx.array(head).astype(mx.bfloat16)
    mx.save_safetensors(str(model / "model.safetensors"), weights, metadata=meta)
    codes = root / "codes.jsonl"
    settings = {
        "data_dir": str(root / "data"),
        "models": {TALKATIVE: {"path": str(model), "family": "personaplex"}},
        "codes_log": str(codes),
    }
    with server_process(settings) as url:
        yield {"url": url, "codes": codes, "tokenizer": tokenizer}


@pytest.fixture
def talkative_page(
    browser: Browser, talkative: dict, page_errors: PageErrors, request: pytest.FixtureRequest
) -> Iterator[Page]:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    yield from checked_page(browser, talkative["url"], page_errors, name)


def test_the_models_text_appears_as_it_comes(talkative_page: Page, talkative: dict) -> None:
    from finetune.families.personaplex.text_tokenizer import token_text

    page = talkative_page
    open_page(page, "conversation")
    expect(page.locator("#conv-voice")).to_have_value(TALKATIVE)  # a model's own base voice
    page.click("#conv-talk")
    wait_number(page, "#conv-text-count", 3)
    expect(page.locator("#conv-text")).not_to_have_text("")
    page.click("#conv-hangup")
    expect(page.locator("#conv-status")).to_have_attribute("data-state", "closed")

    session = re.search(r"Session (\w+)", page.text_content("#conv-session") or "")
    assert session, "the session's metadata message is shown"
    steps: dict[int, str | None] = {}
    for line in talkative["codes"].read_text().splitlines():
        record = json.loads(line)
        if record["duplex_session"] == session.group(1):
            steps[record["step"]] = token_text(talkative["tokenizer"], record["text_token"])
    frames = number(page, "#conv-samples") // FRAME
    assert frames and set(range(frames)) <= set(steps), "the page played frames it was sent"
    # Each step's text follows its audio frame: the page has the text of every step whose
    # audio it played, except perhaps the last one's.
    before_last = [steps[s] for s in range(frames - 1) if steps[s]]
    through_last = [steps[s] for s in range(frames) if steps[s]]
    shown = page.text_content("#conv-text") or ""
    count = number(page, "#conv-text-count")
    assert (shown, count) in {
        ("".join(before_last), len(before_last)),
        ("".join(through_last), len(through_last)),
    }
