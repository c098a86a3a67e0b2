"""The schema, as SQLAlchemy 2.0 models. Alembic migrations are the only way it changes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
    func,
    text,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Stable constraint names, so migrations can refer to them on every database.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JSONDocument = JSON().with_variant(postgresql.JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """Always timezone-aware UTC in Python; SQLite stores naive UTC text, PostgreSQL timestamptz."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSONDocument, list[Any]: JSONDocument}


class Agent(Base):
    """An agent identity. Only the SHA-256 of its token is stored."""

    __tablename__ = "agents"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200))
    roles: Mapped[list[Any]]
    labels: Mapped[dict[str, Any]]
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]


_PENDING = "state = 'PENDING_APPROVAL'"


class Proposal(Base):
    """One action proposal, its decision, and its current state."""

    __tablename__ = "proposals"
    __table_args__ = (
        UniqueConstraint("agent_id", "idempotency_key"),
        Index("ix_proposals_agent_id_created_at", "agent_id", "created_at"),
        Index("ix_proposals_state", "state"),
        # Partial: only proposals waiting for approval (the pending cap, the approvers' paginated list).
        Index(
            "ix_proposals_pending_agent",
            "agent_id",
            "approval_expires_at",
            sqlite_where=text(_PENDING),
            postgresql_where=text(_PENDING),
        ),
        Index(
            "ix_proposals_pending_created",
            "state",  # leading, with the ORDER BY after it: the planner then prefers this index to ix_proposals_state
            "created_at",
            "id",
            sqlite_where=text(_PENDING),
            postgresql_where=text(_PENDING),
        ),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    agent_id: Mapped[str] = mapped_column(String(200), ForeignKey("agents.id"))
    session_id: Mapped[str] = mapped_column(String(200))
    # NULL when the agent gave none: several NULLs never collide in the unique constraint.
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    tool: Mapped[str] = mapped_column(String(200))
    operation: Mapped[str] = mapped_column(String(200))
    resource: Mapped[str] = mapped_column(String(2048))
    # The full action as proposed (tool, operation, resource, params, estimated_cost_usd, labels).
    action: Mapped[dict[str, Any]]
    # The exact canonical JSON (RFC 8785) bytes the PDP digested: the form that runs and that approvals and
    # tickets bind to. `action` is a queryable copy that the database may re-serialise (JSONB rewrites
    # numbers), so nothing is digested or executed from it. NULL only on rows migration 0008 could not fill.
    action_json: Mapped[str | None] = mapped_column(Text)
    # SHA-256 of `action_json`; approvals and tickets bind to it.
    action_digest: Mapped[str] = mapped_column(String(64))
    justification: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(32))
    outcome: Mapped[str] = mapped_column(String(32))
    decision: Mapped[dict[str, Any]]
    # What the decision depended on besides the action (agent snapshot, now, environment, usage).
    decision_input: Mapped[dict[str, Any]]
    policy_version: Mapped[str] = mapped_column(String(100))
    approval_expires_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    # Estimated spend counted against budgets: the cost once allowed or approved, else 0 (usage.*).
    charged_usd: Mapped[float] = mapped_column(Float, server_default="0")
    # The governance limit that changed this proposal's outcome, if one did (retry storms ignore those).
    limited_by: Mapped[str | None] = mapped_column(String(128))


class AuditEvent(Base):
    """The append-only, hash-chained audit log (see pdp/audit/chain.py and docs/audit-format.md).

    No secondary unique keys: on SQLite, INSERT OR REPLACE resolves a unique conflict by deleting the
    old row without firing DELETE triggers, so the only key is the primary key, and a trigger refuses
    any insert that does not extend the chain head.
    """

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_events_proposal_id", "proposal_id"),
        Index("ix_audit_events_agent_id", "agent_id"),
        Index("ix_audit_events_type", "type"),
    )

    chain: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    event_id: Mapped[str] = mapped_column(String(36))
    # Set by the database, informational: not hashed (the body carries the event's own time).
    recorded_at: Mapped[datetime] = mapped_column(server_default=func.current_timestamp())
    type: Mapped[str] = mapped_column(String(64))
    proposal_id: Mapped[str | None] = mapped_column(String(36))
    agent_id: Mapped[str | None] = mapped_column(String(200))
    actor: Mapped[str] = mapped_column(String(200))
    policy_version: Mapped[str] = mapped_column(String(100))
    # The exact canonical JSON bytes that were hashed (text, not JSONB, which would re-serialise them).
    body: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditCheckpoint(Base):
    """Signed chain heads; also appended to a file outside the database."""

    __tablename__ = "audit_checkpoints"

    chain: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    head_hash: Mapped[str] = mapped_column(String(64))
    signed_at: Mapped[datetime]
    key_id: Mapped[str] = mapped_column(String(32))
    signature: Mapped[str] = mapped_column(String(128))


