"""The audit events a proposal's life produces, and what each one's ``data`` holds.

Event types (``type``), fixed because auditors' queries and the views in migration 0002 name them:

    proposal.decided    the proposal as received and its decision: action, justification, decision
                        (outcome, reasons, boundary, tier, approval requirements), decision_input
                        (agent snapshot, now, environment, usage), initial state, idempotency key;
                        ``ticket`` when allowed, ``approval_request`` (signed) when it needs approval
    proposal.cancelled  the agent withdrew a pending proposal (actor ``agent:<id>``), or its agent was revoked
                        (actor the operator, e.g. ``cli:<user>``; ``reason: agent revoked``; ``from_state``
                        PENDING_APPROVAL or APPROVED)

Identities (``agent_id`` set, no ``proposal_id``):

    agent.revoked       an operator revoked the agent (``revoked_by``); its token stops working, and the
                        ``proposal.cancelled`` events that follow in the same transaction stop its work

Execution (recorded by the executor; ``data`` always has ``tool``, ``resource`` and ``attempt``):

    execution.started       a worker took the proposal (ticket_id, worker, lease) before calling the target
    execution.succeeded     the connector returned; ``result`` (credentials scrubbed)
    execution.failed        the connector failed or timed out; ``error`` (credentials scrubbed)
    execution.unknown       a worker died mid-call on a tool that is not idempotent: a human must reconcile
    execution.retrying      a worker died mid-call on an idempotent tool: it runs again after ``backoff_seconds``
    execution.refused       the ticket did not permit execution (``reason``: ticket.bad_signature, …); nothing ran;
                            ``to_state`` is the state it leaves the proposal in (what the log recorded stands)
    execution.late_result   a worker finished after its lease lapsed; the result is kept here for reconciliation
    circuit.opened          a breaker opened after failures, or after its trial failed (``until``); ``scope``:
                            ``tool`` (every agent), or ``agent`` (``agent_id``: that agent's own, for that tool)
    circuit.closed          a trial execution succeeded and closed the breaker (``scope`` as above)

Policy hot reload (recorded by ``pdp serve``; actor ``pdp``; ``data.reason`` is what triggered it, "watch" or
"sighup"; ``data.bundle_dir`` is the directory reloaded):

    policy.activated    a new bundle loaded, type-checked and passed its own PolicyTests and now decides;
                        previous_policy_version, policy_version (also the event's policy_version)
    policy.refused      a new bundle did not load or failed a test: ``error`` lists every problem, one per line,
                        each starting with file:line; kept_policy_version (also the event's policy_version)
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pdp.audit.chain import Event
from pdp.store.proposals import ProposalRecord

if TYPE_CHECKING:
    from pdp.approvals.signed import Signed
    from pdp.execution.tickets import SignedTicket

DECIDED = "proposal.decided"
CANCELLED = "proposal.cancelled"
GRANTED = "approval.granted"
REJECTED = "approval.rejected"
AGENT_REVOKED = "agent.revoked"
REFUSED = "execution.refused"
VOTES = (GRANTED, REJECTED)

# The state an event leaves its proposal in, where its type says it. Any other event that changes a
# proposal's state carries ``data.to_state`` (``proposal.decided``: ``data.state``); a new kind of transition
# must do the same, or `pdp audit verify` reports the proposal's row as disagreeing with its events.
_STATE_OF_TYPE = {
    "proposal.approved": "APPROVED",
    "proposal.denied": "DENIED",
    "proposal.expired": "EXPIRED",
    "proposal.cancelled": "CANCELLED",
    REJECTED: "REJECTED",
    "execution.started": "EXECUTING",
    "execution.succeeded": "SUCCEEDED",
    "execution.failed": "FAILED",
    "execution.unknown": "UNKNOWN",
}
# Events that change no proposal's state and whose data the approval history never reads.
_NO_TRANSITION = frozenset(
    {
        "execution.retrying",
        "execution.late_result",
        "agent.quarantined",
        "agent.released",
        AGENT_REVOKED,
        "circuit.opened",
        "circuit.closed",
        "policy.activated",
        "policy.refused",
    }
)
# Whose data the approval history reads: the decision, the votes, a re-decision at quorum.
_READ = frozenset({DECIDED, GRANTED, REJECTED, "proposal.denied"})


def state_after(event_type: str, data: Mapping[str, Any]) -> str | None:
    """The proposal state this event records a transition to, or None when it changes no state."""
    known = _STATE_OF_TYPE.get(event_type)
    if known is not None:
        return known
    if event_type == DECIDED:
        state = data.get("state")
        return state if isinstance(state, str) else None
    if event_type == REFUSED:
        # A refusal leaves what the log already recorded standing (data.to_state); older ones always failed.
        to_state = data.get("to_state", "FAILED")
        return to_state if isinstance(to_state, str) else None
    to_state = data.get("to_state")
    return to_state if isinstance(to_state, str) else None


def body_needed(event_type: str) -> bool:
    """Whether :func:`state_after` and the approval history must read this event's data (most events' types say
    all they need, and parsing every body again would double what `pdp audit verify` costs)."""
    return event_type in _READ or (event_type not in _STATE_OF_TYPE and event_type not in _NO_TRANSITION)


def proposal_decided(
    record: ProposalRecord, ticket: SignedTicket | None = None, request: Signed | None = None
) -> Event:
    data = {
        "action": record.action,
        "action_digest": record.action_digest,
        "justification": record.justification,
        "decision": record.decision.to_dict(),
        "decision_input": record.decision_input,
        "state": record.state.value,
        "session_id": record.session_id,
        "idempotency_key": record.idempotency_key,
    }
    if ticket is not None:
        data["ticket"] = ticket.audit()
    if request is not None:  # what the approvers' quorum is computed from (pdp.approvals.signed)
        data["approval_request"] = request.audit()
    return Event(
        type=DECIDED,
        actor=f"agent:{record.agent_id}",
        occurred_at=record.created_at,
        proposal_id=record.id,
        agent_id=record.agent_id,
        policy_version=record.decision.policy_version,
        data=data,
    )


def proposal_cancelled(record: ProposalRecord, at: datetime) -> Event:
    return Event(
        type=CANCELLED,
        actor=f"agent:{record.agent_id}",
        occurred_at=at,
        proposal_id=record.id,
        agent_id=record.agent_id,
        policy_version=record.decision.policy_version,
        data={"from_state": "PENDING_APPROVAL", "to_state": record.state.value},
    )


def proposal_cancelled_by(
    proposal_id: str, agent_id: str, policy_version: str, *, from_state: str, actor: str, at: datetime, reason: str
) -> Event:
    """A proposal cancelled by someone other than its agent, and why."""
    return Event(
        type=CANCELLED,
        actor=actor,
        occurred_at=at,
        proposal_id=proposal_id,
        agent_id=agent_id,
        policy_version=policy_version,
        data={"from_state": from_state, "to_state": "CANCELLED", "reason": reason},
    )


def agent_revoked(agent_id: str, actor: str, at: datetime) -> Event:
    return Event(
        type=AGENT_REVOKED,
        actor=actor,
        occurred_at=at,
        agent_id=agent_id,
        data={"agent_id": agent_id, "revoked_by": actor},
    )
