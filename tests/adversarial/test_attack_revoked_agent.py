"""Attack: an agent is revoked, but the work it already queued still gets approved and executed.

The operator revokes the agent with the real CLI (`pdp agents revoke`, as a subprocess) while its proposals
wait: one pending approval with a vote already cast, one allowed and waiting for the executor, one approved
at quorum and waiting for the executor. Approvers then try to vote through the real admin API, and a real
executor runs against a real target. Revocation must cancel all of them (audited, with the reason), every
vote must get 409 naming the revocation, the approval page must say the agent is revoked, and nothing of
the revoked agent may reach the target. Also: a row put back to pending behind the service's back (the
database grants, or a race) still cannot be voted on.
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from conftest import BULK_CLOSE, PDP, Server, pdp_env
from execution import Stack, execution_stack, running_executor
from sqlalchemy import select, update

from pdp.client import PdpClientError
from pdp.identity.approvers import add_approver
from pdp.store.models import approvals, audit_events, execution_tickets, proposals
from pdp.v1 import pdp_pb2

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

LEADS = "support-leads"


def revoke(database_url: str, agent_id: str, tmp_path: Path) -> str:
    """`pdp agents revoke ID`, as an operator runs it."""
    result = subprocess.run(
        [PDP, "agents", "revoke", agent_id, "--database-url", database_url],
        capture_output=True,
        text=True,
        env=pdp_env(tmp_path),
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def seen_body(client: httpx.Client, proposal_id: str) -> dict[str, str]:
    """An approval body as an approver sends it: the digest of the action the detail showed them."""
    return {"action_digest": client.get(f"/api/v1/proposals/{proposal_id}").json()["action_digest"]}


def approver(server: Server, *groups: str) -> httpx.Client:
    token = add_approver(server.engine, f"lead-{uuid.uuid4().hex[:8]}", groups)
    return httpx.Client(base_url=server.admin_url, headers={"Authorization": f"Bearer {token}"}, timeout=30)


def signed_in(server: Server, *groups: str) -> httpx.Client:
    """A browser-like client signed in to the approval page as a new approver."""
    token = add_approver(server.engine, f"page-lead-{uuid.uuid4().hex[:8]}", groups)
    browser = httpx.Client(base_url=server.admin_url, timeout=30)
    form = browser.get("/login")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert csrf is not None
    assert browser.post("/login", data={"token": token, "csrf_token": csrf.group(1)}).status_code == 303
    return browser


def state(server: Server, proposal_id: str) -> str:
    row = server.row(proposal_id)
    assert row is not None
    return str(row["state"])


def events(server: Server, **where: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(type, actor, data) of the audit events matching ``where`` (proposal_id or agent_id), in order."""
    query = select(audit_events.c.type, audit_events.c.actor, audit_events.c.body).order_by(audit_events.c.seq)
    for column, value in where.items():
        query = query.where(audit_events.c[column] == value)
    with server.engine.connect() as conn:
        return [(r.type, r.actor, json.loads(r.body)["data"]) for r in conn.execute(query)]


def votes(server: Server, proposal_id: str) -> int:
    with server.engine.connect() as conn:
        return len(conn.execute(select(approvals).where(approvals.c.proposal_id == proposal_id)).all())


