"""`POST /voices`: fine-tuning as a service, end to end on a real server process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import mlx.core as mx
import numpy as np
import pytest

from tests.service_helpers import (
    JobClips,
    job_clips,
    job_form,
    server_process,
    wait_for_job,
    wav_samples,
)

MODEL = "tiny"


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> JobClips:
    return job_clips(tmp_path_factory.mktemp("upload"))


def _server_pid(url: str) -> int:
    out = subprocess.run(
        ["pgrep", "-f", f"settings-{url.rsplit(':', 1)[1]}"], capture_output=True, text=True
    ).stdout.split()
    return int(out[0])


def _settings(data: Path, model: Path) -> dict:
    return {
        "data_dir": str(data),
        "models": {MODEL: {"path": str(model)}},
        "max_tokens_per_sentence": 6,
        "shutdown_grace_s": 20,
    }


@dataclass
class TrainedJob:
    url: str
    root: Path  # holds the server's data dir
    created: httpx.Response
    events: list[dict]


@pytest.fixture(scope="module")
def newvoice(tmp_path_factory, tiny_qwen3_base, clips) -> Iterator[TrainedJob]:
    """One speaker job uploaded to a real server and followed to its end through the event
    stream; the server stays up for the tests that read what the job left."""
    root = tmp_path_factory.mktemp("newvoice")
    with server_process(_settings(root / "data", tiny_qwen3_base)) as url:
        files, data = job_form(clips, "Newvoice")
        created = httpx.post(f"{url}/voices", files=files, data=data, timeout=120)
        events = []
        if created.status_code == 202:
            job_id = created.json()["id"]
            with httpx.stream("GET", f"{url}/jobs/{job_id}/events", timeout=300) as stream:
                for line in stream.iter_lines():
                    if line.startswith("data:"):
                        events.append(json.loads(line[5:]))
        yield TrainedJob(url, root, created, events)


def test_upload_trains_in_another_process_and_the_new_voice_speaks(
    newvoice: TrainedJob, tiny_qwen3_base, clips
):
    url, created, events = newvoice.url, newvoice.created, newvoice.events
    assert created.status_code == 202, created.text
    job = created.json()
    assert created.headers["location"] == f"/jobs/{job['id']}"
    assert job["state"] == "queued" and job["name"] == "newvoice"

    kinds = [e["event"] for e in events]
    assert "step" in kinds, kinds
    assert events[-1]["event"] == "state" and events[-1]["state"] == "succeeded", events[-3:]

    final = httpx.get(f"{url}/jobs/{job['id']}").json()
    assert final["state"] == "succeeded" and final["step"] == 4 and final["voice"] == "newvoice"
    assert "pid" not in final  # the trainer's pid (and server paths) stay on the server
    assert json.dumps(final).count(str(newvoice.root)) == 0
    assert {"loss", "main", "sub"} <= set(final["losses"])

    speech = httpx.post(
        f"{url}/speak", json={"speaker": "newvoice", "text": "I am new."}, timeout=120
    )
    assert speech.status_code == 200 and wav_samples(speech.content).size > 0
    voice = httpx.get(f"{url}/voices/newvoice").json()
    assert voice["kind"] == "baked" and voice["slot"] == 3000

    # The baked row is the mean speaker embedding of the uploaded reference clip(s).
    from finetune.families.qwen3_tts.checkpoint import load_qwen3_tts
    from finetune.families.qwen3_tts.training import mean_speaker_embedding

    loaded = load_qwen3_tts(tiny_qwen3_base)
    expected = mean_speaker_embedding(loaded.model, [clips[2]])
    stored = mx.load(str(newvoice.root / "data/voices/newvoice/speaker_embedding.safetensors"))
    np.testing.assert_allclose(np.array(stored["embedding"]), expected, rtol=1e-4, atol=1e-4)


def test_bad_uploads_get_4xx_and_leave_nothing(tmp_path, newvoice: TrainedJob, clips):
    """On the server whose one job made `newvoice`: every refused upload leaves nothing."""
    url, data_dir = newvoice.url, newvoice.root / "data"
    assert newvoice.created.status_code == 202, newvoice.created.text

    def post(files, data):
        return httpx.post(f"{url}/voices", files=files, data=data, timeout=60)

    files, data = job_form(clips, "ok")
    cases = [
        (files, {**data, "name": "Bad Name!"}, 422, "name"),
        (files, {**data, "base_model": "missing"}, 422, "unknown speech base model"),
        (files, {**data, "strategy": "dance"}, 422, "strategy"),
        (files, {**data, "lora_rank": "1000"}, 422, "lora_rank"),
        (files[:-1], data, 422, "reference clip"),
        (files, {**data, "transcripts": json.dumps({})}, 422, "transcripts"),
        (
            [*files[:2], ("clips", ("x.wav", b"RIFF garbage", "audio/wav")), files[-1]],
            {
                **data,
                "transcripts": json.dumps(
                    {**{f[1][0]: clips[1][f[1][0]] for f in files[:2]}, "x.wav": "hi"}
                ),
            },
            422,
            "cannot decode",
        ),
        (files[:1] + files[-1:], data, 422, None),  # too little audio in total / count
    ]
    for case_files, case_data, status, needle in cases:
        response = post(case_files, case_data)
        assert response.status_code == status, (case_data, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
        if needle:
            assert needle in response.text, response.text
    short = tmp_path / "short.wav"
    from finetune.audio import write_wav

    write_wav(short, np.zeros(2400, np.float32))
    response = post(
        [("clips", ("short.wav", short.read_bytes(), "audio/wav")), files[-1]],
        {**data, "transcripts": json.dumps({"short.wav": "x"})},
    )
    assert response.status_code == 422 and "outside" in response.text
    # A taken name: 409 (a name a running job is making: test_job_name_race.py).
    taken = post(files, {**data, "name": "newvoice"})
    assert taken.status_code == 409 and "already exists" in taken.text, taken.text
    jobs = [p.name for p in (data_dir / "jobs").iterdir()]
    assert jobs == [newvoice.created.json()["id"]], jobs  # nothing from the refused uploads
    assert [p.name for p in (data_dir / "voices").iterdir()] == ["newvoice"]


def test_upload_over_the_size_limit_is_413(tmp_path, tiny_qwen3_base, clips):
    settings = {**_settings(tmp_path / "data", tiny_qwen3_base), "max_upload_bytes": 100_000}
    with server_process(settings) as url:
        files, data = job_form(clips, "big")
        response = httpx.post(f"{url}/voices", files=files, data=data, timeout=60)
        assert response.status_code == 413
    assert list((tmp_path / "data" / "jobs").iterdir()) == []


def test_cancel_and_kill_are_never_silent(tmp_path, tiny_qwen3_base, clips):
    with server_process(_settings(tmp_path / "data", tiny_qwen3_base)) as url:
        files, data = job_form(clips, "cancelme", max_steps="5000")
        job = httpx.post(f"{url}/voices", files=files, data=data, timeout=60).json()
        running = wait_for_job(url, job["id"], {"training"})
        while running.get("step", 0) < 1:
            running = httpx.get(f"{url}/jobs/{job['id']}").json()
            time.sleep(0.2)
        pid = _trainer_pid(job["id"])
        assert pid != _server_pid(url)
        assert httpx.delete(f"{url}/jobs/{job['id']}").status_code == 200
        cancelled = wait_for_job(url, job["id"], {"cancelled", "failed"})
        assert cancelled["state"] == "cancelled"
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid)

        files, data = job_form(clips, "killme", max_steps="5000")
        job = httpx.post(f"{url}/voices", files=files, data=data, timeout=60).json()
        wait_for_job(url, job["id"], {"training"})
        os.kill(_trainer_pid(job["id"]), signal.SIGKILL)
        failed = wait_for_job(url, job["id"], {"failed", "succeeded"})
        assert failed["state"] == "failed" and "SIGKILL" in failed["reason"]
        assert httpx.get(f"{url}/voices/killme").status_code == 404


def _trainer_pid(job_id: str) -> int:
    """The job's training process (`python -m finetune run-job --spec .../ID/spec.json`)."""
    out = subprocess.run(
        ["pgrep", "-f", f"run-job --spec .*{job_id}/spec.json"], capture_output=True, text=True
    ).stdout.split()
    assert len(out) == 1, out
    return int(out[0])


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_server_restart_mid_job_resumes_and_finishes(tmp_path, tiny_qwen3_base, clips):
    settings = _settings(tmp_path / "data", tiny_qwen3_base)
    with server_process(settings) as url:
        # Enough steps that the job is still training when the server stops (~0.7 s a step
        # here; it stops within a step or two of step 2); the "resume" event below proves it.
        files, data = job_form(clips, "survivor", max_steps="16")
        job = httpx.post(f"{url}/voices", files=files, data=data, timeout=60).json()
        running = wait_for_job(url, job["id"], {"training"})
        while running.get("step", 0) < 2:
            running = httpx.get(f"{url}/jobs/{job['id']}").json()
            time.sleep(0.1)
    # The server stopped (SIGTERM): the trainer saved a checkpoint; the job is interrupted.
    with server_process(settings) as url:
        finished = wait_for_job(url, job["id"], {"succeeded", "failed"}, timeout=400)
        assert finished["state"] == "succeeded", finished
        log = (tmp_path / "data" / "jobs" / job["id"] / "job.log").read_text()
        assert '"event": "resume"' in log
        speech = httpx.post(
            f"{url}/speak", json={"speaker": "survivor", "text": "Back."}, timeout=120
        )
        assert speech.status_code == 200


