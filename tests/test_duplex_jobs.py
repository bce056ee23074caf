"""`POST /voices` with `strategy: duplex`: PersonaPlex LoRA training as a server job, then the
new duplex voice serves a WebSocket session."""

from __future__ import annotations

import asyncio
import json

from finetune.data import synthetic_dataset

import httpx
import numpy as np
import pytest

from tests.duplex_helpers import FRAME, converse, user_audio, ws_url
from tests.service_helpers import server_process, wait_for_job

MODEL = "pp-tiny"


@pytest.fixture(scope="module")
def upload(tmp_path_factory) -> tuple[list, dict]:
    train = synthetic_dataset(tmp_path_factory.mktemp("duplex_upload"), 3, seed=11, with_ref=True)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    paths = [train.parent / r["audio"] for r in rows]
    files = [("clips", (p.name, p.read_bytes(), "audio/wav")) for p in paths]
    files.append(("ref", ("voice.wav", (train.parent / "ref.wav").read_bytes(), "audio/wav")))
    # At most one text token per 80 ms frame: two words fit any of these clips.
    texts = {p.name: " ".join(r["text"].split()[:2]) for p, r in zip(paths, rows, strict=True)}
    return files, texts


def test_duplex_job_trains_registers_and_serves(tmp_path, tiny_personaplex, upload):
    files, texts = upload
    settings = {
        "data_dir": str(tmp_path / "data"),
        "models": {MODEL: {"path": str(tiny_personaplex), "family": "personaplex"}},
        "duplex_max_inbox_frames": 64,
    }
    with server_process(settings) as url:
        too_long = {name: "word " * 200 for name in texts}
        refused = httpx.post(
            f"{url}/voices",
            files=files,
            data={"name": "x", "strategy": "duplex", "transcripts": json.dumps(too_long)},
            timeout=120,
        )
        assert refused.status_code == 422 and "at most one token per frame" in refused.text
        data = {
            "name": "hindi-agent",
            "strategy": "duplex",
            "transcripts": json.dumps(texts),
            "text_prompt": "You answer in Hindi.",
            "max_steps": "3",
            "learning_rate": "0.001",
        }
        response = httpx.post(f"{url}/voices", files=files, data=data, timeout=120)
        assert response.status_code == 202, response.text
        job = wait_for_job(url, response.json()["id"])
        assert job["state"] == "succeeded", (job["reason"], job["log_tail"])
        voice = httpx.get(f"{url}/voices/hindi-agent", timeout=10).json()
        assert voice["kind"] == "duplex" and voice["base_model"] == MODEL
        assert voice["has_adapter"] and voice["has_ref_clip"]
        assert voice["meta"]["text_prompt"] == "You answer in Hindi."

        audio = user_audio(1.2, seed=3)

        def talk(speaker: str):
            return asyncio.run(
                converse(ws_url(url, speaker=speaker, seed=1), audio=audio, min_audio_frames=14)
            )

        tuned, base = talk("hindi-agent"), talk(MODEL)
        assert tuned.metadata["speaker"] == "hindi-agent" and len(tuned.audio) >= 14
        assert not np.array_equal(tuned.pcm[: 14 * FRAME], base.pcm[: 14 * FRAME])

        # Hot-removal: the voice goes away without a restart.
        assert httpx.delete(f"{url}/voices/hindi-agent", timeout=30).status_code == 200
        assert httpx.get(f"{url}/voices/hindi-agent", timeout=10).status_code == 404


def test_duplex_strategy_needs_a_personaplex_model_and_duplex_fields(tmp_path, tiny_qwen3_base):
    settings = {
        "data_dir": str(tmp_path / "data"),
        "models": {"qwen": {"path": str(tiny_qwen3_base)}},
    }
    with server_process(settings) as url:
        files = [("clips", ("a.wav", b"RIFF", "audio/wav"))]
        data = {"name": "x", "strategy": "duplex", "transcripts": json.dumps({"a.wav": "hi"})}
        response = httpx.post(f"{url}/voices", files=files, data=data, timeout=60)
        assert response.status_code == 422
        assert "PersonaPlex" in response.json()["detail"]
        data = {"name": "y", "strategy": "speaker", "text_prompt": "hello"}
        response = httpx.post(f"{url}/voices", files=files, data=data, timeout=60)
        assert response.status_code == 422
        assert "text_prompt" in response.json()["detail"]
