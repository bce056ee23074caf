"""One broken voice never stops the service: at start, voices are restored one by one; a voice
whose package no longer loads is marked unavailable with its reason (GET /voices/{name},
`/metrics`), answers 409 when asked to speak, and can be deleted; the rest serve."""

from __future__ import annotations

from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient

from server.app import create_app
from server.settings import ModelSpec, Settings
from server.voices import pack_directory

pytestmark = pytest.mark.anyio


def _settings(data: Path, model: Path) -> Settings:
    return Settings(data_dir=str(data), models={"m": ModelSpec(path=str(model))})


async def test_a_voice_with_an_unreadable_embedding_is_unavailable_and_the_rest_serve(
    tmp_path, tiny_qwen3_base, voice_package
):
    data = tmp_path / "data"
    package = {"package": ("p.tar.gz", pack_directory(voice_package), "application/gzip")}
    async with AsyncTestClient(create_app(_settings(data, tiny_qwen3_base)), timeout=300) as c:
        for name in ("good", "broken"):
            answer = await c.post("/voices/import", files=package, data={"name": name})
            assert answer.status_code == 201, answer.text
    (data / "voices" / "broken" / "speaker_embedding.safetensors").write_bytes(b"")

    async with AsyncTestClient(create_app(_settings(data, tiny_qwen3_base)), timeout=300) as c:
        assert (await c.get("/readyz")).status_code == 200
        broken = (await c.get("/voices/broken")).json()
        assert broken["available"] is False and broken["unavailable_reason"]
        assert str(tmp_path) not in broken["unavailable_reason"]
        assert (await c.get("/voices/good")).json()["available"] is True
        speak = {"text": "Hi.", "max_tokens": 3}
        refused = await c.post("/speak", json={"speaker": "broken", **speak})
        assert refused.status_code == 409 and "unavailable" in refused.json()["detail"]
        served = await c.post("/speak", json={"speaker": "good", **speak})
        assert served.status_code == 200, served.text
        assert "voicefoundry_voices_unavailable 1" in (await c.get("/metrics")).text
        assert (await c.delete("/voices/broken")).status_code == 200
        assert "voicefoundry_voices_unavailable 0" in (await c.get("/metrics")).text
        # The broken voice's row was not left half-baked: the name can be imported again.
        again = await c.post("/voices/import", files=package, data={"name": "broken"})
        assert again.status_code == 201, again.text
