"""`voicefoundry serve` with `database_url` on PostgreSQL: it migrates the empty database at
start, serves GET /voices from it, and a voice imported through it (a baked speaker row) is a
row in PostgreSQL, not in a SQLite file. One server start."""

from __future__ import annotations

from pathlib import Path

import httpx
import sqlalchemy as sa

from server.db import migrate
from server.registry import Registry
from server.voices import pack_directory
from tests.service_helpers import postgres_schema, server_process

MODEL = "tiny"


def test_serve_on_postgresql_serves_voices_from_it(
    tmp_path: Path, postgres_url: str, tiny_qwen3_base: Path, voice_package: Path
) -> None:
    with postgres_schema(postgres_url, "s") as plain:
        data = tmp_path / "data"
        settings = {
            "data_dir": str(data),
            "database_url": plain,
            "models": {MODEL: {"path": str(tiny_qwen3_base)}},
        }
        with server_process(settings) as base:
            listed = httpx.get(f"{base}/voices", timeout=30)
            assert listed.status_code == 200, listed.text
            files = {"package": ("p.tar.gz", pack_directory(voice_package), "application/gzip")}
            imported = httpx.post(
                f"{base}/voices/import", files=files, data={"name": "pgvoice"}, timeout=120
            )
            assert imported.status_code == 201, imported.text
            names = [v["name"] for v in httpx.get(f"{base}/voices", timeout=30).json()["voices"]]
            assert "pgvoice" in names
            with Registry(data / "registry.sqlite3", database_url=plain) as reg:
                voice = reg.get("pgvoice")
                assert (voice.kind, voice.base_model, voice.slot) == ("baked", MODEL, 3000)
                with reg.transaction() as conn:
                    revision = conn.execute(sa.text("SELECT version_num FROM alembic_version"))
                    assert revision.all() == [(migrate.head(),)]
        assert not (data / "registry.sqlite3").exists()  # nothing went to SQLite
