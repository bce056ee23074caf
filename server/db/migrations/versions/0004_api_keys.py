"""API keys in the registry's database (`api_keys: database`), so every replica sharing a
`database_url` authenticates against one set of keys (server/keystore_db.py).

A row holds what a key file's entry holds (id, scope, PBKDF2 hash, label, limits as JSON text)
plus when it was made, last changed and revoked. A revoked key keeps its row (hash cleared), so
the edit counter `edit_seq` only ever grows: a server compares max(edit_seq) with what it loaded
to see that anything changed.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("hash", sa.Text, nullable=False),
        sa.Column("label", sa.Text, nullable=False),
        sa.Column("limits", sa.Text, nullable=False),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.Column("updated_at", sa.Text, nullable=False),
        sa.Column("revoked_at", sa.Text, nullable=True),
        sa.Column("edit_seq", sa.Integer, nullable=False),
    )
    op.create_index("api_keys_edit_seq", "api_keys", ["edit_seq"], unique=True)


def downgrade() -> None:
    op.drop_index("api_keys_edit_seq", table_name="api_keys")
    op.drop_table("api_keys")
