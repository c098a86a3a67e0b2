"""One agent cannot shut a tool for everyone, nor keep a failing one open for everyone (issue 10, finding 8).

The attacker holds a valid agent token and talks to the real gRPC API; a real executor (short timeout, small
cool-down) calls a real target whose ``/api/slow`` path never answers in time. Every timeout is a failure the
breaker counts, and the agent picks the path: before the fix, three slow GETs opened the tool's breaker for
every agent, and again after each cool-down.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from execution import Stack, execution_stack, running_executor
from sqlalchemy import or_, select
from test_executor_recovery import wait_for

from pdp.client import PdpClient
from pdp.store.models import audit_events
from pdp.v1 import pdp_pb2

FAILURES = 3
COOLDOWN = 4  # seconds; long enough for the checks made while the attacker's breaker is open


@pytest.fixture(params=["sqlite", "postgres"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    with execution_stack(request.param, tmp_path) as stack:
        yield stack


def _log(stack: Stack) -> list[tuple[str, str | None, dict[str, Any]]]:
    """(type, agent_id, data) of every breaker event and execution start, in chain order."""
    with stack.engine.connect() as conn:
        rows = conn.execute(
            select(audit_events.c.type, audit_events.c.agent_id, audit_events.c.body)
            .where(or_(audit_events.c.type.like("circuit.%"), audit_events.c.type == "execution.started"))
            .order_by(audit_events.c.seq)
        ).all()
    return [(row.type, row.agent_id, json.loads(row.body)["data"]) for row in rows]


def _opened(stack: Stack) -> list[int]:
    """Positions in :func:`_log` of every circuit.opened event."""
    return [i for i, (kind, _, _) in enumerate(_log(stack)) if kind == "circuit.opened"]


def _uses_the_tool(client: PdpClient, url: str) -> None:
    decision = client.evaluate("web", "GET", url + "items", "t")
    assert decision.outcome == pdp_pb2.ALLOW, decision
    for operation in ("GET", "POST"):
        response = client.propose("web", operation, url + "items", "t")
        assert response.state == pdp_pb2.APPROVED, response.decision
        assert client.wait(response.proposal_id, timeout=30).state == pdp_pb2.SUCCEEDED


def test_slow_gets_from_one_agent_shut_the_tool_for_that_agent_alone(stack: Stack) -> None:
    attacker_agent, attacker = stack.server.agent_client()
    victims = [stack.server.agent_client()[1] for _ in range(2)]
    url = stack.target.url
    stack.target.slow_seconds = 30.0  # /api/slow never answers within the executor's timeout
    config = stack.config(timeout="300ms", concurrency=2, breaker={"failures": FAILURES, "cooldown": f"{COOLDOWN}s"})
    with running_executor(config):
        # The attack: more slow GETs than it takes, all at once; the executor runs two at a time, so the last
        # ones are still APPROVED, older than anything the victims propose, when the breaker opens.
        attack = [attacker.propose("web", "GET", url + f"slow/{i}", "t") for i in range(FAILURES + 3)]
        assert all(r.state == pdp_pb2.APPROVED for r in attack)
        wait_for(lambda: len(_opened(stack)) >= 1, "a breaker to open")

        def attacker_denied() -> bool:
            return attacker.evaluate("web", "GET", url + "items", "t").outcome == pdp_pb2.DENY

        wait_for(attacker_denied, "the PDP to see the open breaker")
        for victim in victims:
            decision = victim.evaluate("web", "GET", url + "items", "t")
            assert decision.outcome == pdp_pb2.ALLOW, f"one agent shut the tool for everyone: {decision.reasons[0]}"
        # The attacker is denied, told that this is its own breaker, and when to retry...
        denied = attacker.propose("web", "GET", url + "items", "t")
        assert denied.state == pdp_pb2.DENIED
        reason = denied.decision.reasons[0]
        assert reason.rule_id == "circuit.open"
        assert "this agent's" in reason.message and "retry after" in reason.message
        assert 1 <= denied.decision.retry_after_seconds <= COOLDOWN
        # ...and everyone else keeps the tool: the attacker's own waiting proposals do not hold theirs back.
        for victim in victims:
            _uses_the_tool(victim, url)

        # After the cool-down: one trial, the attacker's oldest waiting GET; it times out and the attacker's
        # breaker opens again. Nothing else of the attacker ran in between.
        wait_for(lambda: len(_opened(stack)) >= 2, "the attacker's trial to fail", timeout=60)
        wait_for(attacker_denied, "the PDP to see the breaker open again")
        for victim in victims:
            _uses_the_tool(victim, url)

    log = _log(stack)
    first, second = _opened(stack)[:2]
    breaker_events = [(agent, data) for kind, agent, data in log if kind.startswith("circuit.")]
    assert all(agent == attacker_agent.id and data["scope"] == "agent" for agent, data in breaker_events)
    started = [agent for kind, agent, _ in log[first:second] if kind == "execution.started"]
    assert started.count(attacker_agent.id) == 1  # its trial, and nothing else of the attacker
    assert log[second][2]["trial_proposal_id"] in {r.proposal_id for r in attack[FAILURES + 1 :]}


def test_one_agents_successes_do_not_hide_a_failing_target_from_the_breaker(stack: Stack) -> None:
    """A target failing for everyone else still opens the tool-wide breaker, however often one agent succeeds."""
    lucky = stack.server.agent_client()[1]
    failing = [stack.server.agent_client()[1] for _ in range(2)]
    bystander = stack.server.agent_client()[1]
    url = stack.target.url
    with running_executor(stack.config(breaker={"failures": FAILURES, "cooldown": "1h"})):
        for turn in range(2 * FAILURES):
            fails = failing[turn % 2].propose("web", "POST", url + "fail", "t").proposal_id
            assert failing[turn % 2].wait(fails, timeout=30).state == pdp_pb2.FAILED
            if _opened(stack):
                break
            works = lucky.propose("web", "POST", url + "items", "t").proposal_id
            assert lucky.wait(works, timeout=30).state == pdp_pb2.SUCCEEDED
        opened = [data for kind, _, data in _log(stack) if kind == "circuit.opened"]
        assert [data.get("scope") for data in opened] == ["tool"], "the failures were hidden by one agent's successes"

        def denied(client: PdpClient) -> bool:
            return client.evaluate("web", "POST", url + "items", "t").outcome == pdp_pb2.DENY

        wait_for(lambda: denied(bystander), "the PDP to see the tool-wide breaker")
        for client in (lucky, bystander):
            response = client.propose("web", "POST", url + "items", "t")
            assert response.state == pdp_pb2.DENIED and response.decision.reasons[0].rule_id == "circuit.open"
            assert "this agent's" not in response.decision.reasons[0].message
