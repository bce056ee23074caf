"""Training workers (`voicefoundry worker`, job_runner: workers): two serving replicas and the
workers as separate processes on 127.0.0.1, sharing one PostgreSQL database (a fresh schema)
and one artifacts dir. A job submitted to one replica is trained by a worker, registered by a
replica and served by both; a worker killed mid-job (SIGKILL) is found by its stale heartbeat
and its job resumes on another worker from its checkpoint.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from tests.service_helpers import (
    JobClips,
    job_clips,
    job_form,
    postgres_schema,
    server_process,
    wait_for_job,
)

ROOT = Path(__file__).resolve().parents[2]
HEARTBEAT_S = 1.0
STALLED_S = 4.0


@dataclass
class Cluster:
    a: str
    b: str
    root: Path
    database_url: str
    settings: dict

    @contextlib.contextmanager
    def worker(self, name: str, **extra: object) -> Iterator[subprocess.Popen[bytes]]:
        """`python -m server worker` with the replicas' settings file (and `extra` settings)."""
        config = self.root / f"worker-{name}.json"
        settings = {**self.settings, "data_dir": str(self.root / name), **extra}
        config.write_text(json.dumps(settings))
        log = open(self.root / f"worker-{name}.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "server", "worker", "--config", str(config), "--name", name],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
            log.close()

    def row(self, job_id: str) -> dict:
        """The job's registry row payload (what clients never see: worker, pid, task)."""
        engine = sa.create_engine(self.database_url, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as conn:
                payload = conn.execute(
                    sa.text("SELECT payload FROM jobs WHERE id = :id"), {"id": job_id}
                ).scalar_one()
        finally:
            engine.dispose()
        return dict(json.loads(payload))


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, postgres_url: str, tiny_qwen3_base: Path
) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("workers")
    with postgres_schema(postgres_url, "w") as plain, contextlib.ExitStack() as stack:
        settings = {
            "artifacts_dir": str(root / "shared"),
            "database_url": plain,
            "job_runner": "workers",
            "worker_heartbeat_s": HEARTBEAT_S,
            "worker_stalled_s": STALLED_S,
            "models": {"tiny": {"path": str(tiny_qwen3_base)}},
        }
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            starting = [
                pool.submit(
                    stack.enter_context,
                    server_process({**settings, "data_dir": str(root / n)}, timeout=300),
                )
                for n in ("a", "b")
            ]
            a, b = (f.result() for f in starting)
        yield Cluster(a, b, root, plain, settings)


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> JobClips:
    return job_clips(tmp_path_factory.mktemp("clips"))


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _speak(url: str, voice: str) -> httpx.Response:
    body = {"speaker": voice, "text": "Good morning.", "seed": 3, "max_tokens": 8}
    return httpx.post(f"{url}/speak", json=body, timeout=120)


def test_a_job_on_a_is_trained_by_the_worker_and_speaks_on_b(
    cluster: Cluster, clips: JobClips
) -> None:
    files, data = job_form(clips, "worked")
    created = httpx.post(f"{cluster.a}/voices", files=files, data=data, timeout=120)
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    time.sleep(2 * HEARTBEAT_S)
    # No worker yet: the job waits in the queue, on every replica.
    assert httpx.get(f"{cluster.b}/jobs/{job_id}").json()["state"] == "queued"
    with cluster.worker("w1") as worker:
        done = wait_for_job(cluster.b, job_id, timeout=300)
        assert done["state"] == "succeeded", done
        assert done["voice"] == "worked"
        assert worker.poll() is None
    assert cluster.row(job_id)["worker"] == "w1"
    log = (cluster.root / "shared" / "jobs" / job_id / "job.log").read_text()
    assert '"event": "step"' in log  # the worker's trainer wrote it, in the shared job folder
    for url in (cluster.a, cluster.b):
        spoken = _speak(url, "worked")
        assert spoken.status_code == 200, (url, spoken.text)
    # The job's own name is now taken on both replicas.
    again = httpx.post(f"{cluster.b}/voices", files=files, data=data, timeout=120)
    assert again.status_code == 409, again.text


def _events(url: str, job_id: str, into: list[dict], stop: threading.Event) -> None:
    with httpx.stream("GET", f"{url}/jobs/{job_id}/events", timeout=None) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                into.append(json.loads(line[5:]))
            if stop.is_set():
                return


def test_a_killed_worker_s_job_resumes_on_another_worker_from_its_checkpoint(
    cluster: Cluster, clips: JobClips
) -> None:
    files, data = job_form(clips, "survivor", max_steps="30", save_every="10")
    created = httpx.post(f"{cluster.a}/voices", files=files, data=data, timeout=120)
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    seen: list[dict] = []
    stop = threading.Event()
    # The events stream of the other replica: the worker's events reach it too.
    listener = threading.Thread(target=_events, args=(cluster.b, job_id, seen, stop), daemon=True)
    listener.start()
    with cluster.worker("w-killed") as first:
        deadline = time.monotonic() + 240
        while httpx.get(f"{cluster.a}/jobs/{job_id}").json().get("step", 0) < 14:
            assert time.monotonic() < deadline, "the first worker never got past step 14"
            assert first.poll() is None
            time.sleep(0.2)
        trainer = cluster.row(job_id)["pid"]
        assert trainer in _children(first.pid)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        # Its trainer (in its own session) sees its parent gone and stops on its own.
        deadline = time.monotonic() + 60
        while Path(f"/proc/{trainer}").exists():
            assert time.monotonic() < deadline, "the dead worker's trainer kept running"
            time.sleep(0.2)
    assert httpx.get(f"{cluster.b}/jobs/{job_id}").json()["state"] in ("training", "preparing")
    with cluster.worker("w-second"):
        done = wait_for_job(cluster.b, job_id, timeout=400)
    stop.set()
    listener.join(30)
    assert done["state"] == "succeeded", done
    assert "resumes from its checkpoint" in (done.get("note") or "") or any(
        e.get("event") == "resume" for e in seen
    )
    resumed = [e for e in seen if e.get("event") == "resume"]
    assert resumed and resumed[0]["step"] >= 10, seen[-5:]
    assert any(e.get("event") == "step" and e["step"] > resumed[0]["step"] for e in seen)
    assert any(e.get("event") == "state" and e.get("state") == "succeeded" for e in seen)
    assert cluster.row(job_id)["worker"] == "w-second"
    assert _speak(cluster.a, "survivor").status_code == 200


def test_cancel_on_b_stops_the_worker_s_trainer(cluster: Cluster, clips: JobClips) -> None:
    files, data = job_form(clips, "cancelled-one", max_steps="5000")
    created = httpx.post(f"{cluster.a}/voices", files=files, data=data, timeout=120)
    job_id = created.json()["id"]
    with cluster.worker("w-cancel") as worker:
        wait_for_job(cluster.a, job_id, {"training"}, timeout=240)
        trainer = cluster.row(job_id)["pid"]
        assert httpx.delete(f"{cluster.b}/jobs/{job_id}").status_code == 200
        done = wait_for_job(cluster.a, job_id, timeout=120)
        assert done["state"] == "cancelled", done
        deadline = time.monotonic() + 30
        while Path(f"/proc/{trainer}").exists() and trainer in _children(worker.pid):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert worker.poll() is None  # the worker goes on
    assert httpx.get(f"{cluster.b}/voices/cancelled-one").status_code == 404
    # A queued job (no worker running) is cancelled at once.
    files, data = job_form(clips, "never-run")
    queued = httpx.post(f"{cluster.b}/voices", files=files, data=data, timeout=120).json()
    cancelled = httpx.delete(f"{cluster.a}/jobs/{queued['id']}")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"


def test_a_stopped_worker_queues_its_job_again_for_the_next(
    cluster: Cluster, clips: JobClips
) -> None:
    files, data = job_form(clips, "handed-on", max_steps="30", save_every="10")
    job_id = httpx.post(f"{cluster.a}/voices", files=files, data=data, timeout=120).json()["id"]
    with cluster.worker("w-stopped") as first:
        deadline = time.monotonic() + 240
        while httpx.get(f"{cluster.a}/jobs/{job_id}").json().get("step", 0) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        first.terminate()  # SIGTERM: the trainer checkpoints, the job goes back to the queue
        assert first.wait(60) == 0
    job = httpx.get(f"{cluster.b}/jobs/{job_id}").json()
    assert job["state"] == "queued", job
    with cluster.worker("w-next"):
        done = wait_for_job(cluster.b, job_id, timeout=400)
    assert done["state"] == "succeeded", done
    log = (cluster.root / "shared" / "jobs" / job_id / "job.log").read_text()
    assert '"event": "resume"' in log


def test_a_worker_spreads_a_job_over_two_ranks(cluster: Cluster, clips: JobClips) -> None:
    """worker_hosts / worker_ranks_per_host: the job's trainer runs as two mx.distributed ranks
    (mlx.launch, ring over loopback); rank 0 reports and bakes, and the voice speaks."""
    files, data = job_form(clips, "two-ranks", max_steps="6")
    job_id = httpx.post(f"{cluster.a}/voices", files=files, data=data, timeout=120).json()["id"]
    most = 0
    with cluster.worker("w-ranks", worker_hosts=["127.0.0.1"], worker_ranks_per_host=2):
        deadline = time.monotonic() + 400
        while True:
            found = subprocess.run(
                ["pgrep", "-f", f"finetune run-job --spec .*{job_id}/spec.json"],
                capture_output=True,
                text=True,
            ).stdout.split()
            most = max(most, len(found))
            state = httpx.get(f"{cluster.b}/jobs/{job_id}").json()["state"]
            if state in ("succeeded", "failed", "cancelled"):
                break
            assert time.monotonic() < deadline, state
            time.sleep(0.2)
    done = httpx.get(f"{cluster.b}/jobs/{job_id}").json()
    assert done["state"] == "succeeded", done
    # The worker's run-job (the launcher) and the two ranks it started.
    assert most >= 3, f"at most {most} run-job processes seen"
    log = (cluster.root / "shared" / "jobs" / job_id / "job.log").read_text()
    assert log.count('"event": "start"') == 1  # rank 0 alone reports
    assert _speak(cluster.b, "two-ranks").status_code == 200
