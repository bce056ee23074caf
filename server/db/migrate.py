"""Alembic migrations of the registry, run programmatically: at every start (`Registry`) and by
`voicefoundry db upgrade`.

One transaction does it all, so concurrent starts (two replicas, a CLI beside a server) take
turns: on SQLite it is a ``BEGIN IMMEDIATE`` write transaction (SQLite's DDL is transactional),
on PostgreSQL a transaction holding an advisory lock. A data dir made before alembic (its
``schema_version`` table but no ``alembic_version``) is migrated in place: the baseline tables it
lacks are created (the usage tables were made lazily), it is stamped at the baseline, then
upgraded; its rows stay as they are.

The old ``schema_version`` table is kept at 1: an older voicefoundry opening a migrated file
still works while the tables it knows are unchanged. A migration that changes them
incompatibly must raise that number, so the older copy refuses the file instead of misreading it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError

from server.db import baseline

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# pg_advisory_xact_lock key of the migration transaction ("vfdb" in ASCII).
_PG_LOCK_KEY = 0x76666462


class MigrationError(Exception):
    """The database cannot be brought to this voicefoundry's schema."""


@dataclass(frozen=True)
class Status:
    revision: str | None  # alembic's revision; None: not under alembic (yet)
    head: str  # the newest revision this voicefoundry ships
    legacy_version: int | None  # schema_version of a data dir made before alembic

    def describe(self) -> str:
        if self.revision is not None:
            return f"{self.revision}{' (head)' if self.revision == self.head else ''}"
        if self.legacy_version is not None:
            return f"none (pre-alembic registry, schema_version {self.legacy_version})"
        return "none (empty database)"


def _config(connection: sa.Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head() -> str:
    revision = ScriptDirectory.from_config(_config()).get_current_head()
    assert revision is not None  # the package ships its migrations
    return revision


def status(engine: sa.Engine) -> Status:
    """Where `engine`'s database stands; changes nothing."""
    with engine.connect() as connection:
        return _status(connection)


def upgrade(engine: sa.Engine, target: str = "head") -> Status:
    """Bring the database to `target` (in place for a pre-alembic data dir); its new status."""
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_LOCK_KEY)))
        found = _status(connection)
        config = _config(connection)
        if found.revision is None and found.legacy_version is not None:
            if found.legacy_version > baseline.SCHEMA_VERSION:
                raise MigrationError(
                    f"the registry has schema {found.legacy_version}; this voicefoundry reads "
                    f"schema {baseline.SCHEMA_VERSION} or older"
                )
            baseline.create(connection)
            command.stamp(config, baseline.REVISION)
        elif found.revision is not None:
            try:
                ScriptDirectory.from_config(config).get_revision(found.revision)
            except CommandError as exc:
                raise MigrationError(
                    f"the registry is at schema revision {found.revision!r}, which this "
                    f"voicefoundry does not know (made by a newer version?): {exc}"
                ) from exc
        command.upgrade(config, target)
        return _status(connection)


def _status(connection: sa.Connection) -> Status:
    revision = MigrationContext.configure(connection).get_current_revision()
    legacy: int | None = None
    if revision is None and sa.inspect(connection).has_table("schema_version"):
        query = sa.select(sa.func.max(baseline.schema_version.c.version))
        legacy = int(connection.execute(query).scalar_one_or_none() or 0)
    return Status(revision=revision, head=head(), legacy_version=legacy)
