"""What the service lets slip, closed: key-check cost by id, blank key files, 500 bodies, adapter
paths in 422s, keyless operational routes, secrets in request lines."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient

import server.auth
from server.app import create_app
from server.auth import ApiKey, KeyStore, Unauthorized, hash_key
from server.logs import redact
from server.settings import ModelSpec, Settings

MODEL = "tiny"


def _count_pbkdf2(monkeypatch) -> list[int]:
    """The iteration count of every PBKDF2 run from now on."""
    runs: list[int] = []
    real = hashlib.pbkdf2_hmac

    def counting(name, password, salt, iterations, *args, **kwargs):
        runs.append(iterations)
        return real(name, password, salt, iterations, *args, **kwargs)

    monkeypatch.setattr(server.auth.hashlib, "pbkdf2_hmac", counting)
    return runs


def test_unknown_ids_cost_what_the_stored_keys_cost(monkeypatch):
    # Keys hashed at another cost than the default (an older file, a tuned deployment): the
    # dummy an unknown id is checked against must cost the same, or timing tells ids apart.
    secret = "vf_abc1_the-real-secret"
    store = KeyStore([ApiKey(id="abc1", scope="admin", hash=hash_key(secret, 2_000))])
    server.auth.clear_verify_cache()
    runs = _count_pbkdf2(monkeypatch)
    for wrong in ("vf_abc1_wrong", "vf_ffff_unknown-id", "not-a-key-at-all"):
        runs.clear()
        with pytest.raises(Unauthorized):
            store.authenticate(wrong, "speak")
        assert runs == [2_000], (wrong, runs)
    assert store.authenticate(secret, "admin").id == "abc1"


def test_a_blank_key_file_setting_is_refused_not_read_as_no_auth():
    with pytest.raises(ValueError, match="api_keys_file is empty"):
        KeyStore.load_configured("  ")


@pytest.mark.anyio
async def test_the_app_does_not_start_with_a_blank_key_file_setting(tmp_path):
    settings = Settings(data_dir=str(tmp_path / "data"), api_keys_file="")
    with pytest.raises(BaseException) as info:
        async with AsyncTestClient(create_app(settings)) as client:
            await client.delete("/voices/anything")
    assert "api_keys_file is empty" in repr(info.value) + "".join(
        repr(e) for e in getattr(info.value, "exceptions", ())
    )


@pytest.fixture
def key_file(tmp_path) -> tuple[Path, str, str]:
    store = KeyStore()
    speak, _ = store.add("speak")
    admin, _ = store.add("admin")
    store.save(tmp_path / "keys.json")
    return tmp_path / "keys.json", speak, admin


@pytest.mark.anyio
async def test_metrics_and_schema_need_a_key_by_default_readyz_does_not(tmp_path, key_file):
    path, speak, _ = key_file
    settings = Settings(data_dir=str(tmp_path / "data"), api_keys_file=str(path))
    with_key = {"X-API-Key": speak}
    async with AsyncTestClient(create_app(settings)) as c:
        for route in ("/metrics", "/schema/openapi.json"):
            refused = await c.get(route)
            assert refused.status_code == 401, (route, refused.text)
            assert refused.headers["content-type"].startswith("application/problem+json")
            assert (await c.get(route, headers=with_key)).status_code == 200, route
        assert (await c.get("/readyz")).status_code == 503  # open: no model is loaded, no 401
        assert (await c.get("/healthz")).status_code == 200


@pytest.mark.anyio
async def test_each_operational_route_takes_its_setting(tmp_path, key_file):
    path, speak, admin = key_file
    settings = Settings(
        data_dir=str(tmp_path / "data"),
        api_keys_file=str(path),
        metrics_auth="none",
        schema_auth="admin",
        readyz_auth="speak",
    )
    async with AsyncTestClient(create_app(settings)) as c:
        assert (await c.get("/metrics")).status_code == 200
        schema = "/schema/openapi.json"
        assert (await c.get(schema, headers={"X-API-Key": speak})).status_code == 403
        assert (await c.get(schema, headers={"X-API-Key": admin})).status_code == 200
        assert (await c.get("/readyz")).status_code == 401
        assert (await c.get("/readyz", headers={"X-API-Key": speak})).status_code == 503


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.anyio
async def test_a_500_answers_an_error_id_and_logs_the_traceback(tmp_path, monkeypatch):
    secret_path = tmp_path / "private" / "registry.sqlite3"
    settings = Settings(data_dir=str(tmp_path / "data"))
    # On the logger itself: Litestar's logging config replaces the root's handlers at start.
    records = _Records()
    monkeypatch.setattr(logging.getLogger("voicefoundry"), "level", logging.INFO)
    monkeypatch.setattr(logging.getLogger("voicefoundry"), "handlers", [records])
    async with AsyncTestClient(create_app(settings)) as c:

        def broken() -> list:
            raise RuntimeError(f"database disk image is malformed: {secret_path}")

        monkeypatch.setattr(c.app.state.voices, "list", broken)
        response = await c.get("/voices?api_key=vf_abc_do-not-log-me")
    assert response.status_code == 500
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert str(tmp_path) not in response.text and "RuntimeError" not in response.text
    error_id = body["error_id"]
    assert error_id in body["detail"]
    logged = [r for r in records.records if error_id in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert logged[0].exc_info[0] is RuntimeError
    assert all("do-not-log-me" not in r.getMessage() for r in records.records)  # no query


def _pack(folder: Path, change) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                data = change(path.relative_to(folder).as_posix(), path.read_bytes())
                info = tarfile.TarInfo(path.relative_to(folder).as_posix())
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.anyio
@pytest.mark.parametrize("case", ["corrupt_weights", "rank_over_the_bank"])
async def test_adapter_errors_name_the_package_folder_not_the_staging_path(
    tmp_path, tiny_qwen3_base, voice_package, case
):
    adapter = json.loads((voice_package / "voice.json").read_text())["adapter"]

    def change(name: str, data: bytes) -> bytes:
        if case == "corrupt_weights" and name == f"{adapter}/adapters.safetensors":
            return b"\x08\x00\x00\x00\x00\x00\x00\x00not json"
        return data

    max_rank = 2 if case == "rank_over_the_bank" else 32  # the package's adapter has rank 4
    data = tmp_path / "data"
    settings = Settings(
        data_dir=str(data),
        models={MODEL: ModelSpec(path=str(tiny_qwen3_base))},
        adapter_max_rank=max_rank,
    )
    async with AsyncTestClient(create_app(settings), timeout=300) as c:
        files = {"package": ("p.tar.gz", _pack(voice_package, change), "application/gzip")}
        response = await c.post("/voices/import", files=files, data={"name": "v"})
    assert response.status_code == 422, response.text
    assert str(data.resolve()) not in response.text and ".import-" not in response.text
    assert f"package {adapter!r}" in response.json()["detail"], response.text


def test_secret_query_parameters_are_redacted_from_request_lines():
    line = '127.0.0.1:5 - "GET /duplex?speaker=a&api_key=vf_x_s3cret&seed=1 HTTP/1.1" 200'
    assert redact(line) == line.replace("vf_x_s3cret", "***")
    assert "s3cret" not in redact("/duplex?api%5Fkey=vf_x_s3cret")
    assert redact("/voices?name=api_key") == "/voices?name=api_key"
