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
before the connector is called. A ticket is used once: a first start needs no earlier execution event
in the append-only audit log for the proposal, and a retry needs exactly one start per attempt and no
recorded end, which a reset of the proposal or execution rows cannot undo. A refusal never overwrites
what the audit log says happened: the proposal and its execution row are put back to the recorded end.

Each row is checked and moved in a savepoint of its own (executor/isolation.py): whatever goes wrong
with one row refuses that row alone and never holds the others.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import ColumnElement, Connection, bindparam, insert, select, update

from executor import breakers
from executor.actions import require_agreement, signed_action
from executor.config import BreakerSettings
from executor.isolation import SetAside, each_alone
from pdp.audit import chain
from pdp.audit.chain import Event
from pdp.canonical import timestamp
from pdp.execution import tickets
from pdp.execution.tickets import TicketRefused, VerifiedTicket
from pdp.policy.catalog import CatalogViolation, Tool, resolve
from pdp.proposals.states import ProposalState
from pdp.store.models import agents, audit_events, execution_tickets, executions, proposals

log = logging.getLogger("executor")

STARTED = "execution.started"
REFUSED = "execution.refused"
RUNNING, SUCCEEDED, FAILED, UNKNOWN = "RUNNING", "SUCCEEDED", "FAILED", "UNKNOWN"
# The events that end an execution, and the status each one records.
ENDINGS = {"execution.succeeded": SUCCEEDED, "execution.failed": FAILED, "execution.unknown": UNKNOWN, REFUSED: FAILED}


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


def _event(
    kind: str,
    row: Any,
    actor: str,
    now: datetime,
    policy_version: str | None = None,
    *,
    action: Mapping[str, Any] | None = None,
    **data: Any,
) -> Event:
    """An execution event; ``policy_version`` from the verified ticket when there is one (the row's is unsigned).

    Tool and resource come from the verified action when there is one, else from the row's text columns:
    a refusal must be recordable whatever a forged JSONB action holds.
    """
    where = action if action is not None else {"tool": row.tool, "resource": row.resource}
    return Event(
        type=kind,
        actor=actor,
        occurred_at=now,
        proposal_id=row.id,
        agent_id=row.agent_id,
        policy_version=policy_version if policy_version is not None else row.policy_version,
        data={"tool": where.get("tool"), "resource": where.get("resource"), **data},
    )


@dataclass(frozen=True, slots=True)
class Ending:
    """How the audit log says an execution ended: the status and what the row held then."""

    status: str
    result: dict[str, Any] | None
    error: str | None
    at: datetime


@dataclass(frozen=True, slots=True)
class History:
    """What the append-only audit log says of a proposal's execution (a reset of its rows cannot change it)."""

    starts: int
    events: int
    ended: Ending | None  # the end recorded after the last start (or a refusal before any), if any


_HISTORY = (
    select(audit_events.c.type, audit_events.c.body)
    .where(audit_events.c.proposal_id == bindparam("proposal_id"), audit_events.c.type.in_([STARTED, *ENDINGS]))
    .order_by(audit_events.c.seq)
)


def _history(conn: Connection, proposal_id: str) -> History:
    rows = conn.execute(_HISTORY, {"proposal_id": proposal_id}).all()
    starts = 0
    ended: Ending | None = None
    for row in rows:
        if row.type == STARTED:
            starts += 1
            ended = None  # an end recorded before the last start ended an earlier attempt
            continue
        try:
            body = json.loads(row.body)
            data = body["data"]
            if not isinstance(data, dict):
                raise TypeError("data is not an object")
            at = datetime.fromisoformat(body["occurred_at"].replace("Z", "+00:00"))
        except (ValueError, TypeError, KeyError, AttributeError):
            # Only a database writer outside the PDP writes such an event: it counts for nothing (verify reports it).
            log.warning("ignoring an unreadable %s event of proposal %s", row.type, proposal_id)
            continue
        # A refusal ends the execution only when it failed it: not when it left a running one alone
        # (to_state EXECUTING), nor when it put back an end the log already held (that end stands).
        if row.type == REFUSED and (data.get("to_state", FAILED) != FAILED or ended is not None):
            continue
        error = data.get("error")
        ended = Ending(
            status=ENDINGS[row.type],
            result=data.get("result") if row.type == "execution.succeeded" else None,
            error=f"refused: {error}" if row.type == REFUSED else error,
            at=at,
        )
    return History(starts, len(rows), ended)


