"""The approvers' pending list, one page at a time.

One agent may hold many pending proposals (up to ``PDP_MAX_PENDING_PER_AGENT`` each), so a list request must
never load them all: it reads one page of rows, in a stable order (oldest first: ``created_at``, then ``id``),
and hands out opaque cursors for the pages before and after it (keyset pagination, so a page's cursor stays
valid while proposals come and go).

Eligibility is filtered in SQL as far as SQL can see it: pending and not past its deadline, not owned by the
approver, not voted on by them, and needing one of their groups. The exact test (identities compared by
:func:`~pdp.identity.names.identity_key`, which SQL cannot compute) is applied to the page's rows afterwards;
the SQL filters only ever remove rows that test would remove too (they compare exact spellings, or
lowercased ASCII group names), so a page can come out shorter, never wrong.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Row,
    TextClause,
    and_,
    bindparam,
    exists,
    literal_column,
    or_,
    select,
    text,
)

from pdp.errors import InvalidArgument
from pdp.identity.approvers import Approver
from pdp.identity.names import identity_key
from pdp.proposals.states import ProposalState
from pdp.store.models import agents, approvals, proposals

DEFAULT_PAGE = 50
MAX_PAGE = 200
MAX_CURSOR = 200

# A literal, not a bound parameter: SQLite (and PostgreSQL's generic plans) can use the partial indexes on
# pending proposals (migration 0007) only when the query names the same constant.
PENDING_STATE: ColumnElement[str] = literal_column(f"'{ProposalState.PENDING_APPROVAL.value}'")

# The decision names its groups in JSON; each dialect has its own way to look inside.
_NEEDS_ONE_OF = {
    "sqlite": "EXISTS (SELECT 1 FROM json_each(proposals.decision, '$.approval_requirements') AS r, "
    "json_each(r.value, '$.groups') AS g WHERE lower(g.value) IN :groups)",
    "postgresql": "EXISTS (SELECT 1 FROM jsonb_array_elements(proposals.decision -> 'approval_requirements') AS r, "
    "jsonb_array_elements_text(r.value -> 'groups') AS g WHERE lower(g.value) IN :groups)",
}


@dataclass(frozen=True, slots=True)
class Cursor:
    """A position between two rows: the page ``after`` it (newer) or ``before`` it (older)."""

    after: bool
    created_at: datetime
    proposal_id: str

    def encode(self) -> str:
        raw = f"{'a' if self.after else 'b'}|{self.created_at.isoformat()}|{self.proposal_id}"
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, value: str) -> Cursor:
        try:
            if len(value) > MAX_CURSOR:
                raise ValueError("too long")
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
            direction, created_at, proposal_id = raw.split("|")
            if direction not in ("a", "b") or len(proposal_id) > 36:
                raise ValueError("not a cursor")
            when = datetime.fromisoformat(created_at)
            if when.tzinfo is None:
                raise ValueError("no time zone")
        except (ValueError, UnicodeDecodeError, binascii.Error):
            raise InvalidArgument("cursor", "is not a cursor this list handed out") from None
        return cls(direction == "a", when, proposal_id)


@dataclass(frozen=True, slots=True)
class Page:
    rows: list[Row[Any]]
    next: Cursor | None
    prev: Cursor | None


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidArgument("limit", f"must be 1 to {MAX_PAGE}")
    return limit


_FROM = proposals.join(agents, agents.c.id == proposals.c.agent_id)
_COLUMNS = select(proposals, agents.c.revoked_at.label("agent_revoked_at")).select_from(_FROM)
_ASCENDING = (proposals.c.created_at, proposals.c.id)
_DESCENDING = (proposals.c.created_at.desc(), proposals.c.id.desc())


def _eligible(conn: Connection, approver: Approver, now: datetime) -> list[ColumnElement[bool] | TextClause]:
    groups = sorted({identity_key(g) for g in approver.groups})
    return [
        proposals.c.state == PENDING_STATE,
        proposals.c.approval_expires_at > now,
        agents.c.owner != approver.id,
        ~exists().where(approvals.c.proposal_id == proposals.c.id, approvals.c.approver_id == approver.id),
        text(_NEEDS_ONE_OF[conn.dialect.name]).bindparams(bindparam("groups", value=groups, expanding=True)),
    ]


def _after(at: Cursor) -> ColumnElement[bool]:
    return or_(
        proposals.c.created_at > at.created_at,
        and_(proposals.c.created_at == at.created_at, proposals.c.id > at.proposal_id),
    )


def _before(at: Cursor) -> ColumnElement[bool]:
    return or_(
        proposals.c.created_at < at.created_at,
        and_(proposals.c.created_at == at.created_at, proposals.c.id < at.proposal_id),
    )


def pending_page(conn: Connection, approver: Approver, now: datetime, limit: int, cursor: Cursor | None) -> Page:
    """At most ``limit`` rows (proposal columns and ``agent_revoked_at``) the approver may be able to decide."""
    check_limit(limit)
    if not approver.groups:
        return Page([], None, None)
    where = _eligible(conn, approver, now)

    def any_row(condition: ColumnElement[bool]) -> bool:
        query = select(proposals.c.id).select_from(_FROM).where(*where, condition).limit(1)
        return conn.execute(query).first() is not None

    if cursor is None or cursor.after:
        bound = [_after(cursor)] if cursor is not None else []
        found = list(conn.execute(_COLUMNS.where(*where, *bound).order_by(*_ASCENDING).limit(limit + 1)))
        rows = found[:limit]
        next_ = Cursor(True, rows[-1].created_at, rows[-1].id) if len(found) > limit else None
        prev = None
        if cursor is not None:  # the first page has nothing before it
            pivot = Cursor(False, rows[0].created_at, rows[0].id) if rows else replace(cursor, after=False)
            prev = pivot if any_row(_before(pivot)) else None
        return Page(rows, next_, prev)
    found = list(conn.execute(_COLUMNS.where(*where, _before(cursor)).order_by(*_DESCENDING).limit(limit + 1)))
    rows = found[:limit][::-1]
    prev = Cursor(False, rows[0].created_at, rows[0].id) if len(found) > limit else None
    pivot = Cursor(True, rows[-1].created_at, rows[-1].id) if rows else replace(cursor, after=True)
    return Page(rows, pivot if any_row(_after(pivot)) else None, prev)
