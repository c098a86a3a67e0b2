"""Execution tickets: only the PDP's signature over the exact stored action makes anything run.

Each attack edits the database directly (as someone with write access to it could) while no executor
runs, then starts one: nothing reaches the target, the proposal fails with the reason, and the
refusal is in the audit log.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import signing_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from execution import Stack, execution_stack, running_executor
from sqlalchemy import delete, insert, select, update

from pdp.audit.keys import init_key, load_private
from pdp.canonical import canonical_json, digest
from pdp.execution import tickets
from pdp.execution.tickets import TicketRefused
from pdp.store.models import execution_tickets, proposals
from pdp.v1 import pdp_pb2

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


# --- the ticket format on its own -----------------------------------------------------------------


def _issue(key: Ed25519PrivateKey, action: dict[str, Any], **kw: object) -> tickets.SignedTicket:
    args: dict[str, object] = {
        "proposal_id": "p1",
        "action_digest": digest(action),
        "outcome": "allow",
        "approvals": [],
        "policy_version": "sha256:abc",
        "issued_at": NOW,
    }
    args.update(kw)
    return tickets.issue(key, **args)  # type: ignore[arg-type]


ACTION: dict[str, Any] = {"tool": "web", "operation": "POST", "resource": "http://x/api/a", "params": {"n": 1.0}}


def test_a_ticket_verifies_for_its_proposal_and_action() -> None:
    key = Ed25519PrivateKey.generate()
    ticket = _issue(key, ACTION)
    verified = tickets.verify(
        key.public_key(),
        payload=ticket.payload,
        signature=ticket.signature,
        proposal_id="p1",
        action_json=canonical_json(ACTION),
        now=NOW,
    )
    assert verified.ticket_id == ticket.ticket_id and verified.outcome == "allow"
    assert ticket.expires_at == NOW + tickets.DEFAULT_TTL


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("signature", "ticket.bad_signature"),
        ("payload", "ticket.bad_signature"),
        ("key", "ticket.bad_signature"),
        ("proposal", "ticket.wrong_proposal"),
        ("action", "ticket.action_mismatch"),
        ("expired", "ticket.expired"),
        ("garbage-signature", "ticket.bad_signature"),
    ],
)
def test_any_change_refuses_the_ticket(change: str, reason: str) -> None:
    key = Ed25519PrivateKey.generate()
    ticket = _issue(key, ACTION)
    public, payload, signature = key.public_key(), ticket.payload, ticket.signature
    proposal_id, action, now = "p1", dict(ACTION), NOW
    if change == "signature":
        signature = ("0" if signature[0] != "0" else "1") + signature[1:]
    elif change == "payload":
        payload = payload.replace('"allow"', '"approved"')
    elif change == "key":
        public = Ed25519PrivateKey.generate().public_key()
    elif change == "proposal":
        proposal_id = "p2"
    elif change == "action":
        action["resource"] = "http://x/api/b"
    elif change == "expired":
        now = ticket.expires_at
    else:
        signature = "not hex"
    with pytest.raises(TicketRefused) as refused:
        tickets.verify(
            public,
            payload=payload,
            signature=signature,
            proposal_id=proposal_id,
            action_json=canonical_json(action),
            now=now,
        )
    assert refused.value.reason == reason


# --- against a running executor --------------------------------------------------------------------


class Setup(Stack):
    def approved(self, path: str = "items") -> str:
        """An allowed proposal, waiting for an executor (none runs yet)."""
        response = self.client.propose("web", "POST", self.target.url + path, "t", params={"n": 1})
        assert response.state == pdp_pb2.APPROVED
        return response.proposal_id

    def execute_pending(self, key: Path | None = None) -> None:
        """Start an executor and let it take every approved proposal."""
        with running_executor(self.config(key=key)):
            for pid in self.pending():
                self.client.wait(pid, timeout=30)

    def pending(self) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(proposals.c.id).where(proposals.c.state == "APPROVED")).scalars())

    def refusals(self, pid: str) -> list[str]:
        return [data["reason"] for kind, data in self.audit(pid) if kind == "execution.refused"]

    def state(self, pid: str) -> str:
        return pdp_pb2.ProposalState.Name(self.client.get(pid).state)


@pytest.fixture(params=["sqlite", "postgres"])
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Setup]:
    with execution_stack(request.param, tmp_path) as stack:
        yield Setup(**vars(stack))


def _refused(setup: Setup, pid: str, reason: str) -> None:
    final = setup.client.get(pid)
    assert final.state == pdp_pb2.FAILED, final
    assert final.execution.error.startswith("refused:")
    assert setup.refusals(pid) == [reason]


def test_an_action_edited_after_signing_runs_nothing(setup: Setup) -> None:
    pid = setup.approved()
    with setup.engine.begin() as conn:
        row = conn.execute(select(proposals.c.action).where(proposals.c.id == pid)).scalar_one()
        edited = {**row, "resource": setup.target.url + "items/everything"}
        conn.execute(update(proposals).where(proposals.c.id == pid).values(action=edited, resource=edited["resource"]))
    setup.execute_pending()
    _refused(setup, pid, "ticket.action_mismatch")
    assert setup.target.count() == 0


def test_a_forged_ticket_runs_nothing(setup: Setup, tmp_path: Path) -> None:
    pid = setup.approved()
    forger = tmp_path / "forger.key"
    init_key(forger)
    with setup.engine.begin() as conn:
        action = conn.execute(select(proposals.c.action).where(proposals.c.id == pid)).scalar_one()
        forged = _issue(load_private(forger), action, proposal_id=pid, issued_at=datetime.now(UTC))
        conn.execute(delete(execution_tickets).where(execution_tickets.c.proposal_id == pid))
        conn.execute(insert(execution_tickets).values(**forged.row()))
    setup.execute_pending()
    _refused(setup, pid, "ticket.bad_signature")
    assert setup.target.count() == 0


def test_a_forged_proposal_without_a_ticket_runs_nothing(setup: Setup) -> None:
    pid = setup.approved()
    with setup.engine.begin() as conn:
        row = dict(conn.execute(select(proposals).where(proposals.c.id == pid)).mappings().one())
    row.update(id=str(uuid.uuid4()), idempotency_key=None)
    with setup.engine.begin() as conn:
        conn.execute(delete(execution_tickets).where(execution_tickets.c.proposal_id == pid))
        conn.execute(insert(proposals).values(**row))
    setup.execute_pending()
    for forged in (pid, row["id"]):
        _refused(setup, forged, "ticket.missing")
    assert setup.target.count() == 0


def test_another_proposals_ticket_runs_nothing(setup: Setup) -> None:
    first, second = setup.approved("items/1"), setup.approved("items/2")
    with setup.engine.begin() as conn:
        ticket = dict(
            conn.execute(select(execution_tickets).where(execution_tickets.c.proposal_id == first)).mappings().one()
        )
        conn.execute(delete(execution_tickets).where(execution_tickets.c.proposal_id == second))
        conn.execute(insert(execution_tickets).values(**{**ticket, "proposal_id": second}))
    setup.execute_pending()
    _refused(setup, second, "ticket.wrong_proposal")
    assert setup.state(first) == "SUCCEEDED"
    assert [s.path for s in setup.target.seen] == ["/api/items/1"]


def test_an_expired_ticket_runs_nothing(setup: Setup) -> None:
    pid = setup.approved()
    with setup.engine.begin() as conn:
        action = conn.execute(select(proposals.c.action).where(proposals.c.id == pid)).scalar_one()
        # Properly signed by the PDP's key, but issued long ago.
        old = _issue(
            load_private(signing_key()), action, proposal_id=pid, issued_at=datetime.now(UTC) - timedelta(hours=1)
        )
        conn.execute(delete(execution_tickets).where(execution_tickets.c.proposal_id == pid))
        conn.execute(insert(execution_tickets).values(**old.row()))
    setup.execute_pending()
    _refused(setup, pid, "ticket.expired")
    assert setup.target.count() == 0


def test_a_replayed_ticket_runs_nothing(setup: Setup) -> None:
    pid = setup.approved()
    setup.execute_pending()
    assert setup.state(pid) == "SUCCEEDED"
    with setup.engine.begin() as conn:  # someone resets the proposal to run it again
        conn.execute(update(proposals).where(proposals.c.id == pid).values(state="APPROVED"))
    setup.execute_pending()
    assert setup.state(pid) == "SUCCEEDED"  # the refusal is audited; the recorded result stands
    assert setup.client.get(pid).execution.status == "SUCCEEDED"
    assert setup.refusals(pid) == ["ticket.consumed"]
    assert setup.target.count() == 1


def test_an_executor_trusting_another_key_runs_nothing(setup: Setup, tmp_path: Path) -> None:
    pid = setup.approved()
    other = tmp_path / "other.key"
    init_key(other)
    setup.execute_pending(key=other)
    _refused(setup, pid, "ticket.bad_signature")
    assert setup.target.count() == 0
