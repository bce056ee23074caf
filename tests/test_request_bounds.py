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


async def test_an_oversized_json_body_is_413_before_it_is_read_whole(tmp_path, tiny_qwen3_custom):
    settings = Settings(
        data_dir=str(tmp_path / "data"),
        models={"m": ModelSpec(path=str(tiny_qwen3_custom))},
        max_json_bytes=10_000,
    )
    async with AsyncTestClient(create_app(settings), timeout=120) as c:
        body = b'{"speaker": "vivian", "text": "' + b"a" * 50_000 + b'"}'
        for route in ("/speak", "/v1/audio/speech"):
            answer = await c.post(route, content=body, headers={"content-type": "application/json"})
            assert answer.status_code == 413, (route, answer.text)
            assert "limit is 10000" in answer.json()["detail"]


async def test_a_chunked_json_body_is_cut_off_at_the_limit():
    """Without a Content-Length the limit holds while streaming: reading stops past it."""
    from server.app import _json_body
    from server.errors import PayloadTooLarge

    read: list[int] = []

    class ChunkedRequest:
        headers: dict[str, str] = {}  # noqa: RUF012

        async def stream(self):
            for _ in range(1000):  # 5 MB offered
                read.append(5_000)
                yield b"a" * 5_000

    settings = Settings(max_json_bytes=10_000)
    with pytest.raises(PayloadTooLarge, match="over 10000 bytes"):
        await _json_body(ChunkedRequest(), settings)
    assert sum(read) <= 15_000
