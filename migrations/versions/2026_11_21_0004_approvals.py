"""Approvals: approver identities and their votes.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "approvers",
        sa.Column("id", sa.String(200), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("groups", _JSON, nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("revoked_at", _TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_approvers")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_approvers_token_hash")),
    )
    op.create_table(
        "approvals",
        sa.Column("proposal_id", sa.String(36), nullable=False),
        sa.Column("approver_id", sa.String(200), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("comment", sa.Text(), nullable=False),
        sa.Column("groups", _JSON, nullable=False),
        sa.Column("action_digest", sa.String(64), nullable=False),
        sa.Column("decided_at", _TS, nullable=False),
        sa.ForeignKeyConstraint(["proposal_id"], ["proposals.id"], name=op.f("fk_approvals_proposal_id_proposals")),
        sa.ForeignKeyConstraint(["approver_id"], ["approvers.id"], name=op.f("fk_approvals_approver_id_approvers")),
        sa.PrimaryKeyConstraint("proposal_id", "approver_id", name=op.f("pk_approvals")),
    )


def downgrade() -> None:
    op.drop_table("approvals")
    op.drop_table("approvers")
