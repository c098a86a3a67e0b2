"""How the CLI prints decisions and proposals (one format for `pdp propose` and `pdp policy eval`).

Every value that came from a request, a policy message, an approver or a target goes through
:func:`~pdp.cli.terminal.visible`: one value is one piece of one line, whatever bytes it holds.
"""

from __future__ import annotations

import json

from google.protobuf.json_format import MessageToDict

from pdp.cli.terminal import visible
from pdp.v1 import pdp_pb2


def print_decision(decision: pdp_pb2.Decision) -> None:
    print(f"outcome:        {pdp_pb2.Outcome.Name(decision.outcome)}")
    print(f"boundary:       {visible(decision.boundary) or '-'} (tier {visible(decision.tier) or '-'})")
    print(f"policy_version: {visible(decision.policy_version)}")
    for req in decision.approval_requirements:
        groups = ", ".join(visible(g) for g in req.groups)
        print(f"approval:       {visible(req.source)}: {req.min_approvals} of {groups}")
    if decision.HasField("approval_expires_at"):
        print(f"expires_at:     {decision.approval_expires_at.ToDatetime().isoformat()}Z")
    if decision.retry_after_seconds:
        print(f"retry_after:    {decision.retry_after_seconds}s")
    print("reasons:")
    for reason in decision.reasons:
        print(f"  - {visible(reason.rule_id)} ({visible(reason.effect)}): {visible(reason.message)}")


def print_proposal(proposal: pdp_pb2.Proposal) -> None:
    print(f"proposal:       {visible(proposal.proposal_id)}")
    print(f"state:          {pdp_pb2.ProposalState.Name(proposal.state)}")
    action = proposal.action
    print(f"action:         {visible(action.tool)} {visible(action.operation)} {visible(action.resource)}")
    if action.HasField("params") and action.params.fields:
        print(f"params:         {_json(MessageToDict(action.params))}")
    # The agent's own words: shown for what they are, unverified, and never as anything but text.
    print(f"justification:  {visible(proposal.justification)} (written by the agent, unverified)")
    print_decision(proposal.decision)
    for vote in proposal.approvals:
        comment = f": {visible(vote.comment)}" if vote.comment else ""
        print(f"vote:           {visible(vote.approver_id)} {visible(vote.verdict)}s{comment}")
    if proposal.HasField("execution"):
        print_execution(proposal.execution)


def print_execution(execution: pdp_pb2.Execution) -> None:
    print(f"execution:      {visible(execution.status)}")
    if execution.HasField("started_at"):
        print(f"started_at:     {execution.started_at.ToDatetime().isoformat()}Z")
    if execution.HasField("finished_at"):
        print(f"finished_at:    {execution.finished_at.ToDatetime().isoformat()}Z")
    if execution.error:
        print(f"error:          {visible(execution.error)}")
    if execution.HasField("result"):
        print("result:")
        text = json.dumps(MessageToDict(execution.result), indent=2, ensure_ascii=False)
        print("\n".join("  " + visible(line) for line in text.split("\n")))


def _json(value: object) -> str:
    """One line of JSON; json.dumps escapes C0 controls itself, :func:`visible` the rest (still valid JSON)."""
    return visible(json.dumps(value, ensure_ascii=False, sort_keys=True))
