"""The executor's transactions: claim approved work, finish it, renew leases, recover abandoned work.

Each function is one transaction's worth of work on a connection the caller opened with
``engine.begin()``. Every state change appends its audit event in the same transaction.

Lock order, the same in every transaction here, so executors and PDP replicas never deadlock: the
audit chain's advisory lock first (PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` is one lock anyway),
then proposal rows (``FOR UPDATE SKIP LOCKED``, so concurrent executors take disjoint work), then
breaker rows.

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
from sqlalchemy import Connection, Select, and_, func, insert, select, update

from executor.config import BreakerSettings
from pdp.audit import chain
from pdp.audit.chain import Event
from pdp.canonical import timestamp
from pdp.execution import tickets
from pdp.execution.tickets import TicketRefused
from pdp.policy.catalog import Tool
from pdp.policy.duration import parse_duration
from pdp.proposals.states import ProposalState
from pdp.store.models import audit_events, circuit_breakers, execution_tickets, executions, proposals

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


def _for_update(query: Select[Any], conn: Connection) -> Select[Any]:
    return query.with_for_update(skip_locked=True) if conn.dialect.name == "postgresql" else query


def _event(kind: str, row: Any, actor: str, now: datetime, **data: Any) -> Event:
    action = row.action if isinstance(row.action, dict) else {}  # a forged row may hold anything
    return Event(
        type=kind,
        actor=actor,
        occurred_at=now,
        proposal_id=row.id,
        agent_id=row.agent_id,
        policy_version=row.policy_version,
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
) -> Tool:
    """The tool to run ``row`` with, once its ticket checks out; TicketRefused otherwise."""
    ticket = conn.execute(
        select(execution_tickets.c.payload, execution_tickets.c.signature).where(
            execution_tickets.c.proposal_id == row.id
        )
    ).first()
    if ticket is None:
        raise TicketRefused("ticket.missing", "no execution ticket was issued for this proposal")
    tickets.verify(
        public_key,
        payload=ticket.payload,
        signature=ticket.signature,
        proposal_id=row.id,
        action=row.action,
        now=now,
        check_expiry=first,  # a retry continues an execution its ticket already started
    )
    # The tool column is not signed; the action (and so its tool) is.
    tool = catalog.get(str(row.action.get("tool")))
    if tool is None or row.action.get("tool") != row.tool:
        raise TicketRefused(
            "ticket.action_mismatch", f"the signed action's tool {row.action.get('tool')!r} is not {row.tool!r}"
        )
    if not str(row.action.get("resource", "")).startswith(tool.resource_prefix):
        raise TicketRefused("ticket.action_mismatch", f"the resource is not under the {tool.name} prefix")
    return tool


def _refuse(conn: Connection, row: Any, refused: TicketRefused, actor: str, now: datetime) -> None:
    """Nothing runs; the proposal fails with the reason, and the refusal is audited."""
    _set_state(conn, row.id, ProposalState.FAILED, now)
    exists = conn.execute(select(executions.c.proposal_id).where(executions.c.proposal_id == row.id)).first()
    if exists is None:
        conn.execute(
            insert(executions).values(
                proposal_id=row.id,
                tool=row.tool,
                attempt=0,
                status=FAILED,
                started_at=now,
                finished_at=now,
                error=f"refused: {refused.message}",
            )
        )
    chain.append(
        conn, _event("execution.refused", row, actor, now, attempt=0, reason=refused.reason, error=refused.message)
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
    blocked, half_open = _breaker_states(conn, served, now)
    tools = [name for name in served if name not in blocked]
    if not tools:
        return []
    query = _PROPOSAL.where(proposals.c.state == ProposalState.APPROVED.value, proposals.c.tool.in_(tools))
    rows = conn.execute(_for_update(query.order_by(proposals.c.updated_at).limit(limit), conn)).all()
    actor = f"executor:{lease.worker}"
    jobs: list[Job] = []
    for row in rows:
        if row.tool in blocked:
            continue
        try:
            tool = _verify(conn, row, public_key, catalog, now, first=True)
            if _starts(conn, row.id):
                raise TicketRefused("ticket.consumed", "the ticket was already used: this execution started before")
        except TicketRefused as refused:
            _refuse(conn, row, refused, actor, now)
            continue
        if tool.name in half_open and not _take_trial(conn, tool.name, row.id, now):
            blocked.add(tool.name)
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
        chain.append(conn, _event(STARTED, row, actor, now, attempt=1, worker=lease.worker))
        jobs.append(Job(row.id, row.agent_id, tool, row.action, 1, row.policy_version))
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
    if done.rowcount == 0:
        data = {"attempt": job.attempt, "result": outcome.result, "error": outcome.error}
        chain.append(conn, _event("execution.late_result", row, actor, now, **data))
        return False
    _set_state(conn, job.proposal_id, ProposalState.SUCCEEDED if outcome.ok else ProposalState.FAILED, now)
    # Breaker before the event, which needs nothing more; see the lock order in the module docstring.
    circuit_event = _record_for_breaker(conn, job, outcome.ok, now, breaker, actor)
    if outcome.ok:
        chain.append(conn, _event("execution.succeeded", row, actor, now, attempt=job.attempt, result=outcome.result))
    else:
        chain.append(conn, _event("execution.failed", row, actor, now, attempt=job.attempt, error=outcome.error))
    if circuit_event is not None:
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
            executions.c.proposal_id,
            executions.c.attempt,
            executions.c.lease_expires_at,
            proposals.c.id,
            proposals.c.agent_id,
            proposals.c.tool,
            proposals.c.action,
            proposals.c.policy_version,
        )
        .select_from(executions.join(proposals, proposals.c.id == executions.c.proposal_id))
        .where(
            executions.c.status == RUNNING,
            executions.c.lease_expires_at < now,
            proposals.c.state == ProposalState.EXECUTING.value,
        )
        .order_by(executions.c.lease_expires_at)
        .limit(100)
    )
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True, of=executions)
    actor = f"executor:{lease.worker}"
    jobs: list[Job] = []
    for row in conn.execute(query).all():
        tool = catalog.get(row.tool)
        idempotent = tool is not None and tool.idempotent
        if idempotent and tool is not None and row.tool not in served:
            continue  # another executor serves this tool and will retry it
        abandoned = {"attempt": row.attempt, "lease_expired_at": timestamp(row.lease_expires_at)}
        _release_trial(conn, row.tool, row.id)
        if not idempotent:
            error = "the executor stopped during the call; whether it took effect is unknown: a human must reconcile"
            _finish_row(conn, row.id, UNKNOWN, error, now)
            _set_state(conn, row.id, ProposalState.UNKNOWN, now)
            chain.append(conn, _event("execution.unknown", row, actor, now, error=error, **abandoned))
            continue
        assert tool is not None
        if row.attempt >= max_attempts:
            error = f"the executor stopped during the call {row.attempt} times; gave up (max_attempts {max_attempts})"
            _finish_row(conn, row.id, FAILED, error, now)
            _set_state(conn, row.id, ProposalState.FAILED, now)
            chain.append(conn, _event("execution.failed", row, actor, now, error=error, **abandoned))
            continue
        delay = backoff * (2 ** (row.attempt - 1))
        if now < row.lease_expires_at + delay:
            continue  # back off before the next attempt
        try:
            _verify(conn, row, public_key, catalog, now, first=False)
            starts = _starts(conn, row.id)
            if starts != row.attempt:
                raise TicketRefused("ticket.consumed", f"the audit log shows {starts} starts, not {row.attempt}")
        except TicketRefused as refused:
            _finish_row(conn, row.id, FAILED, f"refused: {refused.message}", now)
            _set_state(conn, row.id, ProposalState.FAILED, now)
            chain.append(
                conn,
                _event(
                    "execution.refused",
                    row,
                    actor,
                    now,
                    reason=refused.reason,
                    error=refused.message,
                    attempt=row.attempt,
                ),
            )
            continue
        attempt = row.attempt + 1
        conn.execute(
            update(executions)
            .where(executions.c.proposal_id == row.id)
            .values(attempt=attempt, worker=lease.worker, lease_expires_at=now + lease.duration)
        )
        conn.execute(update(proposals).where(proposals.c.id == row.id).values(updated_at=now))
        chain.append(
            conn, _event("execution.retrying", row, actor, now, backoff_seconds=delay.total_seconds(), **abandoned)
        )
        chain.append(conn, _event(STARTED, row, actor, now, attempt=attempt, worker=lease.worker))
        jobs.append(Job(row.id, row.agent_id, tool, row.action, attempt, row.policy_version))
    return jobs


def _finish_row(conn: Connection, proposal_id: str, status: str, error: str, now: datetime) -> None:
    conn.execute(
        update(executions)
        .where(executions.c.proposal_id == proposal_id)
        .values(status=status, error=error, finished_at=now, worker=None, lease_expires_at=None)
    )


# --- circuit breakers (see pdp/execution/circuits.py for the states) ----------------------------------


def _breaker_states(conn: Connection, served: Mapping[str, Tool], now: datetime) -> tuple[set[str], set[str]]:
    """(tools not to claim now: open, or half-open with the trial running; half-open tools awaiting a trial)."""
    rows = conn.execute(
        select(circuit_breakers.c.tool, circuit_breakers.c.opened_until, circuit_breakers.c.trial_proposal_id).where(
            circuit_breakers.c.tool.in_(list(served)), circuit_breakers.c.opened_until.is_not(None)
        )
    ).all()
    blocked = {r.tool for r in rows if r.opened_until > now or r.trial_proposal_id is not None}
    return blocked, {r.tool for r in rows} - blocked


def _take_trial(conn: Connection, tool: str, proposal_id: str, now: datetime) -> bool:
    taken = conn.execute(
        update(circuit_breakers)
        .where(circuit_breakers.c.tool == tool, circuit_breakers.c.trial_proposal_id.is_(None))
        .values(trial_proposal_id=proposal_id, updated_at=now)
    )
    return taken.rowcount == 1


def _release_trial(conn: Connection, tool: str, proposal_id: str) -> None:
    """A trial whose worker died proves nothing: free the slot for another trial."""
    conn.execute(
        update(circuit_breakers)
        .where(circuit_breakers.c.tool == tool, circuit_breakers.c.trial_proposal_id == proposal_id)
        .values(trial_proposal_id=None)
    )


def _record_for_breaker(
    conn: Connection, job: Job, ok: bool, now: datetime, settings: BreakerSettings, actor: str
) -> Event | None:
    """Count the outcome; the event to append when the breaker opened or closed."""
    tool = job.tool.name
    row = conn.execute(select(circuit_breakers).where(circuit_breakers.c.tool == tool)).first()
    where = and_(circuit_breakers.c.tool == tool)
    if ok:
        if row is None or (row.consecutive_failures == 0 and row.opened_until is None):
            return None
        conn.execute(
            update(circuit_breakers)
            .where(where)
            .values(consecutive_failures=0, opened_until=None, trial_proposal_id=None, updated_at=now)
        )
        if row.opened_until is None:
            return None
        return Event("circuit.closed", actor, now, data={"tool": tool, "trial_proposal_id": job.proposal_id})
    failures = (row.consecutive_failures if row is not None else 0) + 1
    trial_failed = row is not None and row.trial_proposal_id == job.proposal_id
    opens = failures >= settings.failures or trial_failed
    until = now + parse_duration(settings.cooldown) if opens else (row.opened_until if row is not None else None)
    values = {
        "consecutive_failures": failures,
        "opened_until": until,
        "trial_proposal_id": None if opens else (row.trial_proposal_id if row is not None else None),
        "updated_at": now,
    }
    if row is None:
        conn.execute(insert(circuit_breakers).values(tool=tool, **values))
    else:
        conn.execute(update(circuit_breakers).where(where).values(**values))
    if not opens:
        return None
    return Event(
        "circuit.opened",
        actor,
        now,
        data={"tool": tool, "consecutive_failures": failures, "until": timestamp(until) if until else None},
    )
