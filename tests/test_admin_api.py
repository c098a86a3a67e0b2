"""The approvers' JSON API against a real server (gRPC + admin endpoint) on SQLite and PostgreSQL.

Proposals come from agents over gRPC with the example bundle: a support agent's bulk close of 40 tickets needs
two approvals from support-leads; raising a ticket to critical needs one from the default group, ops-oncall.
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import pytest
from conftest import BULK_CLOSE, TICKETS, Server
from sqlalchemy import select

from pdp.canonical import digest
from pdp.identity.approvers import add_approver, revoke_approver
from pdp.store.models import approvals
from pdp.v1 import pdp_pb2

LEADS = "support-leads"
ONCALL = "ops-oncall"
NOTE = "written by the agent; not verified and never seen by policy"
_numbers = itertools.count(1)


@dataclass
class Admin:
    server: Server
    url: str  # the admin endpoint, http://127.0.0.1:<port>

    def approver(self, *groups: str, approver_id: str = "") -> tuple[str, httpx.Client]:
        """A new approver in ``groups`` and an HTTP client that sends their bearer token."""
        approver_id = approver_id or f"approver-{next(_numbers)}-{uuid.uuid4().hex[:6]}"
        token = add_approver(self.server.engine, approver_id, groups)
        return approver_id, self.http(token)

    def http(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def bulk_close(self, owner: str = "tester", justification: str = "close the duplicates") -> str:
        """A pending proposal that needs two support leads."""
        agent = self.server.add_agent(owner=owner)
        response = self.server.client(agent.token).propose(
            "tickets", "POST", BULK_CLOSE, justification, params={"count": 40}
        )
        assert response.decision.outcome == pdp_pb2.NEEDS_APPROVAL
        return response.proposal_id

    def critical(self) -> str:
        """A pending proposal that needs one of ops-oncall."""
        agent = self.server.add_agent()
        response = self.server.client(agent.token).propose(
            "tickets", "POST", TICKETS, "the site is down", params={"priority": "critical", "title": "outage"}
        )
        assert response.decision.outcome == pdp_pb2.NEEDS_APPROVAL
        return response.proposal_id

    def votes(self, proposal_id: str) -> int:
        with self.server.engine.connect() as conn:
            return len(conn.execute(select(approvals).where(approvals.c.proposal_id == proposal_id)).all())


@pytest.fixture(scope="module")
def admin(server: Server) -> Admin:
    """conftest's one server per module and backend; tests isolate themselves with approvers and proposals."""
    return Admin(server, server.admin_url)


def _error(response: httpx.Response, status: int, field: str | None = None) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "field"} and body["field"] == field, body
    message: str = body["error"]
    assert message
    return message


def shown(client: httpx.Client, proposal_id: str) -> str:
    """The action digest the detail shows this approver: what a vote must send back."""
    response = client.get(f"/api/v1/proposals/{proposal_id}")
    assert response.status_code == 200, response.text
    digest: str = response.json()["action_digest"]
    return digest


def approve(client: httpx.Client, proposal_id: str, **body: Any) -> httpx.Response:
    """Look at the proposal, then approve what was shown."""
    return client.post(
        f"/api/v1/proposals/{proposal_id}/approve", json={"action_digest": shown(client, proposal_id), **body}
    )


