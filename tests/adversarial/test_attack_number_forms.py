"""An agent sends numbers whose form changes on their way through the database; someone with the database's
grants corrupts one approved row. Neither may stop execution for anyone else.

PostgreSQL's JSONB keeps a number's decimal value, not its IEEE double: ``1e16`` comes back as the integer
10000000000000000 and ``1e300`` as a 301-digit integer. Before the fix the executor recomputed the action
digest from that re-read form; canonicalising it raised inside the claim transaction, the whole claim rolled
back, and the same oldest row was picked first again at every poll: nothing of any agent ran again. Now the
digest is taken over ``proposals.action_json``, the exact bytes the PDP digested, the executor runs the action
parsed from those bytes, and any failure to check one row refuses (or, at worst, sets aside) that row alone.

Every attack goes through the real gRPC API, a real executor, a real target and a real database.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import BACKENDS
from execution import Stack, execution_stack, running_executor
from sqlalchemy import delete, insert, select, text, update

from pdp.canonical import canonical_json
from pdp.client import PdpClient
from pdp.store.models import audit_events, execution_tickets, executions, proposals
from pdp.v1 import pdp_pb2

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

# Doubles whose text form differs between Python's repr, RFC 8785 and PostgreSQL's numeric.
NUMBERS = [1e16, float(2**53 + 2), 1e300, -0.0, 5e-324, 1.5e308, 0.1, 2.0**68, 1e21, -1.7976931348623157e308]


def as_policy_saw(value: float) -> int | float:
    """How the PDP reads a protobuf double (pdp/proposals/validation.py): integral and exact → int."""
    return int(value) if value.is_integer() and abs(value) <= 2**53 else value


@pytest.fixture(params=BACKENDS)
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    with execution_stack(request.param, tmp_path) as stack:
        yield stack


def _approved(client: PdpClient, stack: Stack, path: str, params: dict[str, Any]) -> str:
    response = client.propose("web", "POST", stack.target.url + path, "number forms", params=params)
    assert response.state == pdp_pb2.APPROVED, response
    return response.proposal_id


def _received(stack: Stack, path: str) -> Any:
    [seen] = [s for s in stack.target.seen if s.path == "/api/" + path]
    return json.loads(seen.body)


def _others(stack: Stack, count: int) -> tuple[PdpClient, list[str]]:
    """Another agent's ordinary proposals, recorded after the attacker's."""
    _agent, other = stack.server.agent_client()
    return other, [_approved(other, stack, f"items/other-{i}", {"i": i}) for i in range(count)]


def _refusals(stack: Stack, pid: str) -> list[str]:
    return [data["reason"] for kind, data in stack.audit(pid) if kind == "execution.refused"]


def test_numbers_reach_the_target_exactly_as_the_policy_saw_them_and_hold_no_one(stack: Stack) -> None:
    """Waiting rows, oldest first, carry every troublesome number; another agent's work is interleaved."""
    _agent, other = stack.server.agent_client()
    attacker, honest = [], []
    for i, number in enumerate(NUMBERS):
        params = {"n": number, "list": [number, 1], "nested": {"x": number}}
        attacker.append((_approved(stack.client, stack, f"items/n-{i}", params), f"items/n-{i}", number))
        honest.append(_approved(other, stack, f"items/other-{i}", {"i": i}))
    with running_executor(stack.config()):
        for pid in honest:
            assert other.wait(pid, timeout=30).state == pdp_pb2.SUCCEEDED
        for pid, _path, _number in attacker:
            assert stack.client.wait(pid, timeout=30).state == pdp_pb2.SUCCEEDED
    for _pid, path, number in attacker:
        seen = as_policy_saw(number)
        expected = {"n": seen, "list": [seen, 1], "nested": {"x": seen}}
        received = _received(stack, path)
        assert received == expected, (number, received)  # Python compares int and float exactly
        assert canonical_json(received) == canonical_json(expected)
    assert stack.target.count() == len(NUMBERS) * 2


def test_an_action_no_double_can_hold_is_refused_alone(stack: Stack) -> None:
    """The attacker rewrites an approved row's action with an integer that has no exact double (2**64 + 1)."""
    pid = _approved(stack.client, stack, "items/huge", {"n": 1})
    with stack.engine.begin() as conn:
        action = conn.execute(select(proposals.c.action).where(proposals.c.id == pid)).scalar_one()
        conn.execute(
            update(proposals).where(proposals.c.id == pid).values(action={**action, "params": {"n": 2**64 + 1}})
        )
    other, theirs = _others(stack, 3)
    with running_executor(stack.config()):
        for other_pid in theirs:
            assert other.wait(other_pid, timeout=30).state == pdp_pb2.SUCCEEDED
        final = stack.client.wait(pid, timeout=30)
    assert final.state == pdp_pb2.FAILED and final.execution.error.startswith("refused:")
    assert _refusals(stack, pid) == ["ticket.action_mismatch"]
    assert stack.target.count("/api/items/huge") == 0


