"""Auth never fails open, and a key check does not reveal which key ids exist."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient

import server.auth
from server.app import create_app
from server.auth import KeyStore, Unauthorized
from server.settings import ModelSpec, Settings

ROOT = Path(__file__).resolve().parents[1]


def _bad_key_files(tmp_path: Path) -> dict[str, Path]:
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"keys": []}))
    unreadable = tmp_path / "dir.json"
    unreadable.mkdir()
    return {"missing": tmp_path / "missing.json", "empty": empty, "unreadable": unreadable}


@pytest.mark.parametrize("case", ["missing", "empty", "unreadable"])
def test_serve_refuses_a_configured_key_file_it_cannot_use(tmp_path, tiny_qwen3_base, case):
    config = tmp_path / "settings.json"
    keys = _bad_key_files(tmp_path)[case]
    config.write_text(
        json.dumps(
            {
                "data_dir": str(tmp_path / "data"),
                "models": {"m": {"path": str(tiny_qwen3_base)}},
                "api_keys_file": str(keys),
            }
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: api_keys_file"), done.stderr


@pytest.mark.anyio
async def test_the_app_does_not_start_without_auth_when_keys_are_configured(
    tmp_path, tiny_qwen3_base
):
    settings = Settings(
        data_dir=str(tmp_path / "data"),
        models={"m": ModelSpec(path=str(tiny_qwen3_base))},
        api_keys_file=str(tmp_path / "missing.json"),
    )
    with pytest.raises(BaseException) as info:
        async with AsyncTestClient(create_app(settings)) as client:
            await client.delete("/voices/anything")
    assert "does not exist" in "".join(_messages(info.value))


def _messages(exc: BaseException) -> list[str]:
    """Messages of an exception and of everything an exception group holds."""
    inner = getattr(exc, "exceptions", ())
    return [str(exc), *(m for e in inner for m in _messages(e))]


def test_unknown_key_ids_cost_the_same_hashing_as_wrong_secrets(monkeypatch):
    store = KeyStore()
    secret, key = store.add("admin")
    server.auth.clear_verify_cache()
    calls: list[int] = []
    real = hashlib.pbkdf2_hmac

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    server.auth._dummy_hash()  # made once per process, before anyone is timed
    monkeypatch.setattr(server.auth.hashlib, "pbkdf2_hmac", counting)
    for wrong in (f"vf_{key.id}_not-the-secret", "vf_ffffffff_unknown-id", "vf_zz_bad"):
        calls.clear()
        with pytest.raises(Unauthorized):
            store.authenticate(wrong, "speak")
        assert len(calls) == 1, (wrong, len(calls))
    assert store.authenticate(secret, "admin").id == key.id
