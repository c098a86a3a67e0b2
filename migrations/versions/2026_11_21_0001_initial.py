"""Agents and proposals.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "agents",
        sa.Column("id", sa.String(200), nullable=False),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("roles", _JSON, nullable=False),
        sa.Column("labels", _JSON, nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("revoked_at", _TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agents")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_agents_token_hash")),
    )
    op.create_table(
        "proposals",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("agent_id", sa.String(200), nullable=False),
        sa.Column("session_id", sa.String(200), nullable=False),
        sa.Column("idempotency_key", sa.String(200), nullable=True),
        sa.Column("tool", sa.String(200), nullable=False),
        sa.Column("operation", sa.String(200), nullable=False),
        sa.Column("resource", sa.String(2048), nullable=False),
        sa.Column("action", _JSON, nullable=False),
        sa.Column("action_digest", sa.String(64), nullable=False),
        sa.Column("justification", sa.Text(), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("decision", _JSON, nullable=False),
        sa.Column("decision_input", _JSON, nullable=False),
        sa.Column("policy_version", sa.String(100), nullable=False),
        sa.Column("approval_expires_at", _TS, nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.ForeignKeyConstraint(["agent_id"], ["agents.id"], name=op.f("fk_proposals_agent_id_agents")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_proposals")),
        sa.UniqueConstraint("agent_id", "idempotency_key", name=op.f("uq_proposals_agent_id_idempotency_key")),
    )
    op.create_index("ix_proposals_agent_id_created_at", "proposals", ["agent_id", "created_at"])
    op.create_index("ix_proposals_state", "proposals", ["state"])


def downgrade() -> None:
    op.drop_index("ix_proposals_state", table_name="proposals")
    op.drop_index("ix_proposals_agent_id_created_at", table_name="proposals")
    op.drop_table("proposals")
    op.drop_table("agents")
