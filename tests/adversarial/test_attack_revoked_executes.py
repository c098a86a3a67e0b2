"""A revoked agent's approved work must not run: the executor is the backstop for revocation.

An agent's allowed proposal waits for the executor (APPROVED); meanwhile the agent is revoked
(``agents.revoked_at`` set: what revocation writes). Before the fix the executor ran it anyway, and retried
a revoked agent's abandoned idempotent execution too. Now both are refused with ``agent.revoked``, audited,
FAILED, and nothing reaches the target, while other agents' work runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import BACKENDS
from execution import ExecutorProcess, Stack, execution_stack, running_executor
from sqlalchemy import select, update

from pdp.store.models import agents, executions, proposals
from pdp.v1 import pdp_pb2

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(params=BACKENDS)
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    with execution_stack(request.param, tmp_path) as stack:
        yield stack


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _revoke(stack: Stack, agent_id: str) -> None:
    with stack.engine.begin() as conn:
        conn.execute(update(agents).where(agents.c.id == agent_id).values(revoked_at=datetime.now(UTC)))


def _state(stack: Stack, pid: str) -> str:
    """Read from the database: a revoked agent's token no longer reads anything."""
    with stack.engine.connect() as conn:
        return str(conn.execute(select(proposals.c.state).where(proposals.c.id == pid)).scalar_one())


def _refusals(stack: Stack, pid: str) -> list[str]:
    return [data["reason"] for kind, data in stack.audit(pid) if kind == "execution.refused"]


def test_an_approved_proposal_of_a_revoked_agent_is_refused_and_never_runs(stack: Stack) -> None:
    rogue, client = stack.server.agent_client()
    waiting = [client.propose("web", "POST", stack.target.url + f"items/rogue-{i}", "t").proposal_id for i in range(3)]
    _revoke(stack, rogue.id)
    honest = stack.client.propose("web", "POST", stack.target.url + "items/honest", "t").proposal_id
    with running_executor(stack.config()):
        assert stack.client.wait(honest, timeout=30).state == pdp_pb2.SUCCEEDED
        for pid in waiting:
            wait_for(lambda pid=pid: _state(stack, pid) == "FAILED", f"{pid} to be refused")  # type: ignore[misc]
    for pid in waiting:
        assert _refusals(stack, pid) == ["agent.revoked"]
        assert "execution.started" not in stack.audit_types(pid)
        with stack.engine.connect() as conn:
            row = conn.execute(select(executions.c.status, executions.c.error).where(executions.c.proposal_id == pid))
            status, error = row.one()
        assert status == "FAILED" and error.startswith(f"refused: agent {rogue.id!r} was revoked")
    assert [s.path for s in stack.target.seen] == ["/api/items/honest"]


def test_an_abandoned_idempotent_execution_of_a_revoked_agent_is_not_retried(stack: Stack) -> None:
    rogue, client = stack.server.agent_client()
    stack.target.slow_seconds = 2.0
    config = stack.config(lease="1s", retry_backoff="100ms", timeout="20s")
    first = ExecutorProcess(config, stack.tmp / "executor-1.log")
    first.wait_started()
    pid = client.propose("kv", "PUT", stack.target.url + "kv/rogue", "t").proposal_id
    wait_for(lambda: stack.target.count("/api/kv/") == 1, "the call to reach the target")
    first.kill()
    _revoke(stack, rogue.id)
    second = ExecutorProcess(config, stack.tmp / "executor-2.log")
    second.wait_started()
    try:
        wait_for(lambda: _state(stack, pid) == "FAILED", "recovery to refuse the retry")
    finally:
        second.stop()
    assert _refusals(stack, pid) == ["agent.revoked"]
    assert stack.audit_types(pid) == ["proposal.decided", "execution.started", "execution.refused"]
    assert stack.target.count("/api/kv/") == 1
