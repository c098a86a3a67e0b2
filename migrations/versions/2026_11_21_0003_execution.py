"""Execution: signed tickets, executions with leases, per-tool circuit breakers.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "execution_tickets",
        sa.Column("proposal_id", sa.String(36), nullable=False),
        sa.Column("ticket_id", sa.String(36), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("signature", sa.String(128), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("expires_at", _TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["proposal_id"], ["proposals.id"], name=op.f("fk_execution_tickets_proposal_id_proposals")
        ),
        sa.PrimaryKeyConstraint("proposal_id", name=op.f("pk_execution_tickets")),
    )
    op.create_table(
        "executions",
        sa.Column("proposal_id", sa.String(36), nullable=False),
        sa.Column("tool", sa.String(200), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("worker", sa.String(200), nullable=True),
        sa.Column("lease_expires_at", _TS, nullable=True),
        sa.Column("started_at", _TS, nullable=False),
        sa.Column("finished_at", _TS, nullable=True),
        sa.Column("result", _JSON, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["proposal_id"], ["proposals.id"], name=op.f("fk_executions_proposal_id_proposals")),
        sa.PrimaryKeyConstraint("proposal_id", name=op.f("pk_executions")),
    )
    op.create_index("ix_executions_lease_expires_at", "executions", ["lease_expires_at"])
    op.create_table(
        "circuit_breakers",
        sa.Column("tool", sa.String(200), nullable=False),
        sa.Column("consecutive_failures", sa.Integer(), nullable=False),
        sa.Column("opened_until", _TS, nullable=True),
        sa.Column("trial_proposal_id", sa.String(36), nullable=True),
        sa.Column("updated_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("tool", name=op.f("pk_circuit_breakers")),
    )


def downgrade() -> None:
    op.drop_table("circuit_breakers")
    op.drop_index("ix_executions_lease_expires_at", table_name="executions")
    op.drop_table("executions")
    op.drop_table("execution_tickets")
