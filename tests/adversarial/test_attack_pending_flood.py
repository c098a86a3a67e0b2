"""Attack: one agent floods approvers with pending proposals, and every approver's list loads all of them.

An agent with a valid token sends needs-approval proposals as fast as it can. With the cap set to 3
(``PDP_MAX_PENDING_PER_AGENT``, on a real `pdp serve` subprocess), its fourth pending proposal is recorded and
denied with the limit named and a retry hint, other agents are unaffected, allowed work still flows, and a
slot frees up when one is cancelled. The approvers' list (real admin API) pages through everything pending,
a bounded page at a time, in a stable order, with next and previous cursors.
"""

from __future__ import annotations

import html
import json
import re
import uuid
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import BULK_CLOSE, TICKETS, free_port, fresh_database, pdp_env, start_serve
from sqlalchemy import Engine, select

from pdp.client import PdpClient
from pdp.identity.agents import add_agent
from pdp.identity.approvers import add_approver
from pdp.store.database import create_db_engine
from pdp.store.migrate import upgrade
from pdp.store.models import audit_events
from pdp.v1 import pdp_pb2

CAP = 3
LEADS = "support-leads"


class World:
    def __init__(self, engine: Engine, grpc_addr: str, admin_url: str) -> None:
        self.engine, self.grpc_addr, self.admin_url = engine, grpc_addr, admin_url
        self.clients: list[PdpClient] = []

    def agent(self, owner: str = "flood-owner") -> PdpClient:
        token = add_agent(self.engine, f"flooder-{uuid.uuid4().hex[:8]}", owner, ("support",))
        client = PdpClient(self.grpc_addr, token)
        self.clients.append(client)
        return client

    def page(self, *groups: str) -> httpx.Client:
        """A browser-like client signed in to the approval page as a new approver."""
        token = add_approver(self.engine, f"page-lead-{uuid.uuid4().hex[:8]}", groups)
        browser = httpx.Client(base_url=self.admin_url, timeout=30)
        form = browser.get("/login")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
        assert csrf is not None
        assert browser.post("/login", data={"token": token, "csrf_token": csrf.group(1)}).status_code == 303
        return browser

    def approver(self, *groups: str, approver_id: str = "") -> httpx.Client:
        token = add_approver(self.engine, approver_id or f"lead-{uuid.uuid4().hex[:8]}", groups)
        return httpx.Client(base_url=self.admin_url, headers={"Authorization": f"Bearer {token}"}, timeout=30)


