"""The training workers' task queue: procrastinate's tables, functions and triggers, on
PostgreSQL only (an embedded SQLite registry runs its jobs in the server and has no queue).

The schema is the one procrastinate ships (`SchemaManager.get_schema()`) for the version pinned
in pyproject.toml (3.10.0). Moving to a newer procrastinate is a new migration here that applies
its own SQL migrations (`SchemaManager.get_migrations_path()`) from 3.10.0 on, in their order.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from typing import Any

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    from procrastinate.schema import SchemaManager

    # psycopg runs a query without parameters as it is: several statements, `%` and `:=` intact.
    _psycopg(bind).execute(SchemaManager.get_schema())


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    raw = _psycopg(bind)
    tables = raw.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
        "AND tablename LIKE 'procrastinate%'"
    ).fetchall()
    for (table,) in tables:
        raw.execute(f'DROP TABLE IF EXISTS "{table}" CASCADE')
    functions = raw.execute(
        "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n "
        "ON n.oid = p.pronamespace WHERE n.nspname = current_schema() "
        "AND p.proname LIKE 'procrastinate%'"
    ).fetchall()
    for (function,) in functions:
        raw.execute(f"DROP FUNCTION IF EXISTS {function} CASCADE")
    types = raw.execute(
        "SELECT t.typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace "
        "WHERE n.nspname = current_schema() AND t.typname LIKE 'procrastinate%' "
        "AND t.typtype = 'e'"
    ).fetchall()
    for (type_name,) in types:
        raw.execute(f'DROP TYPE IF EXISTS "{type_name}" CASCADE')


def _psycopg(bind: Any) -> Any:
    """The psycopg connection under SQLAlchemy's."""
    raw = bind.connection.driver_connection
    assert raw is not None
    return raw
