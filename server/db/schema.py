"""The registry's tables at the head revision (what `server.db.migrate` brings a database to).

Revision 0001's tables are unchanged since, so they are copied from the frozen baseline; a
migration that changes one of them defines it here afresh. `tests/test_registry_migrations.py`
checks that the migrated database and this metadata agree.
"""

from __future__ import annotations

import sqlalchemy as sa

from server.db import baseline

metadata = sa.MetaData()
for _table in baseline.metadata.sorted_tables:
    _table.to_metadata(metadata)

schema_version = metadata.tables["schema_version"]
voices = metadata.tables["voices"]
jobs = metadata.tables["jobs"]
key_usage = metadata.tables["key_usage"]
job_keys = metadata.tables["job_keys"]

# Revision 0002: a speaker row (slot) of a base model held for a voice being installed, from
# its allocation until its voices row exists. The primary key is what makes two replicas'
# concurrent allocations distinct; the voices_slot unique index still guards the rows.
slot_reservations = sa.Table(
    "slot_reservations",
    metadata,
    sa.Column("base_model", sa.Text, primary_key=True),
    sa.Column("slot", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("reserved_at", sa.Text, nullable=False),
)

# Revision 0004: API keys when `api_keys: database` (server/keystore_db.py). `edit_seq` is the
# number of the edit that last touched the row, unique and growing (revoked rows are kept).
api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("scope", sa.Text, nullable=False),
    sa.Column("hash", sa.Text, nullable=False),
    sa.Column("label", sa.Text, nullable=False),
    sa.Column("limits", sa.Text, nullable=False),
    sa.Column("created_at", sa.Text, nullable=False),
    sa.Column("updated_at", sa.Text, nullable=False),
    sa.Column("revoked_at", sa.Text, nullable=True),
    sa.Column("edit_seq", sa.Integer, nullable=False),
    sa.Index("api_keys_edit_seq", "edit_seq", unique=True),
)
