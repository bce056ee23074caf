"""Alembic's environment for the registry: always online, on the connection (and transaction)
`server.db.migrate` passes in; there is no alembic.ini."""

from __future__ import annotations

from alembic import context
from server.db.schema import metadata

connection = context.config.attributes.get("connection")
if context.is_offline_mode() or connection is None:
    raise RuntimeError("registry migrations run through server.db.migrate: voicefoundry db upgrade")

# render_as_batch: SQLite alters a table by copying it; alembic's batch mode does that.
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
