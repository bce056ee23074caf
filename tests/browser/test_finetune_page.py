"""The fine-tune page in a real Chromium against `serve --demo`: clips and transcripts (a .txt per
clip for some, typed into the table for the others) submitted from the page start a job; the job
page follows it live (the progress bar and the loss curve grow while it trains) to `succeeded`,
with a link to the new voice."""

from __future__ import annotations

import json
import re
from pathlib import Path

from finetune.data import synthetic_dataset

import httpx
from playwright.sync_api import Page, expect

from tests.browser.conftest import open_page

STEPS = 4  # tiny: the job takes about a minute on the demo model (an idle machine)

# Every change of the job page's progress bar, loss curve and state, as the page showed it.
RECORD_CHANGES = """() => {
  window.__jobSeen = [];
  const note = () => {
    const bar = document.querySelector("#job-progress");
    const curve = document.querySelector("#job-loss");
    const state = document.querySelector("#job-state");
    if (!bar || !curve || !state) return;
    window.__jobSeen.push({
      value: bar.hasAttribute("value") ? Number(bar.value) : null,
      max: Number(bar.max),
      points: Number(curve.dataset.points),
      state: state.dataset.state || "",
    });
  };
  new MutationObserver(note).observe(document.body, {
    subtree: true, childList: true, attributes: true,
    attributeFilter: ["value", "max", "data-points", "data-state"],
  });
}"""


def increasing(values: list[float]) -> list[float]:
    """The distinct values in the order first seen."""
    out: list[float] = []
    for value in values:
        if not out or value != out[-1]:
            out.append(value)
    return out


def test_a_job_submitted_from_the_page_is_followed_live_to_its_voice(
    page: Page, demo_url: str, tmp_path: Path
) -> None:
    train = synthetic_dataset(tmp_path / "clips", 4, seed=11, with_ref=True)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    clips = [train.parent / r["audio"] for r in rows]
    texts = {c.name: r["text"] for c, r in zip(clips, rows, strict=True)}
    # Two transcripts come as .txt files named after their clip; two are typed in the table.
    txt = []
    for clip in clips[:2]:
        path = clip.with_suffix(".txt")
        path.write_text(texts[clip.name])
        txt.append(path)

    open_page(page, "finetune")
    page.set_input_files("#ft-files", [str(p) for p in [*clips, *txt]])
    for clip in clips:
        expect(page.locator(f'#ft-clips tr[data-clip="{clip.name}"]')).to_have_count(1)
    for clip in clips[:2]:
        expect(page.locator(f'input[data-clip="{clip.name}"]')).to_have_value(texts[clip.name])
    for clip in clips[2:]:
        page.get_by_label(f"Transcript of {clip.name}").fill(texts[clip.name])
    expect(page.locator("#ft-summary")).to_contain_text("4 of 4 transcribed")
    page.set_input_files("#ft-ref", str(train.parent / "ref.wav"))

    name = "browser-tuned"
    page.fill("#ft-name", name)
    page.select_option("#ft-model", "qwen3-tiny")
    page.select_option("#ft-strategy", "speaker")
    page.click("#ft-advanced summary")
    steps = page.locator("#ft-max-steps")
    expect(steps).to_have_attribute("max", "100000")  # the server's bound
    steps.fill(str(STEPS))
    page.evaluate(RECORD_CHANGES)
    page.click("#ft-submit")

    page.wait_for_url(re.compile(r"#/job/[0-9a-f]+$"))
    page.wait_for_selector('#view[data-page="job"][data-ready="1"]')
    job_id = page.url.rsplit("/", 1)[1]
    state = page.locator("#job-state")
    expect(state).to_have_attribute("data-state", "succeeded", timeout=300_000)

    job = httpx.get(f"{demo_url}/jobs/{job_id}", timeout=30).json()
    assert job["state"] == "succeeded" and job["name"] == name and job["voice"] == name
    assert job["step"] == STEPS and job["hyper"]["max_steps"] == STEPS
    voices = [v["name"] for v in httpx.get(f"{demo_url}/voices", timeout=30).json()["voices"]]
    assert name in voices
    link = page.locator("#job-voice-link")
    expect(link).to_have_attribute("href", f"#/playground?voice={name}")

    # While it trained, the page showed the bar and the curve growing, step by step.
    seen = page.evaluate("window.__jobSeen")
    running = [s for s in seen if s["state"] in ("preparing", "training")]
    values = increasing([s["value"] for s in running if s["value"] and s["max"] == STEPS])
    points = increasing([s["points"] for s in running if s["points"]])
    assert len(values) >= 2 and values == sorted(values), seen
    assert len(points) >= 2 and points == sorted(points), seen
    bar = page.locator("#job-progress")
    assert float(bar.get_attribute("value") or 0) == STEPS
    assert float(bar.get_attribute("max") or 0) == STEPS
    assert int(page.locator("#job-loss").get_attribute("data-points") or 0) == STEPS

    # Similarity per checkpoint: the untrained voice and the final one, as the API reports.
    rows_shown = page.locator("#job-quality tr")
    expect(rows_shown).to_have_count(len(job["quality"]))
    assert [q["step"] for q in job["quality"]] == [0, STEPS]
    # A checkpoint's preview plays in the page (fetched with the key, as a blob).
    page.click('#job-quality button[data-step="0"]')
    expect(page.locator("#job-quality audio")).to_have_attribute("src", re.compile(r"^blob:"))
    expect(page.locator("#job-log")).to_contain_text(f"step {STEPS}/{STEPS}")
    expect(page.locator("#job-cancel")).to_be_hidden()