def test_a_language_job_registers_a_speaker_name_too(tmp_path, tiny_qwen3_base, clips):
    paths, texts, _ = clips
    # An upload folder a killed server left behind: the start cleans it.
    stale = tmp_path / "data" / "jobs" / ".incoming-stale"
    stale.mkdir(parents=True)
    with server_process(_settings(tmp_path / "data", tiny_qwen3_base)) as url:
        assert not stale.exists()
        files = [("clips", (p.name, p.read_bytes(), "audio/wav")) for p in paths]
        # Transcripts as one .txt per clip this time.
        files += [
            ("clips", (p.with_suffix(".txt").name, texts[p.name].encode(), "text/plain"))
            for p in paths
        ]
        data = {
            "name": "hindi-ish",
            "strategy": "language",
            "language": "english",
            "max_steps": "3",
        }
        created = httpx.post(f"{url}/voices", files=files, data=data, timeout=120)
        assert created.status_code == 202, created.text
        done = wait_for_job(url, created.json()["id"], {"succeeded", "failed"})
        assert done["state"] == "succeeded", done
        voice = httpx.get(f"{url}/voices/hindi-ish").json()
        assert voice["kind"] == "adapter" and voice["has_adapter"] and voice["has_ref_clip"]
        assert voice["default_language"] == "english"
        speech = httpx.post(
            f"{url}/speak", json={"speaker": "hindi-ish", "text": "Namaste."}, timeout=120
        )
        assert speech.status_code == 200 and wav_samples(speech.content).size > 0


