"""The registry's alembic migrations: a fresh database reaches the head and matches
server/db/schema.py; revision 0001 is exactly the schema the sqlite3-only registry made; a data
dir written by that code (tests/legacy_registry_v1.py, frozen from commit 3da3423) is migrated
in place with its rows kept; `voicefoundry db upgrade` is idempotent."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from server.db import migrate
from server.db.engine import make_engine, sqlite_url
from server.db.schema import metadata
from server.registry import Registry, RegistryError, Voice
from server.usage import UsageMeter
from tests import legacy_registry_v1 as legacy

REPO = Path(__file__).resolve().parents[1]

# The usage meter's DDL as commit 3da3423's server/usage.py ran it (lazily, at a server start).
LEGACY_USAGE_DDL = (
    """CREATE TABLE IF NOT EXISTS key_usage (
        key_id           TEXT NOT NULL,
        day              TEXT NOT NULL,
        requests         INTEGER NOT NULL DEFAULT 0,
        characters       INTEGER NOT NULL DEFAULT 0,
        audio_seconds    REAL NOT NULL DEFAULT 0,
        duplex_seconds   REAL NOT NULL DEFAULT 0,
        training_seconds REAL NOT NULL DEFAULT 0,
        PRIMARY KEY (key_id, day)
    )""",
    """CREATE TABLE IF NOT EXISTS job_keys (
        job_id TEXT PRIMARY KEY,
        key_id TEXT NOT NULL
    )""",
)


def _legacy_data_dir(data: Path, *, served: bool = True) -> Path:
    """A registry.sqlite3 written by the pre-alembic code: voices of every shape, jobs, and (if
    a server ever ran on it) the usage tables with rows."""
    path = data / "registry.sqlite3"
    with legacy.Registry(path) as old:
        old.add(legacy.Voice(name="baked1", base_model="qwen3-0.6b", kind="baked", slot=3000))
        old.add(
            legacy.Voice(
                name="lora",
                base_model="qwen3-0.6b",
                kind="adapter",
                adapter="voices/lora/adapter",
                ref_clip="voices/lora/ref.wav",
                default_language="en",
                meta={"epochs": 3, "note": "ünïcode"},
            )
        )
        old.add(legacy.Voice(name="lang-fr", base_model="qwen3-0.6b", kind="language"))
        old.put_job("job1", "lora", "succeeded", {"step": 7})
        old.put_job("job2", "next", "queued", {})
        if served:
            with old.transaction() as conn:
                for statement in LEGACY_USAGE_DDL:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO key_usage (key_id, day, requests, characters, audio_seconds) "
                    "VALUES ('k1', '2030-01-01', 3, 120, 4.5)"
                )
                conn.execute("INSERT INTO job_keys (job_id, key_id) VALUES ('job1', 'k1')")
    return path


def _sqlite_shape(path: Path) -> dict[str, object]:
    """Tables' columns (name, type, not null, default, pk) and indexes (unique, partial,
    columns) as SQLite reports them."""
    shape: dict[str, object] = {}
    with sqlite3.connect(path) as raw:
        tables = [
            r[0]
            for r in raw.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name != 'alembic_version'"
            )
        ]
        for table in sorted(tables):
            columns = [r[1:] for r in raw.execute(f"PRAGMA table_info({table})")]
            indexes = []
            for _, name, unique, origin, partial in raw.execute(f"PRAGMA index_list({table})"):
                cols = [r[2] for r in raw.execute(f"PRAGMA index_info({name})")]
                indexes.append((name if origin == "c" else origin, unique, partial, cols))
            shape[table] = (columns, sorted(indexes))
    return shape


def test_revision_0001_is_exactly_the_legacy_schema(tmp_path: Path) -> None:
    old = _legacy_data_dir(tmp_path / "old")
    fresh = tmp_path / "new" / "registry.sqlite3"
    fresh.parent.mkdir()
    engine = make_engine(sqlite_url(fresh))
    try:
        assert migrate.upgrade(engine, "0001").revision == "0001"
    finally:
        engine.dispose()
    assert _sqlite_shape(fresh) == _sqlite_shape(old)
    assert set(_sqlite_shape(old)) == {"schema_version", "voices", "jobs", "key_usage", "job_keys"}


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    if request.param == "sqlite":
        made = make_engine(sqlite_url(tmp_path / "registry.sqlite3"))
        yield made
        made.dispose()
        return
    url = sa.make_url(request.getfixturevalue("postgres_url"))
    schema = f"m_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    made = make_engine(url.update_query_dict({"options": f"-csearch_path={schema}"}))
    yield made
    made.dispose()
    with admin.begin() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
    admin.dispose()


def _pk_nullable(change: object) -> bool:
    if not (isinstance(change, list) and len(change) == 1 and change[0][0] == "modify_nullable"):
        return False
    _, _, table, column, *_ = change[0]
    return bool(metadata.tables[table].c[column].primary_key)


def _task_queue(change: object) -> bool:
    """procrastinate's own tables (revision 0003, PostgreSQL): not in our metadata."""
    if not isinstance(change, tuple) or change[0] not in ("remove_table", "remove_index"):
        return False
    table = change[1] if change[0] == "remove_table" else change[1].table
    return bool(table.name.startswith("procrastinate_"))


