"""The jobs page in a real Chromium against `serve --demo`: its empty state, then a job
submitted through the API appears by itself (the page refreshes), linked to its own page, and
follows the job's state as the API reports it."""

from __future__ import annotations

import uuid

import httpx
import pytest
from playwright.sync_api import Page, Route, expect

from tests.browser.conftest import open_page
from tests.service_helpers import JobClips, job_clips, job_form, wait_for_job


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> JobClips:
    return job_clips(tmp_path_factory.mktemp("job-clips"))


def submit(demo_url: str, clips: JobClips, name: str) -> dict:
    files, data = job_form(clips, name, base_model="qwen3-tiny", max_steps="2")
    created = httpx.post(f"{demo_url}/voices", files=files, data=data, timeout=120)
    assert created.status_code == 202, created.text
    return created.json()


def test_the_list_refreshes_itself_and_follows_a_job_from_the_api(
    page: Page, demo_url: str, clips
) -> None:
    # The empty state, whatever jobs other tests left on this server: GET /jobs answered empty.
    def no_jobs(route: Route) -> None:
        route.fulfill(json={"jobs": []})

    page.route("**/jobs", no_jobs)
    open_page(page, "jobs")
    expect(page.locator("#jobs-empty")).to_be_visible()
    expect(page.locator("#jobs-empty")).to_contain_text("No fine-tune jobs yet.")
    expect(page.locator("#jobs-table")).to_be_hidden()
    expect(page.locator("#jobs-status")).to_contain_text("0 jobs")
    page.unroute("**/jobs", no_jobs)

    # A job submitted through the API shows up without a reload.
    name = f"pw-job-{uuid.uuid4().hex[:6]}"
    job = submit(demo_url, clips, name)
    row = page.locator(f'#jobs-table tr[data-job="{job["id"]}"]')
    expect(row).to_be_visible(timeout=20_000)
    expect(page.locator("#jobs-empty")).to_be_hidden()
    link = row.get_by_role("link", name=f"Job {name}")
    expect(link).to_have_attribute("href", f"#/job/{job['id']}")
    cells = row.locator("td")
    expect(cells.nth(2)).to_have_text("speaker")
    expect(cells.nth(3)).to_have_text("qwen3-tiny")
    listed = {j["id"] for j in httpx.get(f"{demo_url}/jobs", timeout=30).json()["jobs"]}
    expect(page.locator("#jobs-table tbody tr")).to_have_count(len(listed), timeout=20_000)

    # Cancelled through the API: the page follows, within a refresh or two.
    assert httpx.delete(f"{demo_url}/jobs/{job['id']}", timeout=60).status_code == 200
    ended = wait_for_job(demo_url, job["id"], timeout=120)
    expect(row.locator(".job-state")).to_have_text(ended["state"], timeout=20_000)
    expect(row).to_have_attribute("data-state", ended["state"])
    assert ended["state"] in ("cancelled", "succeeded", "failed")
    progress = row.locator("progress")
    expect(progress).to_have_attribute("max", str(ended["total_steps"] or 1))
    if ended.get("reason"):
        expect(row.locator("td.reason")).to_have_text(ended["reason"])
