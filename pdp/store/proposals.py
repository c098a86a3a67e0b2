"""Reading and writing proposals. Every write is a unit of work for the group-commit writer."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, RowMapping, bindparam, select, update

from pdp.canonical import loads
from pdp.errors import AlreadyExists, FailedPrecondition, NotFound
from pdp.policy.decision import Decision
from pdp.proposals.states import ProposalState
from pdp.store.models import approvals, execution_tickets, executions, proposals

if TYPE_CHECKING:
    from pdp.execution.tickets import SignedTicket


@dataclass(frozen=True, slots=True)
class ExecutionRecord:
    """What the agent sees of an execution: status, result or error, and when."""

    status: str  # RUNNING | SUCCEEDED | FAILED | UNKNOWN
    attempt: int
    result: dict[str, Any] | None
    error: str
    started_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True, slots=True)
class ApprovalRecord:
    """One approver's verdict, as the agent sees it (a rejection's reason is its comment)."""

    approver_id: str
    verdict: str  # approve | reject
    comment: str
    decided_at: datetime


@dataclass(frozen=True, slots=True)
class ProposalRecord:
    id: str
    agent_id: str
    session_id: str
    idempotency_key: str
    action: dict[str, Any]
    # The canonical JSON ``action_digest`` is the SHA-256 of: what runs (None: a legacy row migration 0008
    # could not fill; the executor refuses it).
    action_json: str | None
    action_digest: str
    justification: str
    state: ProposalState
    decision: Decision
    decision_input: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    execution: ExecutionRecord | None = None
    approvals: tuple[ApprovalRecord, ...] = ()
    charged_usd: float = 0.0
    limited_by: str | None = None
    # The JSONB copy as read back (set by from_row): it must say what action_json says, or the row was edited.
    stored_action: dict[str, Any] | None = None

    def row(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "agent_id": self.agent_id,
            "session_id": self.session_id,
            "idempotency_key": self.idempotency_key or None,
            "tool": self.action["tool"],
            "operation": self.action["operation"],
            "resource": self.action["resource"],
            "action": self.action,
            "action_json": self.action_json,
            "action_digest": self.action_digest,
            "justification": self.justification,
            "state": self.state.value,
            "outcome": self.decision.outcome.value,
            "decision": self.decision.to_dict(),
            "decision_input": self.decision_input,
            "policy_version": self.decision.policy_version,
            "approval_expires_at": self.decision.approval_expires_at,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "charged_usd": self.charged_usd,
            "limited_by": self.limited_by,
        }

    @classmethod
    def from_row(cls, row: RowMapping) -> ProposalRecord:
        return cls(
            id=row["id"],
            agent_id=row["agent_id"],
            session_id=row["session_id"],
            idempotency_key=row["idempotency_key"] or "",
            action=_action(row),
            action_json=row["action_json"],
            action_digest=row["action_digest"],
            justification=row["justification"],
            state=ProposalState(row["state"]),
            decision=Decision.from_dict(row["decision"]),
            decision_input=row["decision_input"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            execution=_execution(row),
            charged_usd=float(row.get("charged_usd") or 0.0),
            limited_by=row.get("limited_by"),
            stored_action=row["action"],
        )


def _action(row: RowMapping) -> dict[str, Any]:
    """The action as digested (from ``action_json``), not JSONB's re-serialised copy, which can differ in its
    numbers (1e16 comes back as an integer, 1e300 as 301 digits). The copy serves only unreadable rows."""
    try:
        action = loads(row["action_json"])
    except (TypeError, ValueError):
        return row["action"]  # type: ignore[no-any-return]
    return action if isinstance(action, dict) else row["action"]


def _execution(row: RowMapping) -> ExecutionRecord | None:
    if row.get("execution_status") is None:
        return None
    return ExecutionRecord(
        status=row["execution_status"],
        attempt=row["execution_attempt"],
        result=row["execution_result"],
        error=row["execution_error"] or "",
        started_at=row["execution_started_at"],
        finished_at=row["execution_finished_at"],
    )


# A proposal with its execution, if any: one round trip for GetProposal and every watch poll.
_WITH_EXECUTION = select(
    proposals,
    executions.c.status.label("execution_status"),
    executions.c.attempt.label("execution_attempt"),
    executions.c.result.label("execution_result"),
    executions.c.error.label("execution_error"),
    executions.c.started_at.label("execution_started_at"),
    executions.c.finished_at.label("execution_finished_at"),
).select_from(proposals.outerjoin(executions, executions.c.proposal_id == proposals.c.id))


@dataclass(frozen=True, slots=True)
class Recorded:
    record: ProposalRecord
    # True when an earlier proposal with the same idempotency key was returned instead.
    replayed: bool


# Built once: executing a constant statement with a parameter dict skips per-row statement
# construction and coercion, which dominated the writer thread's time.
_INSERT = proposals.insert()


def find_replay(conn: Connection, agent_id: str, key: str, action_digest: str) -> Recorded | None:
    """The earlier proposal with this idempotency key, if any (AlreadyExists when its action differs)."""
    if not key:
        return None
    row = (
        conn.execute(select(proposals).where(proposals.c.agent_id == agent_id, proposals.c.idempotency_key == key))
        .mappings()
        .first()
    )
    if row is None:
        return None
    earlier = ProposalRecord.from_row(row)
    if earlier.action_digest != action_digest:
        raise AlreadyExists(f"idempotency_key {key!r} was already used for a different action (proposal {earlier.id})")
    return Recorded(earlier, replayed=True)


def record_proposal(conn: Connection, record: ProposalRecord) -> None:
    """Insert a decided proposal. The caller looked for a replay (:func:`find_replay`) under the chain's lock,
    so no one else can have used its idempotency key since; the unique key still guards the table."""
    conn.execute(_INSERT, record.row())


def get_proposal(conn: Connection, proposal_id: str, agent_id: str) -> ProposalRecord:
    """One of the agent's proposals; another agent's id is indistinguishable from an unknown one."""
    row = (
        conn.execute(_WITH_EXECUTION.where(proposals.c.id == proposal_id, proposals.c.agent_id == agent_id))
        .mappings()
        .first()
    )
    if row is None:
        raise NotFound(f"proposal {proposal_id!r} not found")
    record = ProposalRecord.from_row(row)
    if record.decision.approval_requirements:  # only these can have votes
        votes = conn.execute(_APPROVALS, {"proposal_id": proposal_id}).all()
        record = replace(record, approvals=tuple(ApprovalRecord(*vote) for vote in votes))
    return record


_APPROVALS = (
    select(approvals.c.approver_id, approvals.c.verdict, approvals.c.comment, approvals.c.decided_at)
    .where(approvals.c.proposal_id == bindparam("proposal_id"))
    .order_by(approvals.c.decided_at, approvals.c.approver_id)
)
_INSERT_TICKET = execution_tickets.insert()


def insert_ticket(conn: Connection, ticket: SignedTicket) -> None:
    conn.execute(_INSERT_TICKET, ticket.row())


def cancel_proposal(conn: Connection, proposal_id: str, agent_id: str, now: datetime) -> ProposalRecord:
    """PENDING_APPROVAL → CANCELLED, atomically; any other state is left alone."""
    done = conn.execute(
        update(proposals)
        .where(
            proposals.c.id == proposal_id,
            proposals.c.agent_id == agent_id,
            proposals.c.state == ProposalState.PENDING_APPROVAL.value,
        )
        .values(state=ProposalState.CANCELLED.value, updated_at=now)
    )
    record = get_proposal(conn, proposal_id, agent_id)
    if done.rowcount == 0:
        raise FailedPrecondition(
            f"proposal {proposal_id!r} is {record.state.value}; only PENDING_APPROVAL can be cancelled"
        )
    return record


def get_proposal_for_update(conn: Connection, proposal_id: str) -> ProposalRecord:
    """Any agent's proposal, row-locked on PostgreSQL, for a transition inside the caller's transaction."""
    query = select(proposals).where(proposals.c.id == proposal_id)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update()
    row = conn.execute(query).mappings().first()
    if row is None:
        raise NotFound(f"proposal {proposal_id!r} not found")
    return ProposalRecord.from_row(row)
