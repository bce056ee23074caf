"""`voicefoundry backup` while the server runs, then `voicefoundry restore` into a fresh data
dir: the restored service serves the same voices (the same audio for the same seed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient

from server.app import create_app
from server.settings import ModelSpec, Settings
from server.voices import pack_directory

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[1]
SPEAK = {"speaker": "kept", "text": "Still here.", "seed": 5, "max_tokens": 4}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "server", *args], cwd=ROOT, capture_output=True, text=True
    )


def _settings(data: Path, model: Path) -> Settings:
    return Settings(data_dir=str(data), models={"m": ModelSpec(path=str(model))})


async def test_backup_of_a_live_server_restores_into_a_fresh_data_dir(
    tmp_path, tiny_qwen3_base, voice_package
):
    source, copy, backup = tmp_path / "source", tmp_path / "restored", tmp_path / "backup"
    package = {"package": ("p.tar.gz", pack_directory(voice_package), "application/gzip")}
    async with AsyncTestClient(create_app(_settings(source, tiny_qwen3_base)), timeout=300) as c:
        assert (
            await c.post("/voices/import", files=package, data={"name": "kept"})
        ).status_code == 201
        before = (await c.post("/speak", json=SPEAK)).content
        done = _cli("backup", str(backup), "--data-dir", str(source))  # the server is running
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"voices": 1, "jobs": 0}
        # A second backup into the same directory is refused, the first is left as it was.
        again = _cli("backup", str(backup), "--data-dir", str(source))
        assert again.returncode == 2 and "already exists" in again.stderr

    done = _cli("restore", str(backup), "--data-dir", str(copy))
    assert done.returncode == 0, done.stderr
    async with AsyncTestClient(create_app(_settings(copy, tiny_qwen3_base)), timeout=300) as c:
        voice = (await c.get("/voices/kept")).json()
        assert voice["available"] is True and voice["kind"] == "baked"
        assert (await c.post("/speak", json=SPEAK)).content == before
    refused = _cli("restore", str(backup), "--data-dir", str(copy))
    assert refused.returncode == 2 and "already has a registry" in refused.stderr
    assert _cli("restore", str(tmp_path), "--data-dir", str(tmp_path / "x")).returncode == 2