@pytest.fixture(params=["sqlite", "postgres"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    with fresh_database(request.param, tmp_path) as url:
        upgrade(url)
        admin_port = free_port()
        env = {**pdp_env(tmp_path), "PDP_MAX_PENDING_PER_AGENT": str(CAP), "PDP_ADMIN_ADDR": f"127.0.0.1:{admin_port}"}
        serve = start_serve(url, tmp_path, env)
        engine = create_db_engine(url)
        world = World(engine, serve.address, f"http://127.0.0.1:{admin_port}")
        try:
            yield world
        finally:
            for client in world.clients:
                client.close()
            engine.dispose()
            serve.stop()


def bulk_close(client: PdpClient, n: int = 0) -> pdp_pb2.ProposeResponse:
    return client.propose("tickets", "POST", BULK_CLOSE, f"close duplicates, batch {n}", params={"count": 40 + n})


def test_an_agent_cannot_hold_more_pending_proposals_than_the_cap(world: World) -> None:
    flooder = world.agent()
    held = [bulk_close(flooder, n) for n in range(CAP)]
    assert [r.state for r in held] == [pdp_pb2.PENDING_APPROVAL] * CAP
    over = bulk_close(flooder, CAP)
    assert over.state == pdp_pb2.DENIED, over
    assert over.decision.reasons[0].rule_id == "limit:max_pending_per_agent"
    assert f"= {CAP}" in over.decision.reasons[0].message
    assert over.decision.retry_after_seconds > 0
    assert not over.decision.approval_requirements
    # Recorded and audited, like every governance denial.
    assert flooder.get(over.proposal_id).state == pdp_pb2.DENIED
    with world.engine.connect() as conn:
        body = conn.execute(
            select(audit_events.c.body).where(
                audit_events.c.proposal_id == over.proposal_id, audit_events.c.type == "proposal.decided"
            )
        ).scalar_one()
    assert json.loads(body)["data"]["decision"]["outcome"] == "deny"

    # Per agent: another agent still gets its proposals in front of approvers; allowed work is not capped.
    assert bulk_close(world.agent()).state == pdp_pb2.PENDING_APPROVAL
    allowed = flooder.propose("tickets", "POST", TICKETS, "open a ticket", params={"title": "printer"})
    assert allowed.decision.outcome == pdp_pb2.ALLOW
    # A slot frees when one of the agent's pending proposals ends.
    flooder.cancel(held[0].proposal_id)
    assert bulk_close(flooder, 99).state == pdp_pb2.PENDING_APPROVAL
    assert bulk_close(flooder, 100).state == pdp_pb2.DENIED


def test_the_approvers_list_comes_in_bounded_pages(world: World) -> None:
    expected: list[str] = []
    for _ in range(3):  # several agents at the cap: more pending than fits on a page
        client = world.agent()
        expected += [bulk_close(client, n).proposal_id for n in range(CAP)]
    owned = bulk_close(world.agent(owner="page-owner")).proposal_id  # the approver's own agent: never listed
    with world.approver(LEADS, approver_id="page-owner") as lead, world.approver("ops-oncall") as outsider:
        seen: list[list[str]] = []
        cursor: str | None = None
        pages: list[dict[str, Any]] = []
        while True:
            params: dict[str, str | int] = {"state": "pending_approval", "limit": 2}
            if cursor:
                params["cursor"] = cursor
            page = lead.get("/api/v1/proposals", params=params)
            assert page.status_code == 200, page.text
            body = page.json()
            pages.append(body)
            assert len(body["proposals"]) <= 2
            seen.append([p["id"] for p in body["proposals"]])
            cursor = body["next_cursor"]
            if cursor is None:
                break
            assert len(pages) <= len(expected)  # it ends
        assert [pid for page_ids in seen for pid in page_ids] == expected  # oldest first, each once
        assert owned not in expected
        assert pages[0]["prev_cursor"] is None
        # Back from the last page: the page before it, exactly.
        back = lead.get("/api/v1/proposals", params={"limit": 2, "cursor": pages[-1]["prev_cursor"]})
        assert [p["id"] for p in back.json()["proposals"]] == seen[-2]

        # A new proposal lands at the end; earlier cursors stay valid.
        late = bulk_close(world.agent(), 7).proposal_id
        tail = lead.get("/api/v1/proposals", params={"limit": 2, "cursor": pages[-2]["next_cursor"]}).json()
        assert [p["id"] for p in tail["proposals"]] == [*seen[-1], late][:2]

        # Pages are bounded by the server, whatever the client asks; a forged cursor changes nothing.
        assert lead.get("/api/v1/proposals", params={"limit": 201}).status_code == 422
        forged = lead.get("/api/v1/proposals", params={"cursor": "not-a-cursor"})
        assert forged.status_code == 422 and forged.json()["field"] == "cursor"
        assert outsider.get("/api/v1/proposals").json()["proposals"] == []

    # The page pages the same way, with links both ways.
    with closing(world.page(LEADS)) as browser:
        first = browser.get("/", params={"limit": 4})
        assert first.status_code == 200
        assert on_page(first.text) == expected[:4] and 'id="prev-page"' not in first.text
        second = browser.get(link(first.text, "next-page"))
        assert on_page(second.text) == expected[4:8]
        assert on_page(browser.get(link(second.text, "prev-page")).text) == expected[:4]


def on_page(html_text: str) -> list[str]:
    return re.findall(r'<li class="proposal" data-proposal-id="([^"]+)"', html_text)


def link(html_text: str, element_id: str) -> str:
    found = re.search(rf'id="{element_id}"[^>]*href="([^"]+)"', html_text)
    assert found, f"no #{element_id}"
    return html.unescape(found.group(1))
