"""Domain objects to the wire types of pdp.v1."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from google.protobuf import timestamp_pb2

from pdp.policy.decision import Decision, Outcome
from pdp.proposals.states import ProposalState
from pdp.store.proposals import ExecutionRecord, ProposalRecord
from pdp.v1 import pdp_pb2

OUTCOMES = {
    Outcome.ALLOW: pdp_pb2.ALLOW,
    Outcome.DENY: pdp_pb2.DENY,
    Outcome.NEEDS_APPROVAL: pdp_pb2.NEEDS_APPROVAL,
}
STATES = {state: pdp_pb2.ProposalState.Value(state.value) for state in ProposalState}


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def decision_message(decision: Decision) -> pdp_pb2.Decision:
    message = pdp_pb2.Decision(
        outcome=OUTCOMES[decision.outcome],
        reasons=[pdp_pb2.Reason(rule_id=r.rule_id, effect=r.effect.value, message=r.message) for r in decision.reasons],
        boundary=decision.boundary,
        tier=decision.tier,
        policy_version=decision.policy_version,
        retry_after_seconds=decision.retry_after_seconds,
        approval_requirements=[
            pdp_pb2.ApprovalRequirement(source=a.source, groups=a.groups, min_approvals=a.min_approvals)
            for a in decision.approval_requirements
        ],
    )
    if decision.approval_expires_at is not None:
        message.approval_expires_at.CopyFrom(timestamp(decision.approval_expires_at))
    return message


def action_message(action: dict[str, Any]) -> pdp_pb2.Action:
    message = pdp_pb2.Action(
        tool=action["tool"],
        operation=action["operation"],
        resource=action["resource"],
        estimated_cost_usd=action.get("estimated_cost_usd", 0.0),
        labels=action.get("labels", {}),
    )
    if action.get("params"):
        message.params.update(action["params"])
    return message


def execution_message(execution: ExecutionRecord) -> pdp_pb2.Execution:
    message = pdp_pb2.Execution(
        status=execution.status, error=execution.error, started_at=timestamp(execution.started_at)
    )
    if execution.result is not None:
        message.result.update(execution.result)
    if execution.finished_at is not None:
        message.finished_at.CopyFrom(timestamp(execution.finished_at))
    return message


def proposal_message(record: ProposalRecord) -> pdp_pb2.Proposal:
    message = pdp_pb2.Proposal(
        proposal_id=record.id,
        agent_id=record.agent_id,
        action=action_message(record.action),
        justification=record.justification,
        state=STATES[record.state],
        decision=decision_message(record.decision),
        created_at=timestamp(record.created_at),
        updated_at=timestamp(record.updated_at),
        session_id=record.session_id,
        idempotency_key=record.idempotency_key,
    )
    if record.execution is not None:
        message.execution.CopyFrom(execution_message(record.execution))
    for vote in record.approvals:
        message.approvals.append(
            pdp_pb2.Approval(
                approver_id=vote.approver_id,
                verdict=vote.verdict,
                comment=vote.comment,
                decided_at=timestamp(vote.decided_at),
            )
        )
    return message
