"""Multipart bodies past the parser's limits are a 4xx with the reason, never a 500: 600 parts
or a 20,000-character file name on `POST /voices` / `POST /voices/import` raised the parser's
`ParserLimitReached` straight through (500)."""

from __future__ import annotations

from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient

from server.app import create_app
from server.settings import ModelSpec, Settings

pytestmark = pytest.mark.anyio

BOUNDARY = "fuzzboundary"
ROUTES = ("/voices", "/voices/import")


def _multipart(parts: list[tuple[str, str | None, bytes]]) -> bytes:
    out = bytearray()
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        out += data + b"\r\n"
    out += f"--{BOUNDARY}--\r\n".encode()
    return bytes(out)


@pytest.fixture
async def client(tmp_path: Path, tiny_qwen3_custom: Path):
    settings = Settings(
        data_dir=str(tmp_path / "data"), models={"m": ModelSpec(path=str(tiny_qwen3_custom))}
    )
    async with AsyncTestClient(create_app(settings), timeout=120) as c:
        yield c


def _leftovers(data_dir: Path) -> list[str]:
    names = [p for p in data_dir.rglob("*") if p.name.startswith((".upload-", ".incoming-"))]
    return [str(p) for p in names]


async def _post(client, route: str, body: bytes):
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    return await client.post(route, content=body, headers=headers)


async def test_too_many_parts_is_413_with_the_reason(client, tmp_path):
    body = _multipart([(f"field{i}", None, b"x") for i in range(600)])
    for route in ROUTES:
        answer = await _post(client, route, body)
        assert answer.status_code == 413, (route, answer.status_code, answer.text)
        assert answer.headers["content-type"].startswith("application/problem+json")
        assert "parts" in answer.json()["detail"], answer.json()
    assert _leftovers(tmp_path / "data") == []


async def test_a_huge_file_name_is_400_with_the_reason(client, tmp_path):
    body = _multipart([("clips", "a" * 20_000 + ".wav", b"RIFF")])
    for route in ROUTES:
        answer = await _post(client, route, body)
        assert answer.status_code == 400, (route, answer.status_code, answer.text)
        assert answer.headers["content-type"].startswith("application/problem+json")
        assert "header" in answer.json()["detail"], answer.json()
    assert _leftovers(tmp_path / "data") == []


async def test_too_many_headers_in_one_part_is_400(client):
    extra = "".join(f"X-Extra-{i}: {i}\r\n" for i in range(20))
    body = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="name"\r\n{extra}\r\nv\r\n'
        f"--{BOUNDARY}--\r\n"
    ).encode()
    for route in ROUTES:
        answer = await _post(client, route, body)
        assert answer.status_code == 400, (route, answer.status_code, answer.text)
        assert answer.headers["content-type"].startswith("application/problem+json")
