"""End to end: propose → allow → the executor carries it out against a real target → the agent reads the result."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from execution import Stack, execution_stack, running_executor
from google.protobuf.json_format import MessageToDict
from sqlalchemy import select, text

from pdp.client import PdpClient
from pdp.store.database import create_db_engine
from pdp.store.models import audit_events, executions
from pdp.v1 import pdp_pb2

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


TIMEOUT = "2s"  # the connector's time limit: the slow-target test waits it out


@pytest.fixture(params=["sqlite", "postgres"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    with execution_stack(request.param, tmp_path, crm=True) as stack:
        yield stack


def propose(client: PdpClient, tool: str, operation: str, resource: str, **params: object) -> str:
    response = client.propose(tool, operation, resource, "testing the executor", params=dict(params))
    assert response.decision.outcome == pdp_pb2.ALLOW, response
    return response.proposal_id


def test_allowed_http_action_is_executed_once_and_the_agent_reads_the_result(stack: Stack) -> None:
    with running_executor(stack.config(timeout=TIMEOUT)):
        pid = propose(stack.client, "web", "POST", stack.target.url + "items", title="printer on fire")
        final = stack.client.wait(pid, timeout=30)
    assert final.state == pdp_pb2.SUCCEEDED, final
    assert final.execution.status == "SUCCEEDED"
    result = MessageToDict(final.execution.result)
    assert result["status"] == 201
    assert json.loads(result["body"]["received"]) == {"title": "printer on fire"}
    assert final.execution.HasField("started_at") and final.execution.HasField("finished_at")
    assert stack.target.count("/api/items") == 1
    request = stack.target.seen[0]
    assert request.method == "POST"
    assert request.headers["Authorization"] == f"Bearer {stack.target.token}"
    assert request.headers["Idempotency-Key"] == pid


def test_sql_action_reads_the_real_database(stack: Stack) -> None:
    with running_executor(stack.config(timeout=TIMEOUT)):
        pid = propose(stack.client, "crm", "select", "sql://crm/contacts", where={"name": "Ada"})
        final = stack.client.wait(pid, timeout=30)
    assert final.state == pdp_pb2.SUCCEEDED, final
    rows = MessageToDict(final.execution.result)["rows"]
    assert rows == [{"id": 1.0, "name": "Ada", "email": "ada@example.com"}]


def test_watch_shows_executing_then_succeeded(stack: Stack) -> None:
    stack.target.slow_seconds = 0.6
    with running_executor(stack.config(timeout=TIMEOUT)):
        pid = propose(stack.client, "web", "POST", stack.target.url + "slow")
        states = [pdp_pb2.ProposalState.Name(p.state) for p in stack.client.watch(pid, timeout=30)]
    assert states[-2:] == ["EXECUTING", "SUCCEEDED"], states


def test_a_failing_target_fails_the_proposal_with_the_reason(stack: Stack) -> None:
    with running_executor(stack.config(timeout=TIMEOUT)):
        pid = propose(stack.client, "web", "POST", stack.target.url + "fail")
        final = stack.client.wait(pid, timeout=30)
    assert final.state == pdp_pb2.FAILED
    assert "HTTP 500" in final.execution.error
    assert stack.target.token not in final.execution.error
    assert "[REDACTED]" in final.execution.error


def test_a_target_slower_than_the_timeout_fails_with_timeout(stack: Stack) -> None:
    stack.target.slow_seconds = 4
    with running_executor(stack.config(timeout=TIMEOUT)):
        pid = propose(stack.client, "web", "POST", stack.target.url + "slow")
        final = stack.client.wait(pid, timeout=30)
    assert final.state == pdp_pb2.FAILED
    assert final.execution.error.startswith("timeout")


def test_every_step_is_audited(stack: Stack) -> None:
    with running_executor(stack.config(timeout=TIMEOUT)):
        pid = propose(stack.client, "web", "POST", stack.target.url + "items")
        stack.client.wait(pid, timeout=30)
    engine = create_db_engine(stack.server.database_url)
    with engine.connect() as conn:
        types = (
            conn.execute(
                select(audit_events.c.type).where(audit_events.c.proposal_id == pid).order_by(audit_events.c.seq)
            )
            .scalars()
            .all()
        )
        row = conn.execute(select(executions).where(executions.c.proposal_id == pid)).mappings().one()
    engine.dispose()
    assert types == ["proposal.decided", "execution.started", "execution.succeeded"]
    assert row["status"] == "SUCCEEDED" and row["attempt"] == 1 and row["worker"] is None


def test_the_auditors_view_lists_the_execution_steps(stack: Stack) -> None:
    with running_executor(stack.config(timeout=TIMEOUT)):
        ok = propose(stack.client, "web", "POST", stack.target.url + "items")
        failed = propose(stack.client, "web", "POST", stack.target.url + "fail")
        for pid in (ok, failed):
            stack.client.wait(pid, timeout=30)
    query = text("SELECT proposal_id, status, tool, resource, error, policy_version FROM audit_executions ORDER BY seq")
    with stack.server.engine.connect() as conn:
        rows = [tuple(r) for r in conn.execute(query)]
    version = stack.client.get(ok).decision.policy_version
    steps = {pid: [(r[1], r[4]) for r in rows if r[0] == pid] for pid in (ok, failed)}
    assert steps[ok] == [("started", None), ("succeeded", None)]
    assert [s for s, _ in steps[failed]] == ["started", "failed"] and "HTTP 500" in steps[failed][1][1]
    assert {r[2] for r in rows} == {"web"} and {r[3] for r in rows if r[0] == ok} == {stack.target.url + "items"}
    assert {r[5] for r in rows} == {version}