def test_revocation_cancels_pending_proposals_and_every_later_vote_gets_409(server: Server, tmp_path: Path) -> None:
    agent = server.add_agent(owner="revoked-owner")
    client = server.client(agent.token)
    pending = client.propose("tickets", "POST", BULK_CLOSE, "close the duplicates", params={"count": 40})
    assert pending.state == pdp_pb2.PENDING_APPROVAL
    first, second = approver(server, LEADS), approver(server, LEADS)
    with first, second:
        assert (
            first.post(
                f"/api/v1/proposals/{pending.proposal_id}/approve", json=seen_body(first, pending.proposal_id)
            ).status_code
            == 200
        )

        printed = revoke(server.database_url, agent.id, tmp_path)

        # The second lead would have completed the quorum: refused, with the reason.
        for verb, body in (("approve", seen_body(second, pending.proposal_id)), ("reject", {"reason": "no"})):
            response = second.post(f"/api/v1/proposals/{pending.proposal_id}/{verb}", json=body)
            assert response.status_code == 409, response.text
            assert "revoked" in response.json()["error"]
        assert state(server, pending.proposal_id) == "CANCELLED"
        assert votes(server, pending.proposal_id) == 1

        # The approver sees why, in the JSON API and on the page.
        detail = second.get(f"/api/v1/proposals/{pending.proposal_id}").json()
        assert detail["agent_status"] == "revoked" and detail["agent_revoked_at"]
        assert detail["can_vote"] is False
    with closing(signed_in(server, LEADS)) as page:
        shown = page.get(f"/proposals/{pending.proposal_id}")
        assert shown.status_code == 200
        assert 'id="agent-revoked"' in shown.text and "was revoked at" in shown.text
        assert 'id="approve-form"' not in shown.text

    with server.engine.connect() as conn:
        ticket = conn.execute(
            select(execution_tickets.c.proposal_id).where(execution_tickets.c.proposal_id == pending.proposal_id)
        ).first()
    assert ticket is None
    revoked = events(server, agent_id=agent.id)
    assert [t for t, _, _ in revoked if t == "agent.revoked"] == ["agent.revoked"]
    _, actor, data = next(e for e in revoked if e[0] == "agent.revoked")
    assert actor.startswith("cli:") and data["agent_id"] == agent.id
    cancelled = [e for e in events(server, proposal_id=pending.proposal_id) if e[0] == "proposal.cancelled"]
    assert len(cancelled) == 1
    _, actor, data = cancelled[0]
    assert actor.startswith("cli:")
    assert data == {"from_state": "PENDING_APPROVAL", "to_state": "CANCELLED", "reason": "agent revoked"}
    assert f"cancelled {pending.proposal_id}" in printed
    # The token is dead too.
    with pytest.raises(PdpClientError) as refused:
        client.get(pending.proposal_id)
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_a_row_put_back_to_pending_cannot_be_voted_on(server: Server, tmp_path: Path) -> None:
    agent = server.add_agent(owner="revoked-owner-2")
    pending = server.client(agent.token).propose(
        "tickets", "POST", BULK_CLOSE, "close the duplicates", params={"count": 40}
    )
    assert pending.state == pdp_pb2.PENDING_APPROVAL
    revoke(server.database_url, agent.id, tmp_path)
    # Someone with the database's grants (or a proposal recorded in a race with the revocation) makes the row
    # pending again: the vote path itself must refuse a revoked agent's proposal.
    with server.engine.begin() as conn:
        conn.execute(update(proposals).where(proposals.c.id == pending.proposal_id).values(state="PENDING_APPROVAL"))
    first, second = approver(server, LEADS), approver(server, LEADS)
    with first, second:
        for client in (first, second):
            response = client.post(
                f"/api/v1/proposals/{pending.proposal_id}/approve", json=seen_body(client, pending.proposal_id)
            )
            assert response.status_code == 409, response.text
            assert "revoked" in response.json()["error"]
        # Listed, so that a human notices it, but marked.
        listed = first.get("/api/v1/proposals", params={"limit": 200}).json()["proposals"]
        shown = [p for p in listed if p["id"] == pending.proposal_id]
        assert [p["agent_status"] for p in shown] == ["revoked"]
    assert votes(server, pending.proposal_id) == 0
    assert state(server, pending.proposal_id) == "PENDING_APPROVAL"
    assert "proposal.approved" not in [t for t, _, _ in events(server, proposal_id=pending.proposal_id)]


@pytest.fixture(params=["sqlite", "postgres"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    with execution_stack(request.param, tmp_path) as stack:
        yield stack


def test_approved_work_waiting_for_the_executor_never_runs_after_revocation(stack: Stack, tmp_path: Path) -> None:
    server = stack.server
    assert server.running is not None
    victim = server.add_agent(owner="victim-owner")
    client = server.client(victim.token)
    items = stack.target.url + "items"
    allowed = client.propose("web", "POST", items, "create it", params={"title": "allowed"})
    assert allowed.state == pdp_pb2.APPROVED
    big = client.propose("web", "POST", items, "create a big one", params={"title": "approved", "big": True})
    assert big.state == pdp_pb2.PENDING_APPROVAL
    with approver(server, "ops") as ops:
        voted = ops.post(f"/api/v1/proposals/{big.proposal_id}/approve", json=seen_body(ops, big.proposal_id))
        assert voted.json()["state"] == "APPROVED"

    printed = revoke(server.database_url, victim.id, tmp_path)  # no executor is running yet

    control = stack.client.propose("web", "POST", items, "another agent's work", params={"title": "control"})
    assert control.state == pdp_pb2.APPROVED
    with running_executor(stack.config()):
        # Claims take the oldest approved rows first: once the newer control ran, the victims were passed over.
        assert stack.client.wait(control.proposal_id, timeout=60).state == pdp_pb2.SUCCEEDED
    bodies = [json.loads(seen.body) for seen in stack.target.seen]
    assert [body["title"] for body in bodies] == ["control"]
    for proposal_id, from_state in ((allowed.proposal_id, "APPROVED"), (big.proposal_id, "APPROVED")):
        assert state(server, proposal_id) == "CANCELLED"
        kinds = stack.audit_types(proposal_id)
        assert not [k for k in kinds if k.startswith("execution.")], kinds
        cancelled = [data for kind, data in stack.audit(proposal_id) if kind == "proposal.cancelled"]
        assert cancelled == [{"from_state": from_state, "to_state": "CANCELLED", "reason": "agent revoked"}]
        assert f"cancelled {proposal_id}" in printed
