"""Speaker rows (slots) reserved in the database while a voice is installed, so two replicas
never bake two voices of one base model into the same row.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "slot_reservations",
        sa.Column("base_model", sa.Text, primary_key=True),
        sa.Column("slot", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("reserved_at", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("slot_reservations")
