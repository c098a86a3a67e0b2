"""Circuit breakers per agent: an agent column ('' for the tool-wide breaker) and each agent's part in the streak.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("circuit_breakers") as batch:
        batch.add_column(sa.Column("agent_id", sa.String(200), server_default="", nullable=False))
        batch.add_column(sa.Column("streak_failures", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("streak_succeeded", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch.drop_constraint("pk_circuit_breakers", type_="primary")
        batch.create_primary_key("pk_circuit_breakers", ["tool", "agent_id"])
    # Existing rows become the tool-wide breakers. A closed one's count was never attributed to agents: it starts
    # over (open and half-open ones keep their state and their trial).
    op.execute("UPDATE circuit_breakers SET consecutive_failures = 0 WHERE opened_until IS NULL")


def downgrade() -> None:
    op.execute("DELETE FROM circuit_breakers WHERE agent_id <> ''")
    with op.batch_alter_table("circuit_breakers") as batch:
        batch.drop_constraint("pk_circuit_breakers", type_="primary")
        batch.create_primary_key("pk_circuit_breakers", ["tool"])
        batch.drop_column("streak_succeeded")
        batch.drop_column("streak_failures")
        batch.drop_column("agent_id")