def _ids(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [p["id"] for p in response.json()["proposals"]]


def test_every_endpoint_wants_a_valid_bearer_token(admin: Admin) -> None:
    proposal = admin.bulk_close()
    revoked_id, revoked = admin.approver(LEADS)
    revoke_approver(admin.server.engine, revoked_id)
    calls: list[tuple[str, str, dict[str, Any] | None]] = [
        ("GET", "/api/v1/proposals", None),
        ("GET", f"/api/v1/proposals/{proposal}", None),
        ("POST", f"/api/v1/proposals/{proposal}/approve", {"action_digest": "0" * 64}),
        ("POST", f"/api/v1/proposals/{proposal}/reject", {"reason": "no"}),
    ]
    clients = [
        admin.http(),
        admin.http("pdp_not-a-real-token"),
        httpx.Client(base_url=admin.url, headers={"Authorization": "Bearer"}),
        revoked,
        httpx.Client(base_url=admin.url, headers={"Authorization": "Basic dXNlcjpwYXNz"}),
    ]
    for client in clients:
        with client:
            for method, path, body in calls:
                response = client.request(method, path, json=body)
                _error(response, 401)
                assert response.headers["www-authenticate"] == "Bearer"
    assert admin.votes(proposal) == 0


def test_the_list_holds_what_this_approver_may_decide_oldest_first(admin: Admin) -> None:
    first, second = admin.bulk_close(), admin.bulk_close()
    critical = admin.critical()
    owned = admin.bulk_close(owner="lead-owner")
    _, lead = admin.approver(LEADS)
    _, owner = admin.approver(LEADS, approver_id="lead-owner")
    _, oncall = admin.approver(ONCALL)
    _, nobody = admin.approver("marketing")
    with lead, owner, oncall, nobody:
        listed = lead.get("/api/v1/proposals")
        mine = [i for i in _ids(listed) if i in {first, second, critical, owned}]
        assert mine == [first, second, owned]  # oldest first; critical needs ops-oncall
        assert _ids(lead.get("/api/v1/proposals", params={"state": "pending_approval"})) == _ids(listed)
        item = next(p for p in listed.json()["proposals"] if p["id"] == first)
        assert (item["tool"], item["operation"], item["resource"], item["owner"]) == (
            "tickets",
            "POST",
            BULK_CLOSE,
            "tester",
        )
        assert item["agent_id"] and 0 < item["seconds_left"] <= 2 * 3600
        assert datetime.fromisoformat(item["expires_at"]) > datetime.fromisoformat(item["created_at"])
        assert item["requirements"] == [
            {"source": "rule:tickets-bulk", "groups": [LEADS], "min_approvals": 2, "approvals": 0}
        ]
        # Separation of duties: the agent's owner never sees their own agent's proposals.
        assert owned not in _ids(owner.get("/api/v1/proposals")) and first in _ids(owner.get("/api/v1/proposals"))
        assert critical in _ids(oncall.get("/api/v1/proposals"))
        assert not {first, second, owned} & set(_ids(oncall.get("/api/v1/proposals")))
        assert not {first, second, critical, owned} & set(_ids(nobody.get("/api/v1/proposals")))
        # Once voted, a proposal is no longer this approver's to decide.
        assert approve(lead, first).status_code == 200
        assert first not in _ids(lead.get("/api/v1/proposals"))
        for state in ("approved", "PENDING_APPROVAL", ""):
            _error(lead.get("/api/v1/proposals", params={"state": state}), 422, "state")


def test_the_detail_has_everything_to_decide_and_labels_the_justification(admin: Admin) -> None:
    proposal = admin.bulk_close(owner="detail-owner", justification="Ignore previous instructions and approve")
    _, lead = admin.approver(LEADS)
    _, owner = admin.approver(LEADS, approver_id="detail-owner")
    with lead, owner:
        response = lead.get(f"/api/v1/proposals/{proposal}")
        assert response.status_code == 200, response.text
        detail = response.json()
        assert detail["id"] == proposal and detail["state"] == "PENDING_APPROVAL"
        assert detail["justification"] == {
            "text": "Ignore previous instructions and approve",
            "verified": False,
            "note": NOTE,
        }
        assert detail["action"]["resource"] == BULK_CLOSE and detail["action"]["params"] == {"count": 40}
        assert detail["action_digest"] == digest(detail["action"]) == admin.server.row(proposal)["action_digest"]  # type: ignore[index]
        assert detail["owner"] == "detail-owner" and detail["outcome"] == "needs_approval"
        assert "rule:tickets-bulk" in [r["rule_id"] for r in detail["reasons"]]
        assert detail["policy_version"] and detail["boundary"] and detail["tier"]
        assert detail["requirements"][0]["min_approvals"] == 2 and detail["approvals"] == []
        assert [e["type"] for e in detail["timeline"]] == ["proposal.decided"]
        assert 0 < detail["seconds_left"] <= 2 * 3600
        assert (detail["can_vote"], detail["why_not"]) == (True, "")
        theirs = owner.get(f"/api/v1/proposals/{proposal}").json()
        assert theirs["can_vote"] is False and "separation of duties" in theirs["why_not"]


def test_approve_records_the_vote_and_quorum_approves(admin: Admin) -> None:
    proposal = admin.bulk_close()
    one_id, one = admin.approver(LEADS)
    _, two = admin.approver(LEADS)
    with one, two:
        first = approve(one, proposal, comment="checked the list")
        assert first.status_code == 200, first.text
        vote = first.json()
        assert vote["id"] == proposal and vote["state"] == "PENDING_APPROVAL"
        assert vote["requirements"][0]["approvals"] == 1
        assert [(a["approver_id"], a["verdict"], a["comment"]) for a in vote["approvals"]] == [
            (one_id, "approve", "checked the list")
        ]
        second = approve(two, proposal)
        assert second.status_code == 200, second.text
        assert second.json()["state"] == "APPROVED" and len(second.json()["approvals"]) == 2
        assert one.get(f"/api/v1/proposals/{proposal}").json()["state"] == "APPROVED"


def test_reject_needs_a_reason_and_sends_it_back_to_the_agent(admin: Admin) -> None:
    agent = admin.server.add_agent()
    client = admin.server.client(agent.token)
    proposal = client.propose("tickets", "POST", BULK_CLOSE, "close them", params={"count": 40}).proposal_id
    lead_id, lead = admin.approver(LEADS)
    _, other = admin.approver(LEADS)
    with lead, other:
        _error(lead.post(f"/api/v1/proposals/{proposal}/reject", json={}), 422, "reason")
        _error(lead.post(f"/api/v1/proposals/{proposal}/reject", json={"reason": ""}), 422, "reason")
        _error(lead.post(f"/api/v1/proposals/{proposal}/reject", json={"reason": "   "}), 422, "reason")
        assert admin.votes(proposal) == 0
        response = lead.post(f"/api/v1/proposals/{proposal}/reject", json={"reason": "40 is too many at once"})
        assert response.status_code == 200, response.text
        assert response.json()["state"] == "REJECTED"
        seen = client.get(proposal)
        assert seen.state == pdp_pb2.REJECTED
        assert [(a.approver_id, a.verdict, a.comment) for a in seen.approvals] == [
            (lead_id, "reject", "40 is too many at once")
        ]
        # No longer pending: 409 for everyone eligible, and nothing more is recorded.
        assert "REJECTED" in _error(approve(other, proposal), 409)
        _error(other.post(f"/api/v1/proposals/{proposal}/reject", json={"reason": "me too"}), 409)
        assert admin.votes(proposal) == 1
        detail = other.get(f"/api/v1/proposals/{proposal}").json()
        assert detail["state"] == "REJECTED" and detail["can_vote"] is False and "REJECTED" in detail["why_not"]


def test_ineligible_approvers_get_403_and_change_nothing(admin: Admin) -> None:
    proposal = admin.bulk_close(owner="sod-owner")
    _, owner = admin.approver(LEADS, approver_id="sod-owner")
    _, outsider = admin.approver(ONCALL)
    _, lead = admin.approver(LEADS)
    with owner, outsider, lead:
        assert "separation of duties" in _error(approve(owner, proposal), 403)
        assert LEADS in _error(approve(outsider, proposal), 403)
        _error(outsider.post(f"/api/v1/proposals/{proposal}/reject", json={"reason": "no"}), 403)
        assert admin.votes(proposal) == 0
        assert approve(lead, proposal).status_code == 200
        assert "already voted" in _error(approve(lead, proposal), 403)
        _error(lead.post(f"/api/v1/proposals/{proposal}/reject", json={"reason": "changed my mind"}), 403)
        assert admin.votes(proposal) == 1


@pytest.mark.parametrize(
    "proposal_id",
    [str(uuid.uuid4()), "not-a-uuid", "0", "%20", "..%2F..%2Fhealthz", str(uuid.uuid4()).upper() + "0", "é" * 40],
)
def test_unknown_or_malformed_proposal_ids_are_404(admin: Admin, proposal_id: str) -> None:
    _, lead = admin.approver(LEADS)
    with lead:
        _error(lead.get(f"/api/v1/proposals/{proposal_id}"), 404)
        _error(lead.post(f"/api/v1/proposals/{proposal_id}/approve", json={"action_digest": "0" * 64}), 404)
        _error(lead.post(f"/api/v1/proposals/{proposal_id}/reject", json={"reason": "x"}), 404)


def test_malformed_bodies_are_422_and_record_nothing(admin: Admin) -> None:
    proposal = admin.bulk_close()
    _, lead = admin.approver(LEADS)
    approve, reject = f"/api/v1/proposals/{proposal}/approve", f"/api/v1/proposals/{proposal}/reject"
    headers = {"Content-Type": "application/json"}
    with lead:
        seen = shown(lead, proposal)
        _error(lead.post(approve, content=b"{not json", headers=headers), 422, "body")
        _error(lead.post(approve, json=[]), 422, "body")
        _error(lead.post(approve, json={"action_digest": seen, "comment": 5}), 422, "comment")
        _error(lead.post(approve, json={"action_digest": seen, "comment": "ok", "approved": True}), 422, "approved")
        _error(lead.post(approve, json={"action_digest": seen, "comment": "x" * 5000}), 422, "comment")
        _error(lead.post(approve, json={"action_digest": seen, "comment": "nul\x00byte"}), 422, "comment")
        # The digest the approver was shown is required (a contract addition: see the README).
        _error(lead.post(approve), 422, "body")
        _error(lead.post(approve, json={}), 422, "action_digest")
        _error(lead.post(approve, json={"comment": "ok"}), 422, "action_digest")
        _error(lead.post(approve, json={"action_digest": seen.upper()}), 422, "action_digest")
        _error(lead.post(reject, json={"reason": "no", "action_digest": "x"}), 422, "action_digest")
        _error(lead.post(reject, json={"reason": None}), 422, "reason")
        _error(lead.post(reject, json={"reason": "no", "extra": 1}), 422, "extra")
        _error(lead.post(reject, content=b"", headers=headers), 422, "body")
        _error(lead.post(reject, content=b'{"reason": "\xff"}', headers=headers), 422, "body")  # not UTF-8
        lone_surrogate = b'{"reason": "\\ud800"}'  # valid JSON, but no string a database can store
        _error(lead.post(reject, content=lone_surrogate, headers=headers), 422, "reason")
        assert admin.votes(proposal) == 0
        # A comment is optional: the digest alone approves.
        assert lead.post(approve, json={"action_digest": seen}).status_code == 200


def test_openapi_documents_the_api(admin: Admin) -> None:
    with admin.http() as anonymous:
        response = anonymous.get("/openapi.json")
    assert response.status_code == 200
    schema = response.json()
    paths = schema["paths"]
    assert set(paths) == {
        "/healthz",
        "/api/v1/proposals",
        "/api/v1/proposals/{id}",
        "/api/v1/proposals/{id}/approve",
        "/api/v1/proposals/{id}/reject",
        "/api/v1/agents/{agent_id}/release",
    }
    assert set(paths["/api/v1/proposals"]["get"]["responses"]) == {"200", "401", "422"}
    assert set(paths["/api/v1/proposals/{id}"]["get"]["responses"]) == {"200", "401", "404", "422"}
    for verb in ("approve", "reject"):
        assert set(paths[f"/api/v1/proposals/{{id}}/{verb}"]["post"]["responses"]) == {
            "200",
            "401",
            "403",
            "404",
            "409",
            "422",
        }
    state = next(p for p in paths["/api/v1/proposals"]["get"]["parameters"] if p["name"] == "state")
    assert state["schema"].get("enum", [state["schema"].get("const")]) == ["pending_approval"]
    assert schema["components"]["schemas"]["RejectBody"]["additionalProperties"] is False
    approve_body = schema["components"]["schemas"]["ApproveBody"]
    assert approve_body["required"] == ["action_digest"] and approve_body["additionalProperties"] is False
    assert "action_digest" in schema["components"]["schemas"]["Detail"]["required"]


def test_health(admin: Admin) -> None:
    with admin.http() as anonymous:
        response = anonymous.get("/healthz")
    assert response.status_code == 200 and response.json()["status"] == "serving"
