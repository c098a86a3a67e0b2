"""Issue 10, finding 1: an agent recovered 47 of 48 characters of the executor's credential.

The http connector cut a 4xx body to its first 500 characters, and a 2xx body at ``max_response_bytes``,
before anything was redacted; a credential split by the cut was no longer a whole form, so it was not
scrubbed. The agent moves the cut: its own request body sits before the echoed headers, so padding the
params slides the echoed ``Authorization`` header across the cut one character at a time.

Here the agent does exactly that through the real gRPC API, against a real target that echoes the request
(body first, then headers, as httpbin does) and a real `pdp-executor` process, for the 4xx error path and
the truncated 2xx path, with the cut falling at every offset across the credential. No 8 characters of
the credential, in any covered form, may reach the agent, the proposal or executions row, the audit
events, or the executor's output.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from credential_pieces import leaked
from execution import ExecutorProcess, Stack, execution_stack
from google.protobuf.json_format import MessageToJson
from sqlalchemy import select

from executor.connectors.http import ERROR_BODY_CHARS
from pdp.store.models import audit_events, executions, proposals
from pdp.v1 import pdp_pb2

MAX_RESPONSE_BYTES = 600  # the web tool's read limit in this test: the truncated 2xx path cuts here
CALIBRATION_PAD = 300  # keeps the body's Content-Length at three digits for every pad of the sweep
WAIT = 60.0  # seconds: a bound for one proposal to finish, never an expectation about speed


@pytest.fixture(params=["sqlite", "postgres"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    with execution_stack(request.param, tmp_path) as stack:
        yield stack


@pytest.fixture
def executor(stack: Stack) -> Iterator[ExecutorProcess]:
    config = stack.config(timeout="5s", http={"max_response_bytes": MAX_RESPONSE_BYTES}, concurrency=8)
    process = ExecutorProcess(config, stack.tmp / "executor.log")
    try:
        process.wait_started()
        yield process
    finally:
        process.stop()


def propose(stack: Stack, status: int, pad: int) -> str:
    """What the agent sends: a POST whose body (echoed before the headers) is ``pad`` characters longer."""
    resource = f"{stack.target.url}status/{status}"
    response = stack.client.propose("web", "POST", resource, "moving the cut", params={"pad": "." * pad})
    assert response.decision.outcome == pdp_pb2.ALLOW, response
    return response.proposal_id


def offset_in_reply(stack: Stack, proposal_id: str, credential: str) -> int:
    """Where the target put the credential in its reply to this proposal's request (the reply is ASCII)."""
    return stack.target.request_for(proposal_id).reply.index(credential.encode())


def rows_as_text(stack: Stack, proposal_id: str) -> str:
    """The proposal row, the executions row and the proposal's audit events, as text."""
    with stack.engine.connect() as conn:
        rows: list[Any] = [
            *conn.execute(select(proposals).where(proposals.c.id == proposal_id)).mappings(),
            *conn.execute(select(executions).where(executions.c.proposal_id == proposal_id)).mappings(),
            *conn.execute(select(audit_events).where(audit_events.c.proposal_id == proposal_id)).mappings(),
        ]
    assert len(rows) >= 4, rows  # proposal, execution, decision and execution events at least
    return "\n".join(json.dumps(dict(row), default=str, ensure_ascii=False) for row in rows)


def test_no_piece_of_the_credential_survives_a_cut_the_agent_places(stack: Stack, executor: ExecutorProcess) -> None:
    token = stack.target.token
    credential = f"Bearer {token}"  # what the target echoes: the header the executor sent
    paths = {400: ERROR_BODY_CHARS, 200: MAX_RESPONSE_BYTES}  # status -> where the connector cuts the body

    # One request per path shows where the credential sits for a known pad; each character of pad moves it by one.
    calibration = {status: propose(stack, status, CALIBRATION_PAD) for status in paths}
    for pid in calibration.values():
        stack.client.wait(pid, timeout=WAIT)
    sweep: dict[str, tuple[int, int]] = {}  # proposal -> (status, characters of the credential before the cut)
    for status, limit in paths.items():
        at_calibration = offset_in_reply(stack, calibration[status], credential)
        for kept in range(len(credential) + 1):
            pad = CALIBRATION_PAD + (limit - kept) - at_calibration  # puts the credential's start at limit - kept
            sweep[propose(stack, status, pad)] = (status, kept)
    finals = {pid: stack.client.wait(pid, timeout=WAIT) for pid in [*calibration.values(), *sweep]}

    # The sweep did what it says: for each path, the cut fell at every offset across the credential.
    for status, limit in paths.items():
        cuts = {limit - offset_in_reply(stack, pid, credential) for pid, (s, _) in sweep.items() if s == status}
        assert set(range(len(credential) + 1)) <= cuts, (status, sorted(cuts))

    for pid, final in finals.items():
        if stack.target.request_for(pid).path.endswith("/400"):
            assert final.state == pdp_pb2.FAILED, final
            assert final.execution.error.startswith("HTTP 400: "), final.execution.error
        else:
            assert final.state == pdp_pb2.SUCCEEDED, final
            assert final.execution.result["truncated"] is True, final.execution.result
        seen = MessageToJson(final)
        assert leaked(final.execution.error, token) == [], (pid, final.execution.error)
        assert leaked(seen, token) == [], (pid, seen)
        assert leaked(rows_as_text(stack, pid), token) == [], pid
    # Where the whole credential came before the cut, it was scrubbed, not dropped.
    whole = [pid for pid, (_, kept) in sweep.items() if kept == len(credential)]
    assert all("[REDACTED]" in MessageToJson(finals[pid]) for pid in whole)

    assert executor.stop() == 0
    output = executor.output()
    assert "executing tools" in output
    assert leaked(output, token) == []