def _set_state(conn: Connection, proposal_id: str, state: ProposalState, now: datetime) -> None:
    conn.execute(update(proposals).where(proposals.c.id == proposal_id).values(state=state.value, updated_at=now))


def _verify(
    conn: Connection, row: Any, public_key: Ed25519PublicKey, catalog: Mapping[str, Tool], now: datetime
) -> tuple[Tool, VerifiedTicket, dict[str, Any]]:
    """The tool, the verified ticket and the action to run ``row`` with; TicketRefused on any doubt."""
    if row.revoked_at is not None:
        raise TicketRefused("agent.revoked", f"agent {row.agent_id!r} was revoked at {timestamp(row.revoked_at)}")
    ticket = conn.execute(
        select(execution_tickets.c.payload, execution_tickets.c.signature).where(
            execution_tickets.c.proposal_id == row.id
        )
    ).first()
    if ticket is None:
        raise TicketRefused("ticket.missing", "no execution ticket was issued for this proposal")
    signed, action = signed_action(row.action_json)
    verified = tickets.verify(
        public_key, payload=ticket.payload, signature=ticket.signature, proposal_id=row.id, action_json=signed, now=now
    )
    require_agreement(row.action, action)
    # The signed action must still pass the catalog this executor runs with (the same checks the PDP made),
    # and name the tool it was claimed for (the tool column is not signed).
    checked = resolve(dict(catalog), action["tool"], action["operation"], action["resource"])
    if isinstance(checked, CatalogViolation) or action["tool"] != row.tool:
        why = checked.message if isinstance(checked, CatalogViolation) else f"it was claimed as {row.tool!r}"
        raise TicketRefused("ticket.action_mismatch", f"the signed action does not fit the catalog: {why}")
    return catalog[row.tool], verified, action


def _refuse(
    conn: Connection,
    row: Any,
    refused: TicketRefused,
    actor: str,
    now: datetime,
    *,
    attempt: int,
    history: History,
    abandoned: bool,
) -> None:
    """Nothing runs, and the refusal is audited. What the audit log already says happened stands.

    - The log records an end (a reset of a finished execution): the proposal and its execution row are put
      back to it; a recorded result is never overwritten.
    - The log records a start and no end: in a claim (a proposal reset to APPROVED mid-call) the running
      execution is left to its worker and recovery, the proposal back at EXECUTING; in recovery
      (``abandoned``) the refusal ends the abandoned attempt, FAILED with the reason.
    - Nothing ran: the proposal fails with the reason.
    """
    if history.ended is not None:
        state = ProposalState(history.ended.status)
    elif history.starts and not abandoned:
        state = ProposalState.EXECUTING
    else:
        state = ProposalState.FAILED
    # to_state: the state the refusal leaves the proposal in (verify compares the row with it).
    data: dict[str, Any] = {
        "attempt": attempt,
        "reason": refused.reason,
        "error": refused.message,
        "to_state": state.value,
    }
    chain.append(conn, _event(REFUSED, row, actor, now, **data))
    _set_state(conn, row.id, state, now)
    if history.ended is not None:
        ended = history.ended
        _end_row(conn, row, attempt, ended.status, ended.result, ended.error, ended.at)
    elif state is ProposalState.FAILED:
        _end_row(conn, row, attempt, FAILED, None, f"refused: {refused.message}", now)


def _end_row(
    conn: Connection,
    row: Any,
    attempt: int,
    status: str,
    result: dict[str, Any] | None,
    error: str | None,
    at: datetime,
) -> None:
    """End the proposal's execution row if it is still RUNNING (or write one if it has none); a row that
    already holds an end (SUCCEEDED, FAILED, UNKNOWN) is never overwritten."""
    ended = {"status": status, "result": result, "error": error, "finished_at": at, "worker": None}
    done = conn.execute(
        update(executions)
        .where(executions.c.proposal_id == row.id, executions.c.status == RUNNING)
        .values(lease_expires_at=None, **ended)
    )
    if done.rowcount:
        return
    if conn.execute(select(executions.c.status).where(executions.c.proposal_id == row.id)).first() is None:
        conn.execute(
            insert(executions).values(proposal_id=row.id, tool=row.tool, attempt=attempt, started_at=at, **ended)
        )


_COLUMNS = (
    proposals.c.id,
    proposals.c.agent_id,
    proposals.c.tool,
    proposals.c.resource,
    proposals.c.action,
    proposals.c.action_json,
    proposals.c.policy_version,
    agents.c.revoked_at,
)
_WITH_AGENT = proposals.outerjoin(agents, agents.c.id == proposals.c.agent_id)
_PROPOSAL = select(*_COLUMNS).select_from(_WITH_AGENT)


