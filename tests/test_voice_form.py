"""`GET /voice-form`: what `POST /voices` accepts here, read from the tables the intake checks
against (the web console's clone and fine-tune pages build their forms from it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient

from server.app import create_app
from server.auth import KeyStore
from server.jobs.intake import BOUNDS, FLAGS, MAX_CLIP_S, MIN_CLIP_S
from server.settings import ModelSpec, Settings

pytestmark = pytest.mark.anyio


async def test_the_form_lists_models_strategies_and_the_intakes_bounds(
    tmp_path: Path, tiny_qwen3_base: Path
) -> None:
    settings = Settings(
        data_dir=str(tmp_path / "data"),
        models={"q": ModelSpec(path=str(tiny_qwen3_base))},
        job_min_total_seconds=2.5,
    )
    async with AsyncTestClient(create_app(settings), timeout=120) as client:
        answer = await client.get("/voice-form")
        assert answer.status_code == 200, answer.text
        form = answer.json()
        [model] = form["models"]
        assert model["name"] == "q" and model["family"] == "qwen3_tts"
        assert model["engine"] == "speech"
        # The strategies it has a tested recipe for, each with the least audio a job needs.
        assert set(model["strategies"]) == {"speaker", "language"}
        assert model["min_job_seconds"] == {"speaker": 2.5, "language": 2.5}
        assert form["clone"]["models"] == ["q"]
        assert form["clone"]["min_seconds"] < form["clone"]["max_seconds"]
        assert form["clip_seconds"] == [MIN_CLIP_S, MAX_CLIP_S]
        assert form["flags"] == list(FLAGS)
        assert set(form["bounds"]) == set(BOUNDS)
        for key, (kind, low, high) in BOUNDS.items():
            assert form["bounds"][key] == {"type": kind.__name__, "min": low, "max": high}

        # The bounds it shows are the ones POST /voices enforces: just past one is refused.
        rank = form["bounds"]["lora_rank"]
        refused = await client.post(
            "/voices",
            data={"name": "x", "strategy": "speaker", "lora_rank": str(rank["max"] + 1)},
            files=[("clips", ("a.wav", b"RIFF", "audio/wav"))],
        )
        assert refused.status_code == 422 and "lora_rank" in refused.json()["detail"]


async def test_the_form_needs_an_admin_key(tmp_path: Path, tiny_qwen3_base: Path) -> None:
    keys = KeyStore()
    admin, _ = keys.add("admin", "form test")
    speak, _ = keys.add("speak", "form test")
    keys.save(tmp_path / "keys.json")
    settings = Settings(
        data_dir=str(tmp_path / "data"),
        models={"q": ModelSpec(path=str(tiny_qwen3_base))},
        api_keys_file=str(tmp_path / "keys.json"),
    )
    async with AsyncTestClient(create_app(settings), timeout=120) as client:
        missing = await client.get("/voice-form")
        assert missing.status_code == 401
        assert missing.headers["content-type"].startswith("application/problem+json")
        weak = await client.get("/voice-form", headers={"Authorization": f"Bearer {speak}"})
        assert weak.status_code == 403
        ok = await client.get("/voice-form", headers={"Authorization": f"Bearer {admin}"})
        assert ok.status_code == 200 and json.loads(ok.text)["models"][0]["name"] == "q"
