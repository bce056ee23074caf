"""`GET /models`: what each loaded speech model takes (the console's playground builds its
language and instruct fields from it), checked against the checkpoints and the server's own
answers to `/speak`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient

from server import audio_formats
from server.app import create_app
from server.auth import KeyStore
from server.settings import ModelSpec, Settings

pytestmark = pytest.mark.anyio


@pytest.fixture
async def client(tmp_path: Path, tiny_qwen3_base: Path, tiny_qwen3_custom: Path, tiny_csm: Path):
    models = {
        "base": ModelSpec(path=str(tiny_qwen3_base)),
        "custom": ModelSpec(path=str(tiny_qwen3_custom)),
        "sesame": ModelSpec(path=str(tiny_csm), family="csm"),
    }
    app = create_app(Settings(data_dir=str(tmp_path / "data"), models=models))
    async with AsyncTestClient(app, timeout=300) as c:
        yield c


async def test_models_say_their_languages_instruct_and_formats(
    client: AsyncTestClient, tiny_qwen3_base: Path
) -> None:
    answer = await client.get("/models")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    models = {m["name"]: m for m in body["models"]}
    assert sorted(models) == ["base", "custom", "sesame"]

    config = json.loads((tiny_qwen3_base / "config.json").read_text())
    languages = sorted(k.lower() for k in config["talker_config"]["codec_language_id"])
    assert languages and models["base"]["languages"] == languages
    assert models["base"]["family"] == "qwen3_tts" and models["sesame"]["family"] == "csm"
    assert models["sesame"]["languages"] == []
    assert models["base"]["instruct"] is None
    assert models["custom"]["instruct"] == "style"
    assert models["sesame"]["instruct"] is None
    assert models["base"]["sample_rate"] == 24_000

    # The builtin speakers are the voices GET /voices lists for that model.
    voices = (await client.get("/voices")).json()["voices"]
    for name in ("custom", "sesame"):
        listed = sorted(v["name"] for v in voices if v["base_model"] == name)
        assert sorted(models[name]["speakers"]) == listed and listed

    assert body["formats"] == list(audio_formats.available_formats())
    assert "pcm" in body["streamable"] and "flac" not in body["streamable"]


async def test_a_model_said_to_take_no_instruct_is_refused_one(client: AsyncTestClient) -> None:
    models = {m["name"]: m for m in (await client.get("/models")).json()["models"]}
    voices = (await client.get("/voices")).json()["voices"]
    speaker = next(v["name"] for v in voices if v["base_model"] == "sesame")
    assert models["sesame"]["instruct"] is None
    refused = await client.post(
        "/speak", json={"speaker": speaker, "text": "Hello.", "instruct": "whisper"}
    )
    assert refused.status_code == 422
    assert "takes no instruct" in refused.json()["detail"]


async def test_models_need_a_speak_key(tmp_path: Path, tiny_qwen3_base: Path) -> None:
    store = KeyStore([])
    key, _ = store.add("speak", label="console")
    store.save(tmp_path / "keys.json")
    settings = Settings(
        data_dir=str(tmp_path / "data"),
        models={"base": ModelSpec(path=str(tiny_qwen3_base))},
        api_keys_file=str(tmp_path / "keys.json"),
    )
    async with AsyncTestClient(create_app(settings), timeout=300) as c:
        assert (await c.get("/models")).status_code == 401
        answer = await c.get("/models", headers={"Authorization": f"Bearer {key}"})
        assert answer.status_code == 200
        assert [m["name"] for m in answer.json()["models"]] == ["base"]