def _corrupt(stack: Stack, pid: str, how: str) -> None:
    """What someone with the database's grants, but not the signing key, does to one approved row."""
    with stack.engine.begin() as conn:
        row = conn.execute(select(proposals.c.action, proposals.c.action_json).where(proposals.c.id == pid)).one()
        this = proposals.c.id == pid
        if how == "action_json-garbage":
            conn.execute(update(proposals).where(this).values(action_json='{"tool": "web", '))
        elif how == "action_json-missing":
            conn.execute(update(proposals).where(this).values(action_json=None))
        elif how == "action_json-not-an-object":
            conn.execute(update(proposals).where(this).values(action_json="[1,2]"))
        elif how == "action_json-rewritten":  # the JSONB copy edited to match: the digest still differs
            edited = {**json.loads(row.action_json), "resource": stack.target.url + "items/everything"}
            conn.execute(
                update(proposals)
                .where(this)
                .values(action_json=canonical_json(edited).decode(), action=edited, resource=edited["resource"])
            )
        elif how == "action-edited":  # the JSONB copy alone: what the approver page and the agent read
            edited = {**row.action, "resource": stack.target.url + "items/everything"}
            conn.execute(update(proposals).where(this).values(action=edited, resource=edited["resource"]))
        elif how == "ticket-missing":
            conn.execute(delete(execution_tickets).where(execution_tickets.c.proposal_id == pid))
        elif how == "execution-row-planted":  # starting it would collide with this row's key: an error, not a refusal
            conn.execute(
                insert(executions).values(
                    proposal_id=pid, tool="web", attempt=1, status="RUNNING", started_at=datetime.now(UTC)
                )
            )
        else:
            raise AssertionError(how)


CORRUPTIONS = {
    "action_json-garbage": "action.unreadable",
    "action_json-missing": "action.unreadable",
    "action_json-not-an-object": "action.unreadable",
    "action_json-rewritten": "ticket.action_mismatch",
    "action-edited": "ticket.action_mismatch",
    "ticket-missing": "ticket.missing",
    "execution-row-planted": "execution.unverifiable",
}


def test_corrupted_rows_are_refused_alone_while_the_others_run(stack: Stack) -> None:
    corrupted = {how: _approved(stack.client, stack, f"items/c-{i}", {"n": 1e16}) for i, how in enumerate(CORRUPTIONS)}
    for how, pid in corrupted.items():
        _corrupt(stack, pid, how)
    other, theirs = _others(stack, 4)
    with running_executor(stack.config()):
        for pid in theirs:
            assert other.wait(pid, timeout=30).state == pdp_pb2.SUCCEEDED
        for how, pid in corrupted.items():
            final = stack.client.wait(pid, timeout=30)
            assert final.state == pdp_pb2.FAILED, (how, final)
            assert final.execution.error.startswith("refused:"), how
            assert _refusals(stack, pid) == [CORRUPTIONS[how]], how
    assert sorted(s.path for s in stack.target.seen) == sorted(f"/api/items/other-{i}" for i in range(4))


def _refuse_every_write_of(stack: Stack, pid: str) -> None:
    """A row the database will not let anyone write an execution for (a trigger stands in for any such fault)."""
    with stack.engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(
                text(
                    "CREATE FUNCTION no_execution() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                    "RAISE EXCEPTION 'this row cannot be written'; END $$"
                )
            )
            conn.execute(
                text(
                    "CREATE TRIGGER no_execution BEFORE INSERT OR UPDATE ON executions FOR EACH ROW "
                    f"WHEN (NEW.proposal_id = '{pid}') EXECUTE FUNCTION no_execution()"
                )
            )
        else:
            conn.execute(
                text(
                    f"CREATE TRIGGER no_execution BEFORE INSERT ON executions WHEN NEW.proposal_id = '{pid}' "
                    "BEGIN SELECT RAISE(ABORT, 'this row cannot be written'); END"
                )
            )


def test_a_row_that_cannot_even_be_refused_is_set_aside_and_holds_no_one(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    stuck = _approved(stack.client, stack, "items/stuck", {"n": 1})
    _refuse_every_write_of(stack, stuck)
    other, theirs = _others(stack, 4)
    with caplog.at_level(logging.WARNING, logger="executor"), running_executor(stack.config()):
        for pid in theirs:
            assert other.wait(pid, timeout=30).state == pdp_pb2.SUCCEEDED
        for pid in (other.propose("web", "POST", stack.target.url + "items/later", "t").proposal_id,):
            assert other.wait(pid, timeout=30).state == pdp_pb2.SUCCEEDED
    assert stack.client.get(stuck).state == pdp_pb2.APPROVED  # nothing about it could be written
    with stack.engine.connect() as conn:
        events = conn.execute(select(audit_events.c.type).where(audit_events.c.proposal_id == stuck)).scalars().all()
    assert events == ["proposal.decided"]
    assert stack.target.count("/api/items/stuck") == 0
    assert any("set aside" in record.getMessage() and stuck in record.getMessage() for record in caplog.records)
