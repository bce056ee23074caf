"""A voice package trained against another base (other weights, or the same weights quantised
otherwise) is refused with 409 and nothing changes; its own base takes it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient

from server.app import create_app
from server.settings import ModelSpec, Settings
from server.voices import pack_directory

pytestmark = pytest.mark.anyio


@pytest.fixture
async def client(tmp_path, tiny_qwen3_base, tiny_qwen3_q8):
    settings = Settings(
        data_dir=str(tmp_path / "data"),
        models={
            "fp": ModelSpec(path=str(tiny_qwen3_base)),
            "q8": ModelSpec(path=str(tiny_qwen3_q8)),
        },
    )
    async with AsyncTestClient(create_app(settings), timeout=300) as c:
        yield c


async def _import(client: AsyncTestClient, package: Path, base: str):
    files = {"package": ("p.tar.gz", pack_directory(package), "application/gzip")}
    return await client.post(
        "/voices/import", files=files, data={"name": "packaged", "base_model": base}
    )


async def _state(client: AsyncTestClient) -> tuple[list[str], dict]:
    voices = sorted(v["name"] for v in (await client.get("/voices")).json()["voices"])
    return voices, (await client.get("/readyz")).json()


async def test_a_package_from_another_base_is_refused_and_its_own_base_takes_it(
    client, voice_package, tmp_path
):
    before = await _state(client)
    refused = await _import(client, voice_package, "q8")
    assert refused.status_code == 409, refused.text
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert "quantization" in refused.json()["detail"], refused.json()
    assert await _state(client) == before

    tampered = tmp_path / "tampered"
    shutil.copytree(voice_package, tampered)
    meta = json.loads((tampered / "voice.json").read_text())
    meta["base_model"]["identity"]["weights_sha256"] = "0" * 64
    (tampered / "voice.json").write_text(json.dumps(meta))
    refused = await _import(client, tampered, "fp")
    assert refused.status_code == 409, refused.text
    assert "trained against weights 000000000000" in refused.json()["detail"]
    assert await _state(client) == before

    accepted = await _import(client, voice_package, "fp")
    assert accepted.status_code == 201, accepted.text
    voice = (await client.get("/voices/packaged")).json()
    assert voice["base_model"] == "fp"
    spoken = await client.post(
        "/speak", json={"speaker": "packaged", "text": "Hello.", "max_tokens": 4}
    )
    assert spoken.status_code == 200, spoken.text