def test_fresh_database_reaches_head_and_matches_the_tables(engine: sa.Engine) -> None:
    assert migrate.status(engine).describe() == "none (empty database)"
    assert migrate.upgrade(engine).revision == migrate.head()
    assert migrate.upgrade(engine).revision == migrate.head()  # again: nothing to do
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
        # `TEXT PRIMARY KEY` is declared nullable to match the old SQLite DDL; PostgreSQL makes
        # every primary-key column NOT NULL whatever the declaration says.
        diff = [d for d in diff if not _pk_nullable(d) and not _task_queue(d)]
        assert diff == []
        if conn.dialect.name == "postgresql":  # revision 0003: the workers' task queue
            tables = set(sa.inspect(conn).get_table_names())
            assert {"procrastinate_jobs", "procrastinate_workers"} <= tables
        assert conn.execute(sa.text("SELECT version FROM schema_version")).all() == [(1,)]


def test_legacy_data_dir_is_migrated_in_place_with_its_rows(tmp_path: Path) -> None:
    path = _legacy_data_dir(tmp_path)
    with legacy.Registry(path) as old:
        voices_before = [v.to_dict() for v in old.list()]
        jobs_before = [j.to_dict() for j in old.list_jobs()]
    engine = make_engine(sqlite_url(path))
    assert migrate.status(engine).legacy_version == 1
    engine.dispose()
    with Registry(path) as reg:
        assert [v.to_dict() for v in reg.list()] == voices_before
        assert [j.to_dict() for j in reg.list_jobs()] == jobs_before
        assert reg.used_slots("qwen3-0.6b") == {3000}
        assert reg.get("lora").meta == {"epochs": 3, "note": "ünïcode"}
        meter = UsageMeter(reg, today=lambda: "2030-01-01")
        assert meter.totals()["k1"].characters == 120 and meter.job_key("job1") == "k1"
        reg.add(Voice(name="after", base_model="qwen3-0.6b", kind="baked", slot=3001))
    with sqlite3.connect(path) as raw:
        stamped = raw.execute("SELECT version_num FROM alembic_version").fetchall()
        assert stamped == [(migrate.head(),)]
        assert raw.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
    # The previous voicefoundry still reads the migrated file (schema_version 1 kept).
    with legacy.Registry(path) as old:
        assert [v.name for v in old.list()] == ["after", "baked1", "lang-fr", "lora"]


def test_a_legacy_file_never_served_gets_the_usage_tables(tmp_path: Path) -> None:
    path = _legacy_data_dir(tmp_path, served=False)
    with Registry(path) as reg:
        meter = UsageMeter(reg, today=lambda: "2030-01-01")
        meter.add("k2", requests=1)
        meter.flush()
        assert [v.name for v in reg.list()] == ["baked1", "lang-fr", "lora"]
    shape = _sqlite_shape(path)
    del shape["slot_reservations"]  # revision 0002's
    del shape["api_keys"]  # revision 0004's
    assert shape == _sqlite_shape(_legacy_data_dir(tmp_path / "served"))


def test_a_newer_legacy_schema_is_refused(tmp_path: Path) -> None:
    path = _legacy_data_dir(tmp_path)
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(RegistryError, match="schema 99"):
        Registry(path)
    with sqlite3.connect(path) as raw:  # untouched
        assert "alembic_version" not in {
            r[0] for r in raw.execute("SELECT name FROM sqlite_master")
        }


def _db(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server", "db", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_db_cli_upgrade_in_place_is_idempotent(tmp_path: Path) -> None:
    path = _legacy_data_dir(tmp_path)
    head = migrate.head()
    current = _db("current", "--data-dir", str(tmp_path))
    assert current.returncode == 0, current.stderr
    assert "pre-alembic registry, schema_version 1" in current.stdout
    first = _db("upgrade", "--data-dir", str(tmp_path))
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip().endswith(f"schema_version 1) -> {head} (head)")
    again = _db("upgrade", "--data-dir", str(tmp_path))
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().endswith(f"{head} (head) -> {head} (head)")
    assert _db("current", "--data-dir", str(tmp_path)).stdout.strip().endswith(f"{head} (head)")
    with Registry(path) as reg:
        assert len(reg.list()) == 3 and reg.get_job("job1").payload == {"step": 7}


def test_db_cli_on_postgresql(postgres_url: str) -> None:
    url = sa.make_url(postgres_url)
    schema = f"c_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    target = url.update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        plain = target.render_as_string(hide_password=False)
        first = _db("upgrade", "--database-url", plain)
        assert first.returncode == 0, first.stderr
        assert "voicefoundry:***@" in first.stdout  # never the password
        assert first.stdout.strip().endswith(f"none (empty database) -> {migrate.head()} (head)")
        again = _db("upgrade", "--database-url", plain)
        assert again.stdout.strip().endswith(f"{migrate.head()} (head) -> {migrate.head()} (head)")
        wrong = _db("current", "--database-url", plain.replace(":voicefoundry@", ":wrong@"))
        assert wrong.returncode == 2 and "password authentication failed" in wrong.stderr
        assert ":wrong@" not in wrong.stderr
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


def test_backup_refuses_a_postgresql_registry(tmp_path: Path) -> None:
    from server.backup import BackupError, backup

    url = "postgresql+psycopg://u:secret@127.0.0.1/db"
    with pytest.raises(BackupError, match=r"pg_dump") as info:
        backup(tmp_path, tmp_path / "out", url)
    assert "secret" not in str(info.value)
    assert json.dumps(str(info.value))  # one plain line
