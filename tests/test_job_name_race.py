"""Parallel `POST /voices` of one name on a real server: one job is created, the others get 409
(the name was checked before the upload's validation and never reserved, so all six were
accepted, all six trained, and five failed at the end with "already exists")."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from finetune.data import synthetic_dataset

import httpx

from tests.service_helpers import server_process


def test_six_parallel_uploads_of_one_name_make_one_job(tmp_path: Path, tiny_qwen3_base):
    train = synthetic_dataset(tmp_path / "clips", 6, seed=5, with_ref=True)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    files = [
        ("clips", (r["audio"], (train.parent / r["audio"]).read_bytes(), "audio/wav")) for r in rows
    ]
    files.append(("ref", ("ref.wav", (train.parent / "ref.wav").read_bytes(), "audio/wav")))
    data = {
        "name": "twin",
        "strategy": "speaker",
        "transcripts": json.dumps({r["audio"]: r["text"] for r in rows}),
        "max_steps": "1",
    }
    settings = {
        "data_dir": str(tmp_path / "data"),
        "models": {"m": {"path": str(tiny_qwen3_base)}},
        "shutdown_grace_s": 5,
        "max_concurrent_uploads": 6,  # all six reach the name check (the cap is tested apart)
    }
    with server_process(settings) as url:

        def post(_: int) -> httpx.Response:
            return httpx.post(f"{url}/voices", files=files, data=data, timeout=120)

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(post, range(6)))
        statuses = sorted(a.status_code for a in answers)
        assert statuses == [202, 409, 409, 409, 409, 409], [a.text[:200] for a in answers]
        assert all("twin" in a.json()["detail"] for a in answers if a.status_code == 409)
        jobs = httpx.get(f"{url}/jobs", timeout=30).json()["jobs"]
        assert [j["name"] for j in jobs] == ["twin"]
    incoming = [p.name for p in (tmp_path / "data" / "jobs").iterdir() if p.name.startswith(".")]
    assert incoming == []