def test_a_job_reports_its_quality_curve_previews_and_final_similarity(newvoice: TrainedJob):
    url, created = newvoice.url, newvoice.created
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    assert created.json()["quality"] == []
    done = httpx.get(f"{url}/jobs/{job_id}").json()
    assert done["state"] == "succeeded", done

    # Step 0 (the untrained voice) and the final checkpoint, each with its preview.
    curve = done["quality"]
    assert [q["step"] for q in curve] == [0, 4], curve
    streamed = [e for e in newvoice.events if e["event"] == "quality"]
    assert [q["step"] for q in streamed] == [0, 4], streamed
    for point in curve:
        assert isinstance(point["similarity"], float) and -1 <= point["similarity"] <= 1
        assert point["preview"] == f"/jobs/{job_id}/previews/{point['step']}"
        preview = httpx.get(f"{url}{point['preview']}", timeout=30)
        assert preview.status_code == 200
        assert preview.headers["content-type"].startswith("audio/wav")
        assert wav_samples(preview.content).size > 0
    # The previews outlive the run folder, which is removed after success.
    assert not (newvoice.root / "data" / "jobs" / job_id / "run").exists()

    for missing in (f"/jobs/{job_id}/previews/1", "/jobs/nosuchjob/previews/0"):
        response = httpx.get(f"{url}{missing}", timeout=30)
        assert response.status_code == 404, missing
        assert response.headers["content-type"].startswith("application/problem+json")

    meta = httpx.get(f"{url}/voices/newvoice").json()["meta"]
    assert meta["similarity"] == curve[-1]["similarity"]
    assert meta["similarity_baseline"] == curve[0]["similarity"]
    assert meta["similarity_step"] == 4
