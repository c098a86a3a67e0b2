"""The audit events a proposal's life produces, and what each one's ``data`` holds.

Event types (``type``), fixed because auditors' queries and the views in migration 0002 name them:

    proposal.decided    the proposal as received and its decision: action, justification, decision
                        (outcome, reasons, boundary, tier, approval requirements), decision_input
                        (agent snapshot, now, environment, usage), initial state, idempotency key
    proposal.cancelled  the agent withdrew a pending proposal
"""

from __future__ import annotations

from datetime import datetime

from pdp.audit.chain import Event
from pdp.store.proposals import ProposalRecord

DECIDED = "proposal.decided"
CANCELLED = "proposal.cancelled"


def proposal_decided(record: ProposalRecord) -> Event:
    return Event(
        type=DECIDED,
        actor=f"agent:{record.agent_id}",
        occurred_at=record.created_at,
        proposal_id=record.id,
        agent_id=record.agent_id,
        policy_version=record.decision.policy_version,
        data={
            "action": record.action,
            "action_digest": record.action_digest,
            "justification": record.justification,
            "decision": record.decision.to_dict(),
            "decision_input": record.decision_input,
            "state": record.state.value,
            "session_id": record.session_id,
            "idempotency_key": record.idempotency_key,
        },
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
