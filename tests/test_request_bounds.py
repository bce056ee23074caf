"""Every numeric field of `/speak` is bounded: a value outside is a 422 naming the field, never a
500 (`seed: -1` or `2**64` crashed the engine's PRNG key) and never silently accepted
(`repetition_penalty: 0` or `temperature: 1e308`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient

from server.app import create_app
from server.settings import ModelSpec, Settings

pytestmark = pytest.mark.anyio

BAD = [
    ("seed", -1),
    ("seed", 2**64),
    ("temperature", -0.5),
    ("temperature", 1e308),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_k", -1),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", 1e308),
    ("max_tokens", 0),
]


@pytest.fixture
async def client(tmp_path: Path, tiny_qwen3_custom: Path):
    settings = Settings(
        data_dir=str(tmp_path / "data"), models={"m": ModelSpec(path=str(tiny_qwen3_custom))}
    )
    async with AsyncTestClient(create_app(settings), timeout=120) as c:
        yield c


async def test_out_of_bounds_sampling_fields_are_422_naming_the_field(client):
    for field, value in BAD:
        body = {"speaker": "vivian", "text": "Hi.", "max_tokens": 2, field: value}
        response = await client.post("/speak", json=body)
        assert response.status_code == 422, (field, value, response.status_code, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
        assert field in response.json()["detail"], (field, response.json())
    # In bounds at the edges: served.
    edge = {"speaker": "vivian", "text": "Hi.", "max_tokens": 2, "seed": 2**32 - 1, "top_p": 1.0}
    assert (await client.post("/speak", json=edge)).status_code == 200
