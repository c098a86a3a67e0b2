"""Someone with the database's grants resets a finished execution's rows so recovery would run it again.

The attacker sets ``executions.status`` back to RUNNING with a lapsed lease and ``proposals.state`` back to
EXECUTING. Before the fix, recovery took that for a crashed worker: an idempotent tool ran again (its ticket
checked without its expiry), a non-idempotent one had its recorded SUCCEEDED overwritten with UNKNOWN, and
a refusal overwrote the recorded result with FAILED. Now recovery asks the append-only audit log: an
execution whose end it records is put back to that end, the attempt is refused and audited, and nothing
runs. A retry of a genuinely abandoned attempt also needs a ticket that has not expired: after a long
outage it ends FAILED with the reason, and a human proposes again.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import BACKENDS
from execution import ExecutorProcess, Stack, execution_stack, running_executor
from google.protobuf.json_format import MessageToDict
from sqlalchemy import update

from executor.config import load
from executor.main import build
from executor.worker import Executor
from pdp.store.models import executions, proposals
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


def _reset(stack: Stack, pid: str) -> None:
    """What a holder of the database's grants does so that recovery takes the execution for abandoned."""
    with stack.engine.begin() as conn:
        conn.execute(
            update(executions)
            .where(executions.c.proposal_id == pid)
            .values(
                status="RUNNING",
                worker="long-gone",
                lease_expires_at=datetime.now(UTC) - timedelta(hours=1),
                finished_at=None,
            )
        )
        conn.execute(update(proposals).where(proposals.c.id == pid).values(state="EXECUTING"))


def _refusals(stack: Stack, pid: str) -> list[str]:
    return [data["reason"] for kind, data in stack.audit(pid) if kind == "execution.refused"]


@pytest.mark.parametrize(("tool", "path", "operation"), [("kv", "kv/note", "PUT"), ("web", "items", "POST")])
def test_a_reset_finished_execution_is_not_run_again_and_keeps_its_result(
    stack: Stack, tool: str, path: str, operation: str
) -> None:
    config = stack.config(lease="1s", retry_backoff="100ms")
    pid = stack.client.propose(tool, operation, stack.target.url + path, "t", params={"n": 1e16}).proposal_id
    with running_executor(config):
        done = stack.client.wait(pid, timeout=30)
    assert done.state == pdp_pb2.SUCCEEDED, done
    recorded = MessageToDict(done.execution.result)
    _reset(stack, pid)
    with running_executor(config):
        final = stack.client.wait(pid, timeout=30)
    assert final.state == pdp_pb2.SUCCEEDED, final  # what the audit log says happened
    assert final.execution.status == "SUCCEEDED" and not final.execution.error
    assert MessageToDict(final.execution.result) == recorded
    assert stack.target.count() == 1
    assert _refusals(stack, pid) == ["ticket.consumed"]
    assert stack.audit_types(pid).count("execution.started") == 1


@contextmanager
def executor_later(config: Path, later: timedelta) -> Iterator[Executor]:
    """A real executor whose clock runs ``later`` ahead: it comes back after a long outage."""
    executor = build(load(config, env={}), clock=lambda: datetime.now(UTC) + later)
    executor.start()
    try:
        yield executor
    finally:
        executor.stop()


def test_an_abandoned_idempotent_execution_is_not_retried_once_its_ticket_expired(stack: Stack) -> None:
    """kill -9 mid-call, and the next executor comes back an hour later (tickets last 10 minutes)."""
    stack.target.slow_seconds = 2.0
    config = stack.config(lease="1s", retry_backoff="100ms", timeout="20s")
    first = ExecutorProcess(config, stack.tmp / "executor-1.log")
    first.wait_started()
    pid = stack.client.propose("kv", "PUT", stack.target.url + "kv/late", "t").proposal_id
    wait_for(lambda: stack.target.count("/api/kv/") == 1, "the call to reach the target")
    first.kill()
    assert stack.client.get(pid).state == pdp_pb2.EXECUTING
    with executor_later(config, timedelta(hours=1)):
        final = stack.client.wait(pid, timeout=30)
    assert final.state == pdp_pb2.FAILED, final
    assert final.execution.status == "FAILED"
    assert final.execution.error.startswith("refused: the ticket expired at")
    assert _refusals(stack, pid) == ["ticket.expired"]
    assert stack.target.count("/api/kv/") == 1  # never run again
    kinds: list[Any] = stack.audit_types(pid)
    assert kinds == ["proposal.decided", "execution.started", "execution.refused"]


def test_a_call_reset_twice_while_it_runs_keeps_its_real_outcome(stack: Stack) -> None:
    """The attacker puts a running proposal back to APPROVED twice. Each claim refuses it and leaves it EXECUTING
    (its worker is still calling the target); that refusal is no end of the execution, so the second one must
    not "restore" a FAILED end over the running call: the call's real result is recorded, once."""
    stack.target.slow_seconds = 2.0
    config = stack.config(timeout="20s")
    pid = stack.client.propose("web", "POST", stack.target.url + "items", "t", params={"n": 1}).proposal_id
    with running_executor(config):
        wait_for(lambda: stack.target.count() == 1, "the call to reach the target")
        for round_ in (1, 2):
            with stack.engine.begin() as conn:
                conn.execute(update(proposals).where(proposals.c.id == pid).values(state="APPROVED"))
            refused = functools.partial(lambda n: len(_refusals(stack, pid)) == n, round_)
            wait_for(refused, f"refusal {round_}")
        final = stack.client.wait(pid, timeout=30)
    assert final.state == pdp_pb2.SUCCEEDED, final
    assert final.execution.status == "SUCCEEDED" and not final.execution.error
    assert stack.target.count() == 1
    assert "execution.late_result" not in stack.audit_types(pid)
