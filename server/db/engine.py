"""SQLAlchemy engines for the registry: SQLite (the embedded default) or PostgreSQL (psycopg 3).

SQLite keeps the old registry's settings: WAL, ``synchronous=FULL``, a busy timeout, and every
write transaction opened with ``BEGIN IMMEDIATE`` (the write lock up front, so check-then-write
sequences cannot race another process). pysqlite's own implicit transactions are turned off
(``isolation_level=None``) so those BEGINs are the only ones; reads marked `READ_OPTION` run
without a transaction, as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa

BUSY_TIMEOUT_S = 10.0
# Execution option of a read-only connection: on SQLite it opens no write transaction.
READ_OPTION = "registry_read"


def sqlite_url(path: Path) -> str:
    return f"sqlite+pysqlite:///{Path(path).resolve()}"


def redacted(url: str | sa.URL) -> str:
    """The URL with its password hidden, for messages and logs."""
    return sa.make_url(url).render_as_string(hide_password=True)


def make_engine(url: str) -> sa.Engine:
    parsed = sa.make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return _sqlite_engine(parsed)
    if backend == "postgresql":
        if parsed.drivername == "postgresql":  # plain postgresql:// would mean psycopg2
            parsed = parsed.set(drivername="postgresql+psycopg")
        if parsed.get_driver_name() != "psycopg":
            raise ValueError(
                f"database_url {redacted(parsed)}: use postgresql+psycopg:// (psycopg 3)"
            )
        # pre_ping: a replica outlives server restarts and idle-connection reaping.
        return sa.create_engine(parsed, pool_pre_ping=True, pool_size=5, max_overflow=5)
    raise ValueError(
        f"database_url {redacted(parsed)}: the registry runs on sqlite or postgresql+psycopg"
    )


def _sqlite_engine(url: sa.URL) -> sa.Engine:
    engine = sa.create_engine(
        url, connect_args={"timeout": BUSY_TIMEOUT_S, "check_same_thread": False}
    )

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # no implicit BEGINs: ours below only
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed write also survives power loss, not only a process crash.
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        finally:
            cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        if not connection.get_execution_options().get(READ_OPTION):
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine
