"""How the CLI prints decisions and proposals (one format for `pdp propose` and `pdp policy eval`)."""

from __future__ import annotations

import json

from google.protobuf.json_format import MessageToDict

from pdp.v1 import pdp_pb2


def print_decision(decision: pdp_pb2.Decision) -> None:
    print(f"outcome:        {pdp_pb2.Outcome.Name(decision.outcome)}")
    print(f"boundary:       {decision.boundary or '-'} (tier {decision.tier or '-'})")
    print(f"policy_version: {decision.policy_version}")
    for req in decision.approval_requirements:
        print(f"approval:       {req.source}: {req.min_approvals} of {', '.join(req.groups)}")
    if decision.HasField("approval_expires_at"):
        print(f"expires_at:     {decision.approval_expires_at.ToDatetime().isoformat()}Z")
    if decision.retry_after_seconds:
        print(f"retry_after:    {decision.retry_after_seconds}s")
    print("reasons:")
    for reason in decision.reasons:
        print(f"  - {reason.rule_id} ({reason.effect}): {reason.message}")


def print_proposal(proposal: pdp_pb2.Proposal) -> None:
    print(f"proposal:       {proposal.proposal_id}")
    print(f"state:          {pdp_pb2.ProposalState.Name(proposal.state)}")
    action = proposal.action
    print(f"action:         {action.tool} {action.operation} {action.resource}")
    print_decision(proposal.decision)
    for vote in proposal.approvals:
        comment = f": {vote.comment}" if vote.comment else ""
        print(f"vote:           {vote.approver_id} {vote.verdict}s{comment}")
    if proposal.HasField("execution"):
        print_execution(proposal.execution)


def print_execution(execution: pdp_pb2.Execution) -> None:
    print(f"execution:      {execution.status}")
    if execution.HasField("started_at"):
        print(f"started_at:     {execution.started_at.ToDatetime().isoformat()}Z")
    if execution.HasField("finished_at"):
        print(f"finished_at:    {execution.finished_at.ToDatetime().isoformat()}Z")
    if execution.error:
        print(f"error:          {execution.error}")
    if execution.HasField("result"):
        print("result:")
        text = json.dumps(MessageToDict(execution.result), indent=2, ensure_ascii=False)
        print("\n".join("  " + line for line in text.splitlines()))
