"""What a proposal records about its decision's input, and how to rebuild that input.

The PDP writes it with every proposal (``decision_input`` and ``action``); approvals re-decide from
it at quorum and ``pdp policy replay`` re-decides from it with a candidate bundle.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pdp.canonical import timestamp
from pdp.policy.engine import ActionInput, AgentIdentity, DecisionInput


def decision_context(request: DecisionInput) -> dict[str, Any]:
    """What besides the action the decision saw, so it can be replayed exactly."""
    agent = request.agent
    return {
        "agent": {
            "id": agent.id,
            "owner": agent.owner,
            "roles": list(agent.roles),
            "labels": dict(agent.labels),
        },
        "context": {"now": timestamp(request.now), "environment": request.environment},
        "usage": dict(request.usage),
    }


def decision_input(action: dict[str, Any], context: dict[str, Any]) -> DecisionInput:
    """The input :func:`decision_context` recorded; KeyError/TypeError/ValueError when it is incomplete."""
    agent, moment = context["agent"], context["context"]
    return DecisionInput(
        agent=AgentIdentity(
            id=str(agent["id"]),
            owner=str(agent.get("owner", "")),
            roles=tuple(agent.get("roles", ())),
            labels=dict(agent.get("labels", {})),
        ),
        action=ActionInput(
            tool=str(action["tool"]),
            operation=str(action["operation"]),
            resource=str(action["resource"]),
            params=dict(action.get("params") or {}),
            estimated_cost_usd=float(action.get("estimated_cost_usd", 0.0)),
            labels=dict(action.get("labels") or {}),
        ),
        now=datetime.fromisoformat(str(moment["now"]).replace("Z", "+00:00")),
        environment=str(moment.get("environment", "")),
        usage=dict(context.get("usage", {})),
    )
