"""Helpers for service tests: voice packages, settings, a real server process."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
SERVER_PIDS: dict[str, int] = {}  # base URL of a running `server_process` -> its process id


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wav_samples(data: bytes) -> np.ndarray:
    audio, rate = sf.read(io.BytesIO(data), dtype="int16")
    assert rate == 24_000
    return audio


@contextlib.contextmanager
def server_process(
    settings: dict, *, timeout: float = 120.0, probe: str = "/readyz"
) -> Iterator[str]:
    """`python -m server serve` on 127.0.0.1 with the given settings; yields its base URL once
    `probe` answers 200 (`/healthz`: as soon as it answers, before its models are ready)."""
    port = free_port()
    settings = {**settings, "host": "127.0.0.1", "port": port}
    config = Path(settings["data_dir"]) / f"settings-{port}.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps(settings))
    log = open(config.with_suffix(".log"), "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--config", str(config)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    SERVER_PIDS[url] = proc.pid
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {config.with_suffix('.log').read_text()}")
            try:
                if httpx.get(f"{url}{probe}", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(config.with_suffix(".log").read_text()[-3000:])
            time.sleep(0.3)
        yield url
    finally:
        SERVER_PIDS.pop(url, None)
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextlib.contextmanager
def postgres_schema(postgres_url: str, prefix: str) -> Iterator[str]:
    """A schema of its own in the test database (`postgres_url`), dropped afterwards; the URL
    (password shown) whose search path is that schema."""
    import uuid

    import sqlalchemy as sa

    url = sa.make_url(postgres_url)
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    try:
        scoped = url.update_query_dict({"options": f"-csearch_path={schema}"})
        yield scoped.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


JOB_ENDS = frozenset({"succeeded", "failed", "cancelled"})


def wait_for_job(
    url: str, job_id: str, states: frozenset[str] | set[str] = JOB_ENDS, timeout: float = 300
) -> dict:
    """Poll `GET /jobs/ID` until the job reaches one of `states`; its JSON."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/jobs/{job_id}", timeout=30).json()
        if job["state"] in states:
            return job
        time.sleep(0.3)
    raise TimeoutError(f"job {job_id} stuck in {job['state']}: {job}")


JobClips = tuple[list[Path], dict[str, str], Path]  # clip paths, transcripts by file name, ref


def job_clips(folder: Path, count: int = 8, seed: int = 7) -> JobClips:
    """A synthetic speaker's clips for `POST /voices`, with their transcripts and a ref clip."""
    from finetune.data import synthetic_dataset

    train = synthetic_dataset(folder, count, seed=seed, with_ref=True)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    paths = [train.parent / r["audio"] for r in rows]
    texts = {p.name: r["text"] for p, r in zip(paths, rows, strict=True)}
    return paths, texts, train.parent / "ref.wav"


def copy_demo_data(built: Path, data_dir: Path) -> Path:
    """A copy of the session's demo build (conftest `demo_data_dir`) at `data_dir`, without the
    building server's settings and logs: a `serve --demo` there finds everything built."""
    shutil.copytree(built, data_dir, ignore=shutil.ignore_patterns("settings-*"))
    return data_dir


def job_form(clips: JobClips, name: str, **fields: str) -> tuple[list, dict]:
    """The multipart files and fields of a small speaker job over `clips` (`fields` override)."""
    paths, texts, ref = clips
    files = [("clips", (p.name, p.read_bytes(), "audio/wav")) for p in paths]
    files.append(("ref", ("ref.wav", ref.read_bytes(), "audio/wav")))
    data = {
        "name": name,
        "strategy": "speaker",
        "transcripts": json.dumps(texts),
        "max_steps": "4",
        **fields,
    }
    return files, data
