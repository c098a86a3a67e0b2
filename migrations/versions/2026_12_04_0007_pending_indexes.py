"""Partial indexes on pending proposals: the per-agent pending cap and the approvers' paginated list.

Only rows in PENDING_APPROVAL are indexed, so a proposal that is allowed or denied costs no index write, and
both indexes stay as small as what is waiting for humans. Queries name the state as the same literal
(pdp/governance/pending.py, pdp/approvals/listing.py), which is what lets SQLite and PostgreSQL use them.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_PENDING = sa.text("state = 'PENDING_APPROVAL'")


def upgrade() -> None:
    op.create_index(
        "ix_proposals_pending_agent",
        "proposals",
        ["agent_id", "approval_expires_at"],
        sqlite_where=_PENDING,
        postgresql_where=_PENDING,
    )
    op.create_index(
        "ix_proposals_pending_created",
        "proposals",
        ["state", "created_at", "id"],
        sqlite_where=_PENDING,
        postgresql_where=_PENDING,
    )


def downgrade() -> None:
    op.drop_index("ix_proposals_pending_created", table_name="proposals")
    op.drop_index("ix_proposals_pending_agent", table_name="proposals")
