"""The registry as the sqlite3-only code made it: voices, jobs, schema_version, key_usage and
job_keys (server/db/baseline.py, frozen).

Revision ID: 0001
Revises:
"""

from __future__ import annotations

from alembic import op
from server.db import baseline

revision = baseline.REVISION
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    baseline.create(op.get_bind())


def downgrade() -> None:
    baseline.drop(op.get_bind())