class ExecutionTicket(Base):
    """The PDP's signed permission to execute one proposal's exact action (see pdp/execution/tickets.py).

    The executor trusts the signature, not this row: editing it, or forging one, makes nothing run.
    """

    __tablename__ = "execution_tickets"

    proposal_id: Mapped[str] = mapped_column(String(36), ForeignKey("proposals.id"), primary_key=True)
    ticket_id: Mapped[str] = mapped_column(String(36))
    # The exact canonical JSON bytes that were signed.
    payload: Mapped[str] = mapped_column(Text)
    signature: Mapped[str] = mapped_column(String(128))
    key_id: Mapped[str] = mapped_column(String(32))
    expires_at: Mapped[datetime]


class Execution(Base):
    """One proposal's execution: who holds it (worker, lease), which attempt, and how it ended."""

    __tablename__ = "executions"
    __table_args__ = (Index("ix_executions_lease_expires_at", "lease_expires_at"),)

    proposal_id: Mapped[str] = mapped_column(String(36), ForeignKey("proposals.id"), primary_key=True)
    tool: Mapped[str] = mapped_column(String(200))
    attempt: Mapped[int] = mapped_column(Integer)
    # RUNNING | SUCCEEDED | FAILED | UNKNOWN
    status: Mapped[str] = mapped_column(String(16))
    worker: Mapped[str | None] = mapped_column(String(200))
    # A running execution whose lease lapsed was abandoned by a crashed worker.
    lease_expires_at: Mapped[datetime | None]
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    result: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(Text)


class CircuitBreaker(Base):
    """Circuit breakers shared by every executor and PDP replica (DESIGN §6; the rules: executor/breakers.py).

    ``agent_id = ''`` is the tool-wide breaker, which denies the tool to every agent. A row with an agent is
    that agent's own breaker on the tool, which denies it to that agent alone, and the agent's part in the
    tool's current failure streak.
    """

    __tablename__ = "circuit_breakers"

    tool: Mapped[str] = mapped_column(String(200), primary_key=True)
    agent_id: Mapped[str] = mapped_column(String(200), primary_key=True, server_default="")
    # Tool-wide: the failures of its current streak. An agent's: that agent's own consecutive failures.
    consecutive_failures: Mapped[int] = mapped_column(Integer)
    # Set while open; the PDP denies the tool (to the row's agent) until then. Past it, it is half-open.
    opened_until: Mapped[datetime | None]
    # The one execution allowed through while half-open.
    trial_proposal_id: Mapped[str | None] = mapped_column(String(36))
    # Agent rows only: the agent's failures in the tool's current streak, and whether it succeeded since the
    # streak began.
    streak_failures: Mapped[int] = mapped_column(Integer, server_default="0")
    streak_succeeded: Mapped[bool] = mapped_column(Boolean, server_default=false())
    updated_at: Mapped[datetime]


class LimitCounter(Base):
    """Fixed-window counters of rate and budget limits, updated in the transaction that records the proposal."""

    __tablename__ = "limit_counters"

    limit_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    scope_key: Mapped[str] = mapped_column(String(512), primary_key=True)
    window_start: Mapped[datetime] = mapped_column(primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger)
    amount: Mapped[float] = mapped_column(Float)


class Quarantine(Base):
    """An agent stopped by a retry-storm limit until ``until``, or until a human releases it."""

    __tablename__ = "quarantines"

    agent_id: Mapped[str] = mapped_column(String(200), ForeignKey("agents.id"), primary_key=True)
    limit_id: Mapped[str] = mapped_column(String(128))
    until: Mapped[datetime]
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime]
    released_at: Mapped[datetime | None]
    released_by: Mapped[str | None] = mapped_column(String(200))


class Approver(Base):
    """A human who may approve or reject proposals for the groups they belong to. Token stored hashed."""

    __tablename__ = "approvers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    groups: Mapped[list[Any]]
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]


class ApprovalVote(Base):
    """One approver's verdict on one proposal; the key makes a second vote by the same approver impossible."""

    __tablename__ = "approvals"

    proposal_id: Mapped[str] = mapped_column(String(36), ForeignKey("proposals.id"), primary_key=True)
    approver_id: Mapped[str] = mapped_column(String(200), ForeignKey("approvers.id"), primary_key=True)
    verdict: Mapped[str] = mapped_column(String(16))  # approve | reject
    comment: Mapped[str] = mapped_column(Text)
    # The approver's groups when they voted: quorum counts membership at the time of the vote.
    groups: Mapped[list[Any]]
    # The digest of the action the approver saw: an approval binds to exactly that action.
    action_digest: Mapped[str] = mapped_column(String(64))
    decided_at: Mapped[datetime]


agents = cast(Table, Agent.__table__)
proposals = cast(Table, Proposal.__table__)
audit_events = cast(Table, AuditEvent.__table__)
audit_checkpoints = cast(Table, AuditCheckpoint.__table__)
execution_tickets = cast(Table, ExecutionTicket.__table__)
executions = cast(Table, Execution.__table__)
circuit_breakers = cast(Table, CircuitBreaker.__table__)
approvers = cast(Table, Approver.__table__)
approvals = cast(Table, ApprovalVote.__table__)
limit_counters = cast(Table, LimitCounter.__table__)
quarantines = cast(Table, Quarantine.__table__)
