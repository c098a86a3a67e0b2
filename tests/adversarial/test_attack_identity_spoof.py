"""Attack: separation of duties and one-vote-each defeated by spelling one person's name twice.

An agent's owner is ``alice``. Approvers named ``Alice`` or `` alice`` (or with a zero-width space, or in
fullwidth letters) read as the same person to every human, and must be: they may not be created next to
``alice`` (real CLI, as a subprocess), and where such rows already exist (created before the naming rule;
inserted here as an operator would have, straight into the table), they may not approve ``alice``'s agent
(real admin API), and two spellings of one approver count as one vote.
"""

from __future__ import annotations

import itertools
import subprocess
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from conftest import BULK_CLOSE, PDP, Server, pdp_env
from sqlalchemy import insert, select

from pdp.identity.tokens import new_token, token_hash
from pdp.store.database import create_db_engine
from pdp.store.models import approvals, approvers, proposals
from pdp.v1 import pdp_pb2

LEADS = "support-leads"
_numbers = itertools.count(1)


def pdp(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PDP, *args], capture_output=True, text=True, env=pdp_env(tmp_path), cwd=tmp_path, timeout=120, check=False
    )


def approver_ids(database_url: str) -> list[str]:
    engine = create_db_engine(database_url)
    try:
        with engine.connect() as conn:
            return sorted(conn.execute(select(approvers.c.id)).scalars())
    finally:
        engine.dispose()


# Capitals, outer whitespace, zero-width and soft-hyphen characters, fullwidth letters.
SPELLINGS = [
    "Alice",
    " alice",
    "alice ",
    "alice\u200b",
    "\u200dalice",
    "\uff21\uff2c\uff29\uff23\uff25",
    "\uff41\uff4c\uff49\uff43\uff45",
    "alice\u00ad",
]


def test_look_alike_approvers_and_owners_cannot_be_created(database_url: str, tmp_path: Path) -> None:
    created = pdp("approvers", "add", "alice", "--groups", LEADS, "--database-url", database_url, tmp_path=tmp_path)
    assert created.returncode == 0, created.stderr
    for spelling in SPELLINGS:
        again = pdp("approvers", "add", spelling, "--groups", LEADS, "--database-url", database_url, tmp_path=tmp_path)
        assert again.returncode != 0, f"{spelling!r} was created next to 'alice'"
        assert "alice" in again.stderr
    assert approver_ids(database_url) == ["alice"]
    # The same rule for agents and their owners: what separation of duties compares with approver ids.
    for args in (("agents", "add", "Bot-1", "--owner", "alice"), ("agents", "add", "bot-1", "--owner", "Alice")):
        refused = pdp(*args, "--database-url", database_url, tmp_path=tmp_path)
        assert refused.returncode != 0, args
    ok = pdp("agents", "add", "bot-1", "--owner", "alice", "--database-url", database_url, tmp_path=tmp_path)
    assert ok.returncode == 0, ok.stderr
    twin = pdp("agents", "add", "BOT-1", "--owner", "alice", "--database-url", database_url, tmp_path=tmp_path)
    assert twin.returncode != 0


def legacy_approver(server: Server, approver_id: str, *groups: str) -> httpx.Client:
    """An approver row as one created before the naming rule would look, and a client with its token."""
    token = new_token()
    with server.engine.begin() as conn:
        conn.execute(
            insert(approvers).values(
                id=approver_id,
                name=approver_id,
                groups=list(groups),
                token_hash=token_hash(token),
                created_at=datetime.now(UTC),
                revoked_at=None,
            )
        )
    return httpx.Client(base_url=server.admin_url, headers={"Authorization": f"Bearer {token}"}, timeout=30)


def bulk_close(server: Server, owner: str) -> str:
    agent = server.add_agent(owner=owner)
    response = server.client(agent.token).propose(
        "tickets", "POST", BULK_CLOSE, "close the duplicates", params={"count": 40}
    )
    assert response.state == pdp_pb2.PENDING_APPROVAL  # needs two support leads
    return response.proposal_id


def seen_body(client: httpx.Client, proposal_id: str) -> dict[str, str]:
    """An approval body as an approver sends it: the digest of the action the detail showed them."""
    return {"action_digest": client.get(f"/api/v1/proposals/{proposal_id}").json()["action_digest"]}


def state(server: Server, proposal_id: str) -> str:
    with server.engine.connect() as conn:
        return str(conn.execute(select(proposals.c.state).where(proposals.c.id == proposal_id)).scalar_one())


def vote_count(server: Server, proposal_id: str) -> int:
    with server.engine.connect() as conn:
        return len(conn.execute(select(approvals.c.approver_id).where(approvals.c.proposal_id == proposal_id)).all())


def test_an_owner_under_another_spelling_cannot_approve_their_own_agent(server: Server) -> None:
    owner = f"alice-{uuid.uuid4().hex[:6]}"
    proposal_id = bulk_close(server, owner)
    spellings = [owner.upper(), f" {owner}", f"{owner}\u200b", owner.replace("a", "\uff41", 1)]
    for spelling in spellings:
        with legacy_approver(server, spelling, LEADS) as twin:
            response = twin.post(f"/api/v1/proposals/{proposal_id}/approve", json=seen_body(twin, proposal_id))
            assert response.status_code == 403, f"{spelling!r}: {response.text}"
            assert "separation of duties" in response.json()["error"]
            assert proposal_id not in [p["id"] for p in twin.get("/api/v1/proposals").json()["proposals"]]
    assert vote_count(server, proposal_id) == 0
    assert state(server, proposal_id) == "PENDING_APPROVAL"


def test_one_approver_under_two_spellings_is_one_vote(server: Server) -> None:
    proposal_id = bulk_close(server, "tester")
    person = f"bob-{next(_numbers)}-{uuid.uuid4().hex[:6]}"
    with legacy_approver(server, person, LEADS) as bob, legacy_approver(server, person.upper(), LEADS) as twin:
        assert bob.post(f"/api/v1/proposals/{proposal_id}/approve", json=seen_body(bob, proposal_id)).status_code == 200
        second = twin.post(f"/api/v1/proposals/{proposal_id}/approve", json=seen_body(twin, proposal_id))
        assert second.status_code == 403, second.text
        assert "already voted" in second.json()["error"]
    assert vote_count(server, proposal_id) == 1
    assert state(server, proposal_id) == "PENDING_APPROVAL"  # two leads needed; one person voted


@pytest.mark.parametrize("spelling", ["Support-Leads", "SUPPORT-LEADS"])
def test_legacy_group_spellings_still_count_as_the_group(server: Server, spelling: str) -> None:
    """Identity comparison cuts both ways: a group stored as `Support-Leads` is the policy's `support-leads`."""
    proposal_id = bulk_close(server, "tester")
    with legacy_approver(server, f"lead-{uuid.uuid4().hex[:8]}", spelling) as lead:
        assert proposal_id in [
            p["id"] for p in lead.get("/api/v1/proposals", params={"limit": 200}).json()["proposals"]
        ]
        voted = lead.post(f"/api/v1/proposals/{proposal_id}/approve", json=seen_body(lead, proposal_id))
        assert voted.status_code == 200
