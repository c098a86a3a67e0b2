"""Governance: limit counters, quarantines, and what each proposal charged or was limited by.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column("proposals", sa.Column("charged_usd", sa.Float(), server_default="0", nullable=False))
    op.add_column("proposals", sa.Column("limited_by", sa.String(128), nullable=True))
    op.create_table(
        "limit_counters",
        sa.Column("limit_id", sa.String(128), nullable=False),
        sa.Column("scope_key", sa.String(512), nullable=False),
        sa.Column("window_start", _TS, nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("amount", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("limit_id", "scope_key", "window_start", name=op.f("pk_limit_counters")),
    )
    op.create_table(
        "quarantines",
        sa.Column("agent_id", sa.String(200), nullable=False),
        sa.Column("limit_id", sa.String(128), nullable=False),
        sa.Column("until", _TS, nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("released_at", _TS, nullable=True),
        sa.Column("released_by", sa.String(200), nullable=True),
        sa.ForeignKeyConstraint(["agent_id"], ["agents.id"], name=op.f("fk_quarantines_agent_id_agents")),
        sa.PrimaryKeyConstraint("agent_id", name=op.f("pk_quarantines")),
    )


def downgrade() -> None:
    op.drop_table("quarantines")
    op.drop_table("limit_counters")
    with op.batch_alter_table("proposals") as batch:
        batch.drop_column("limited_by")
        batch.drop_column("charged_usd")
