"""proposals.action_json: the exact canonical bytes an action's digest was taken over.

PostgreSQL's JSONB keeps a number's decimal value, not its double (``1e16`` comes back as the integer
10000000000000000, ``1e300`` as 301 digits), so a digest recomputed from the ``action`` column can differ
from the one the PDP signed, or not be computable at all. From now on the executor, approvals and verify
hash and parse ``action_json``, never the JSONB copy.

Existing rows are filled where it can be done without doubt: from the action of the proposal's own
``proposal.decided`` audit event, else from the stored action, and only with a text whose SHA-256 is the
row's ``action_digest``. A row left NULL is refused by the executor (``action.unreadable``).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from pdp.canonical import canonical_json, digest_of, loads

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_PAGE = 1000
_proposals = sa.table(
    "proposals",
    sa.column("id", sa.String),
    sa.column("action", sa.JSON().with_variant(postgresql.JSONB(), "postgresql")),
    sa.column("action_digest", sa.String),
    sa.column("action_json", sa.Text),
)
_events = sa.table("audit_events", sa.column("proposal_id", sa.String), sa.column("type", sa.String), sa.column("body"))


def _canonical(value: Any) -> bytes | None:
    try:
        return canonical_json(value)
    except (ValueError, TypeError):
        return None


def _recorded(body: str | None) -> Any:
    """The action in a ``proposal.decided`` event body, or None."""
    try:
        return loads(body or "")["data"]["action"]
    except (ValueError, TypeError, KeyError):
        return None


def upgrade() -> None:
    op.add_column("proposals", sa.Column("action_json", sa.Text(), nullable=True))
    conn = op.get_bind()
    # Proposals by pages of ids, then their decided events: a page over the join could split one proposal's rows.
    page = sa.select(_proposals.c.id, _proposals.c.action, _proposals.c.action_digest).order_by(_proposals.c.id)
    bodies = sa.select(_events.c.proposal_id, _events.c.body).where(_events.c.type == "proposal.decided")
    fill = sa.update(_proposals).where(_proposals.c.id == sa.bindparam("pid")).values(action_json=sa.bindparam("text"))
    after = ""
    while True:
        rows = conn.execute(page.where(_proposals.c.id > after).limit(_PAGE)).all()
        if not rows:
            return
        recorded: dict[str, list[str]] = {}
        for event in conn.execute(bodies.where(_events.c.proposal_id.in_([row.id for row in rows]))):
            recorded.setdefault(event.proposal_id, []).append(event.body)
        found: dict[str, str] = {}
        for row in rows:
            # The audit log's action first: it is hash-chained, the row is not.
            candidates = [_canonical(_recorded(body)) for body in recorded.get(row.id, [])] + [_canonical(row.action)]
            for text in candidates:
                if text is not None and row.id not in found and digest_of(text) == row.action_digest:
                    found[row.id] = text.decode("utf-8")
        if found:
            conn.execute(fill, [{"pid": pid, "text": text} for pid, text in found.items()])
        after = rows[-1].id


def downgrade() -> None:
    # Not batch mode: SQLite (3.35+) drops an unindexed column in place, where rebuilding the table would
    # trip the foreign keys of every execution, ticket and vote that points at a proposal.
    op.drop_column("proposals", "action_json")
