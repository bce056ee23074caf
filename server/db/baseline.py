"""The registry's schema at alembic revision 0001: exactly what the sqlite3-only registry (and
its usage meter) created, frozen. Never edit it: later changes are new migrations, and
`server.db.schema` describes the head.

It is a module rather than only the body of migration 0001 because a data dir made before
alembic needs it too: its usage tables were created lazily (only by a server that ran), so
`server.db.migrate` creates whichever of these tables it lacks before stamping it at 0001.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite

REVISION = "0001"
SCHEMA_VERSION = 1  # the sqlite3-only registry's own counter, kept for older voicefoundry copies

# SQLite REAL is an 8-byte float; PostgreSQL's REAL is 4 bytes, so DOUBLE PRECISION there.
Real: sa.types.TypeEngine[float] = sa.Double().with_variant(sqlite.REAL(), "sqlite")


def _text_key(name: str) -> sa.Column[str]:
    # `TEXT PRIMARY KEY` as the old DDL wrote it: SQLite then records no NOT NULL (a quirk kept
    # so both kinds of file are alike); PostgreSQL's primary key implies NOT NULL anyway.
    return sa.Column(name, sa.Text, primary_key=True, nullable=True)


metadata = sa.MetaData()

schema_version = sa.Table(
    "schema_version", metadata, sa.Column("version", sa.Integer, nullable=False)
)

voices = sa.Table(
    "voices",
    metadata,
    _text_key("name"),
    sa.Column("base_model", sa.Text, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("adapter", sa.Text),
    sa.Column("slot", sa.Integer),
    sa.Column("ref_clip", sa.Text),
    sa.Column("default_language", sa.Text),
    sa.Column("meta", sa.Text, nullable=False, server_default=sa.text("'{}'")),
    sa.Column("created_at", sa.Text, nullable=False),
    sa.Index("voices_base_model", "base_model"),
    sa.Index(
        "voices_slot",
        "base_model",
        "slot",
        unique=True,
        sqlite_where=sa.text("slot IS NOT NULL"),
        postgresql_where=sa.text("slot IS NOT NULL"),
    ),
)

jobs = sa.Table(
    "jobs",
    metadata,
    _text_key("id"),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("created_at", sa.Text, nullable=False),
    sa.Column("updated_at", sa.Text, nullable=False),
    sa.Column("payload", sa.Text, nullable=False, server_default=sa.text("'{}'")),
    sa.Index("jobs_state", "state"),
)

key_usage = sa.Table(
    "key_usage",
    metadata,
    sa.Column("key_id", sa.Text, primary_key=True, nullable=False),
    sa.Column("day", sa.Text, primary_key=True, nullable=False),
    sa.Column("requests", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("characters", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("audio_seconds", Real, nullable=False, server_default=sa.text("0")),
    sa.Column("duplex_seconds", Real, nullable=False, server_default=sa.text("0")),
    sa.Column("training_seconds", Real, nullable=False, server_default=sa.text("0")),
)

job_keys = sa.Table(
    "job_keys",
    metadata,
    _text_key("job_id"),
    sa.Column("key_id", sa.Text, nullable=False),
)


def create(bind: sa.Connection) -> list[str]:
    """Create the tables (and their indexes) `bind`'s database lacks; the names created.
    `schema_version` gets its one row when it has none."""
    existing = set(sa.inspect(bind).get_table_names())
    missing = [t for t in metadata.sorted_tables if t.name not in existing]
    metadata.create_all(bind, tables=missing)
    if bind.execute(sa.select(sa.func.count()).select_from(schema_version)).scalar_one() == 0:
        bind.execute(schema_version.insert().values(version=SCHEMA_VERSION))
    return [t.name for t in missing]


def drop(bind: sa.Connection) -> None:
    metadata.drop_all(bind)
