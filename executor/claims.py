"""The executor's transactions: claim approved work, finish it, renew leases, recover abandoned work.

Each function is one transaction's worth of work on a connection the caller opened with
``engine.begin()``. Every state change appends its audit event in the same transaction.

Every transaction here takes the audit chain's lock first (a PostgreSQL advisory lock held to the
end of the transaction, which the executor's writer takes before any savepoint; SQLite's ``BEGIN
IMMEDIATE`` is one lock anyway), as every PDP writer does.
So the executors' transactions, and the PDP's, never overlap: two executors cannot claim the same
proposal, no row lock is needed, and no two writers can deadlock. Executors still work in parallel
where it matters, in the connector calls between their short transactions.

At most once: a job's transition to ``EXECUTING`` (with its ``execution.started`` event) commits
before the connector is called. A ticket is used once: a first start needs zero earlier
``execution.started`` events in the append-only audit log for the proposal, which a reset of the
proposal row cannot undo.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import ColumnElement, Connection, func, insert, select, update

from executor import breakers
from executor.config import BreakerSettings
from pdp.audit import chain
from pdp.audit.chain import Event
from pdp.canonical import timestamp
from pdp.execution import tickets
from pdp.execution.tickets import TicketRefused, VerifiedTicket
from pdp.policy.catalog import CatalogViolation, Tool, resolve
from pdp.proposals.states import ProposalState
from pdp.store.models import audit_events, execution_tickets, executions, proposals

STARTED = "execution.started"
RUNNING, SUCCEEDED, FAILED, UNKNOWN = "RUNNING", "SUCCEEDED", "FAILED", "UNKNOWN"


@dataclass(frozen=True, slots=True)
class Job:
    """One claimed execution: everything the worker needs, read from the verified proposal."""

    proposal_id: str
    agent_id: str
    tool: Tool
    action: dict[str, Any]
    attempt: int
    policy_version: str


@dataclass(frozen=True, slots=True)
class Lease:
    worker: str
    duration: timedelta


def _event(kind: str, row: Any, actor: str, now: datetime, policy_version: str | None = None, **data: Any) -> Event:
    """An execution event; ``policy_version`` from the verified ticket when there is one (the row's is unsigned)."""
    action = row.action if isinstance(row.action, dict) else {}  # a forged row may hold anything
    return Event(
        type=kind,
        actor=actor,
        occurred_at=now,
        proposal_id=row.id,
        agent_id=row.agent_id,
        policy_version=policy_version if policy_version is not None else row.policy_version,
        data={"tool": action.get("tool"), "resource": action.get("resource"), **data},
    )


def _starts(conn: Connection, proposal_id: str) -> int:
    """How many times the audit log says this proposal's execution started."""
    query = select(func.count()).where(audit_events.c.proposal_id == proposal_id, audit_events.c.type == STARTED)
    return int(conn.execute(query).scalar_one())


def _set_state(conn: Connection, proposal_id: str, state: ProposalState, now: datetime) -> None:
    conn.execute(update(proposals).where(proposals.c.id == proposal_id).values(state=state.value, updated_at=now))


def _verify(
    conn: Connection, row: Any, public_key: Ed25519PublicKey, catalog: Mapping[str, Tool], now: datetime, *, first: bool
) -> tuple[Tool, VerifiedTicket]:
    """The tool to run ``row`` with and its verified ticket; TicketRefused when anything does not check out."""
    ticket = conn.execute(
        select(execution_tickets.c.payload, execution_tickets.c.signature).where(
            execution_tickets.c.proposal_id == row.id
        )
    ).first()
    if ticket is None:
        raise TicketRefused("ticket.missing", "no execution ticket was issued for this proposal")
    verified = tickets.verify(
        public_key,
        payload=ticket.payload,
        signature=ticket.signature,
        proposal_id=row.id,
        action=row.action,
        now=now,
        check_expiry=first,  # a retry continues an execution its ticket already started
    )
    # The signed action must still pass the catalog this executor runs with (the same checks the PDP made),
    # and name the tool it was claimed for (the tool column is not signed).
    action = row.action
    checked = resolve(dict(catalog), str(action.get("tool")), str(action.get("operation")), str(action.get("resource")))
    if isinstance(checked, CatalogViolation) or action.get("tool") != row.tool:
        why = checked.message if isinstance(checked, CatalogViolation) else f"it was claimed as {row.tool!r}"
        raise TicketRefused("ticket.action_mismatch", f"the signed action does not fit the catalog: {why}")
    return catalog[row.tool], verified


def _refuse(conn: Connection, row: Any, refused: TicketRefused, actor: str, now: datetime, attempt: int) -> None:
    """Nothing runs; the proposal fails with the reason, and the refusal is audited."""
    _set_state(conn, row.id, ProposalState.FAILED, now)
    error = f"refused: {refused.message}"
    if _finish_row(conn, row.id, FAILED, error, now) == 0:
        conn.execute(
            insert(executions).values(
                proposal_id=row.id,
                tool=row.tool,
                attempt=attempt,
                status=FAILED,
                started_at=now,
                finished_at=now,
                error=error,
            )
        )
    chain.append(
        conn,
        _event("execution.refused", row, actor, now, attempt=attempt, reason=refused.reason, error=refused.message),
    )


_PROPOSAL = select(
    proposals.c.id,
    proposals.c.agent_id,
    proposals.c.tool,
    proposals.c.action,
    proposals.c.policy_version,
)


def claim(
    conn: Connection,
    *,
    now: datetime,
    lease: Lease,
    served: Mapping[str, Tool],
    catalog: Mapping[str, Tool],
    public_key: Ed25519PublicKey,
    limit: int,
) -> list[Job]:
    """Move up to ``limit`` APPROVED proposals of the served tools to EXECUTING, each with a verified ticket."""
    if not served or limit <= 0:
        return []
    chain.lock_chain(conn)
    trials = breakers.Trials.load(conn, served, now)  # half-open breakers: one trial each, then nothing more
    query = _PROPOSAL.where(
        proposals.c.state == ProposalState.APPROVED.value, proposals.c.tool.in_(list(served)), ~breakers.held(now)
    )
    rows = conn.execute(query.order_by(proposals.c.updated_at).limit(limit)).all()
    actor = f"executor:{lease.worker}"
    jobs: list[Job] = []
    for row in rows:
        if trials.given_away(row.tool, row.agent_id):
            continue
        try:
            tool, verified = _verify(conn, row, public_key, catalog, now, first=True)
            if _starts(conn, row.id):
                raise TicketRefused("ticket.consumed", "the ticket was already used: this execution started before")
        except TicketRefused as refused:
            _refuse(conn, row, refused, actor, now, attempt=0)
            continue
        if not trials.take(conn, tool.name, row.agent_id, row.id, now):
            continue
        _set_state(conn, row.id, ProposalState.EXECUTING, now)
        conn.execute(
            insert(executions).values(
                proposal_id=row.id,
                tool=tool.name,
                attempt=1,
                status=RUNNING,
                worker=lease.worker,
                lease_expires_at=now + lease.duration,
                started_at=now,
            )
        )
        chain.append(conn, _event(STARTED, row, actor, now, verified.policy_version, attempt=1, worker=lease.worker))
        jobs.append(Job(row.id, row.agent_id, tool, row.action, 1, verified.policy_version))
    return jobs


def renew(conn: Connection, proposal_ids: list[str], lease: Lease, now: datetime) -> None:
    """Extend the leases this worker still holds (a crashed worker's lapse, a live one's do not)."""
    if proposal_ids:
        conn.execute(
            update(executions)
            .where(
                executions.c.proposal_id.in_(proposal_ids),
                executions.c.worker == lease.worker,
                executions.c.status == RUNNING,
            )
            .values(lease_expires_at=now + lease.duration)
        )


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a call ended: a result, or an error message (both already scrubbed of credentials)."""

    result: dict[str, Any] | None = None
    error: str | None = None
    # A failure the target is not to blame for (the agent's input was refused) leaves the breaker alone.
    counts_for_breaker: bool = True

    @property
    def ok(self) -> bool:
        return self.error is None


def finish(
    conn: Connection, job: Job, outcome: Outcome, *, now: datetime, lease: Lease, breaker: BreakerSettings
) -> bool:
    """Record the outcome; False when the lease had lapsed and recovery already took the job over."""
    chain.lock_chain(conn)
    row = conn.execute(_PROPOSAL.where(proposals.c.id == job.proposal_id)).one()
    actor = f"executor:{lease.worker}"
    status = SUCCEEDED if outcome.ok else FAILED
    done = conn.execute(
        update(executions)
        .where(
            executions.c.proposal_id == job.proposal_id,
            executions.c.worker == lease.worker,
            executions.c.attempt == job.attempt,
            executions.c.status == RUNNING,
        )
        .values(
            status=status,
            result=outcome.result,
            error=outcome.error,
            finished_at=now,
            worker=None,
            lease_expires_at=None,
        )
    )
    version = job.policy_version
    if done.rowcount == 0:
        data = {"attempt": job.attempt, "result": outcome.result, "error": outcome.error}
        chain.append(conn, _event("execution.late_result", row, actor, now, version, **data))
        return False
    _set_state(conn, job.proposal_id, ProposalState.SUCCEEDED if outcome.ok else ProposalState.FAILED, now)
    circuit_events: list[Event] = []
    if outcome.ok or outcome.counts_for_breaker:
        circuit_events = breakers.record(
            conn,
            tool=job.tool.name,
            agent_id=job.agent_id,
            proposal_id=job.proposal_id,
            ok=outcome.ok,
            now=now,
            settings=breaker,
            actor=actor,
        )
    else:  # the action was rejected, which proves nothing about the target: a trial slot it held is free again
        breakers.release_trial(conn, job.tool.name, job.proposal_id)
    if outcome.ok:
        event = _event("execution.succeeded", row, actor, now, version, attempt=job.attempt, result=outcome.result)
    else:
        event = _event("execution.failed", row, actor, now, version, attempt=job.attempt, error=outcome.error)
    chain.append(conn, event)
    for circuit_event in circuit_events:
        chain.append(conn, circuit_event)
    return True


def recover(
    conn: Connection,
    *,
    now: datetime,
    lease: Lease,
    served: Mapping[str, Tool],
    catalog: Mapping[str, Tool],
    public_key: Ed25519PublicKey,
    max_attempts: int,
    backoff: timedelta,
) -> list[Job]:
    """Executions whose worker died: UNKNOWN, or for an idempotent tool another attempt (returned) or FAILED."""
    chain.lock_chain(conn)
    query = (
        select(
            executions.c.attempt,
            executions.c.lease_expires_at,
            proposals.c.id,
            proposals.c.agent_id,
            proposals.c.tool,
            proposals.c.action,
            proposals.c.policy_version,
        )
        .select_from(executions.join(proposals, proposals.c.id == executions.c.proposal_id))
        .where(abandoned(now, served, catalog), proposals.c.state == ProposalState.EXECUTING.value)
        .order_by(executions.c.lease_expires_at)
        .limit(100)
    )
    actor = f"executor:{lease.worker}"
    jobs: list[Job] = []
    for row in conn.execute(query).all():
        tool = catalog.get(row.tool)
        lapsed = {"attempt": row.attempt, "lease_expired_at": timestamp(row.lease_expires_at)}
        breakers.release_trial(conn, row.tool, row.id)
        if tool is None or not tool.idempotent:
            error = "the executor stopped during the call; whether it took effect is unknown: a human must reconcile"
            _finish_row(conn, row.id, UNKNOWN, error, now)
            _set_state(conn, row.id, ProposalState.UNKNOWN, now)
            chain.append(conn, _event("execution.unknown", row, actor, now, error=error, **lapsed))
            continue
        if row.attempt >= max_attempts:
            error = f"the executor stopped during the call {row.attempt} times; gave up (max_attempts {max_attempts})"
            _finish_row(conn, row.id, FAILED, error, now)
            _set_state(conn, row.id, ProposalState.FAILED, now)
            chain.append(conn, _event("execution.failed", row, actor, now, error=error, **lapsed))
            continue
        delay = backoff * (2 ** (row.attempt - 1))
        if now < row.lease_expires_at + delay:
            continue  # back off before the next attempt
        try:
            tool, verified = _verify(conn, row, public_key, catalog, now, first=False)
            starts = _starts(conn, row.id)
            if starts != row.attempt:
                raise TicketRefused("ticket.consumed", f"the audit log shows {starts} starts, not {row.attempt}")
        except TicketRefused as refused:
            _refuse(conn, row, refused, actor, now, attempt=row.attempt)
            continue
        attempt = row.attempt + 1
        conn.execute(
            update(executions)
            .where(executions.c.proposal_id == row.id)
            .values(attempt=attempt, worker=lease.worker, lease_expires_at=now + lease.duration)
        )
        conn.execute(update(proposals).where(proposals.c.id == row.id).values(updated_at=now))
        version = verified.policy_version
        retrying = _event(
            "execution.retrying", row, actor, now, version, backoff_seconds=delay.total_seconds(), **lapsed
        )
        chain.append(conn, retrying)
        chain.append(conn, _event(STARTED, row, actor, now, version, attempt=attempt, worker=lease.worker))
        jobs.append(Job(row.id, row.agent_id, tool, row.action, attempt, version))
    return jobs


def abandoned(now: datetime, served: Mapping[str, Tool], catalog: Mapping[str, Tool]) -> ColumnElement[bool]:
    """Executions this executor should recover: lease lapsed, and not an idempotent tool another executor serves.

    Shared by the read-only check the claim loop makes first and by :func:`recover`, so an idle executor
    never takes the write lock for rows it would leave alone.
    """
    others = [name for name, tool in catalog.items() if tool.idempotent and name not in served]
    return (executions.c.status == RUNNING) & (executions.c.lease_expires_at < now) & executions.c.tool.not_in(others)


def _finish_row(conn: Connection, proposal_id: str, status: str, error: str, now: datetime) -> int:
    return conn.execute(
        update(executions)
        .where(executions.c.proposal_id == proposal_id)
        .values(status=status, error=error, finished_at=now, worker=None, lease_expires_at=None)
    ).rowcount