def claim(
    conn: Connection,
    *,
    now: datetime,
    lease: Lease,
    served: Mapping[str, Tool],
    catalog: Mapping[str, Tool],
    public_key: Ed25519PublicKey,
    limit: int,
    aside: SetAside | None = None,
) -> list[Job]:
    """Move up to ``limit`` APPROVED proposals of the served tools to EXECUTING, each with a verified ticket.

    Each row is worked on alone (executor/isolation.py): one that cannot be checked is refused, and one that
    cannot even be refused is set aside in ``aside``; neither holds the others.
    """
    if not served or limit <= 0:
        return []
    chain.lock_chain(conn)  # before any row's savepoint: rolling one back must not release it
    trials = breakers.Trials.load(conn, served, now)  # half-open breakers: one trial each, then nothing more
    query = _PROPOSAL.where(
        proposals.c.state == ProposalState.APPROVED.value, proposals.c.tool.in_(list(served)), ~breakers.held(now)
    )
    skipped = aside.ids(now) if aside is not None else []
    if skipped:
        query = query.where(proposals.c.id.not_in(skipped))
    rows = conn.execute(query.order_by(proposals.c.updated_at).limit(limit)).all()
    actor = f"executor:{lease.worker}"
    jobs: list[Job] = []
    for row in rows:
        if trials.given_away(row.tool, row.agent_id):
            continue

        def start(row: Any = row) -> Job | None:
            return _start(conn, row, now, lease, catalog, public_key, trials, actor)

        def refuse(error: Exception, row: Any = row) -> None:
            _refuse_unchecked(conn, row, error, actor, now, attempt=0, abandoned=False)

        job = each_alone(conn, row.id, start, refuse, aside, now)
        if job is not None:
            jobs.append(job)
    return jobs


def _start(
    conn: Connection,
    row: Any,
    now: datetime,
    lease: Lease,
    catalog: Mapping[str, Tool],
    public_key: Ed25519PublicKey,
    trials: breakers.Trials,
    actor: str,
) -> Job | None:
    """Check one APPROVED row and start it: its job, or None when it was refused or must wait for a trial."""
    history = _history(conn, row.id)
    try:
        if history.events:
            ran = "ended" if history.ended is not None else "started"
            raise TicketRefused("ticket.consumed", f"the ticket was already used: this execution {ran} before")
        tool, verified, action = _verify(conn, row, public_key, catalog, now)
    except TicketRefused as refused:
        _refuse(conn, row, refused, actor, now, attempt=0, history=history, abandoned=False)
        return None
    if not trials.take(conn, tool.name, row.agent_id, row.id, now):
        return None
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
    version = verified.policy_version
    chain.append(conn, _event(STARTED, row, actor, now, version, action=action, attempt=1, worker=lease.worker))
    return Job(row.id, row.agent_id, tool, action, 1, version)


def _refuse_unchecked(
    conn: Connection, row: Any, error: Exception, actor: str, now: datetime, *, attempt: int, abandoned: bool
) -> None:
    """Refuse a row whose check raised something other than a refusal (the log has the traceback)."""
    refused = TicketRefused(
        "execution.unverifiable", f"the executor could not check this proposal ({type(error).__name__})"
    )
    _refuse(conn, row, refused, actor, now, attempt=attempt, history=_history(conn, row.id), abandoned=abandoned)


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
        chain.append(conn, _event("execution.late_result", row, actor, now, version, action=job.action, **data))
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
    attempt = job.attempt
    if outcome.ok:
        event = _event(
            "execution.succeeded", row, actor, now, version, action=job.action, attempt=attempt, result=outcome.result
        )
    else:
        event = _event(
            "execution.failed", row, actor, now, version, action=job.action, attempt=attempt, error=outcome.error
        )
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
    aside: SetAside | None = None,
) -> list[Job]:
    """Executions whose worker died: UNKNOWN, or for an idempotent tool another attempt (returned) or FAILED.

    The audit log decides what "died" means: an execution whose end it already records was reset by someone
    editing rows, and is put back to that end, never run again. A retry needs a ticket that has not expired
    and an agent that is not revoked, like a first start.
    """
    chain.lock_chain(conn)  # before any row's savepoint: rolling one back must not release it
    query = (
        select(executions.c.attempt, executions.c.lease_expires_at, *_COLUMNS)
        .select_from(executions.join(_WITH_AGENT, proposals.c.id == executions.c.proposal_id))
        .where(abandoned(now, served, catalog), proposals.c.state == ProposalState.EXECUTING.value)
        .order_by(executions.c.lease_expires_at)
        .limit(100)
    )
    skipped = aside.ids(now) if aside is not None else []
    if skipped:
        query = query.where(executions.c.proposal_id.not_in(skipped))
    actor = f"executor:{lease.worker}"
    jobs: list[Job] = []
    for row in conn.execute(query).all():

        def retry(row: Any = row) -> Job | None:
            return _recover_one(conn, row, now, lease, catalog, public_key, max_attempts, backoff, actor)

        def refuse(error: Exception, row: Any = row) -> None:
            _refuse_unchecked(conn, row, error, actor, now, attempt=row.attempt, abandoned=True)

        job = each_alone(conn, row.id, retry, refuse, aside, now)
        if job is not None:
            jobs.append(job)
    return jobs


def _recover_one(
    conn: Connection,
    row: Any,
    now: datetime,
    lease: Lease,
    catalog: Mapping[str, Tool],
    public_key: Ed25519PublicKey,
    max_attempts: int,
    backoff: timedelta,
    actor: str,
) -> Job | None:
    """One abandoned execution: ended as UNKNOWN or FAILED, refused, left to back off (None), or retried (its job)."""
    history = _history(conn, row.id)
    breakers.release_trial(conn, row.tool, row.id)  # whatever follows, this execution is no breaker's trial now
    if history.ended is not None:  # the rows were reset after it ended: the recorded end stands
        why = f"the audit log shows this execution already ended ({history.ended.status})"
        refused = TicketRefused("ticket.consumed", why)
        _refuse(conn, row, refused, actor, now, attempt=row.attempt, history=history, abandoned=True)
        return None
    tool = catalog.get(row.tool)
    lapsed = {"attempt": row.attempt, "lease_expired_at": timestamp(row.lease_expires_at)}
    if tool is None or not tool.idempotent:
        error = "the executor stopped during the call; whether it took effect is unknown: a human must reconcile"
        _end_row(conn, row, row.attempt, UNKNOWN, None, error, now)
        _set_state(conn, row.id, ProposalState.UNKNOWN, now)
        chain.append(conn, _event("execution.unknown", row, actor, now, error=error, **lapsed))
        return None
    if row.attempt >= max_attempts:
        error = f"the executor stopped during the call {row.attempt} times; gave up (max_attempts {max_attempts})"
        _end_row(conn, row, row.attempt, FAILED, None, error, now)
        _set_state(conn, row.id, ProposalState.FAILED, now)
        chain.append(conn, _event("execution.failed", row, actor, now, error=error, **lapsed))
        return None
    delay = backoff * (2 ** (row.attempt - 1))
    if now < row.lease_expires_at + delay:
        return None  # back off before the next attempt
    try:
        if history.starts != row.attempt:
            raise TicketRefused("ticket.consumed", f"the audit log shows {history.starts} starts, not {row.attempt}")
        tool, verified, action = _verify(conn, row, public_key, catalog, now)
    except TicketRefused as refused:
        _refuse(conn, row, refused, actor, now, attempt=row.attempt, history=history, abandoned=True)
        return None
    attempt = row.attempt + 1
    conn.execute(
        update(executions)
        .where(executions.c.proposal_id == row.id)
        .values(attempt=attempt, worker=lease.worker, lease_expires_at=now + lease.duration)
    )
    conn.execute(update(proposals).where(proposals.c.id == row.id).values(updated_at=now))
    version = verified.policy_version
    delayed = {"backoff_seconds": delay.total_seconds(), **lapsed}
    chain.append(conn, _event("execution.retrying", row, actor, now, version, action=action, **delayed))
    chain.append(conn, _event(STARTED, row, actor, now, version, action=action, attempt=attempt, worker=lease.worker))
    return Job(row.id, row.agent_id, tool, action, attempt, version)


def abandoned(now: datetime, served: Mapping[str, Tool], catalog: Mapping[str, Tool]) -> ColumnElement[bool]:
    """Executions this executor should recover: lease lapsed, and not an idempotent tool another executor serves.

    Shared by the read-only check the claim loop makes first and by :func:`recover`, so an idle executor
    never takes the write lock for rows it would leave alone.
    """
    others = [name for name, tool in catalog.items() if tool.idempotent and name not in served]
    return (executions.c.status == RUNNING) & (executions.c.lease_expires_at < now) & executions.c.tool.not_in(others)
