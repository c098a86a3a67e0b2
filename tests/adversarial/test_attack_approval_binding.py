"""Approvals bind to what the approver saw and count only what the PDP signed (issue 10, finding 4).

The attacker holds the service's database grants (on PostgreSQL: a login in the writer role that `pdp db roles`
creates; on SQLite: the file) but not the PDP's signing key. Between an approver's look at a proposal and their
click, or before it, they rewrite the proposal's action and its digest, insert vote rows, append well-chained vote
events, or lower the stored quorum. Approvers use the real admin API over HTTP (and the real HTML form); agents
the real gRPC API. Whatever the attacker does, nothing gets approved or a ticket that the signed decision and
the signed votes do not support, and `pdp audit verify` names the proposal whose rows disagree with the chain.
"""

from __future__ import annotations

import html
import itertools
import json
import re
import uuid
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from conftest import BULK_CLOSE, TICKETS, Server, signing_key
from execution import execution_stack, executor_config, running_executor
from psycopg import sql
from sqlalchemy import Engine, func, insert, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from pdp.audit import chain
from pdp.audit.keys import load_public, public_path
from pdp.audit.roles import create_roles
from pdp.audit.verify import Report, verify
from pdp.canonical import canonical_json, digest
from pdp.identity.approvers import add_approver
from pdp.store.database import create_db_engine
from pdp.store.models import approvals, audit_events, execution_tickets, proposals
from pdp.v1 import pdp_pb2

LEADS = "support-leads"
ONCALL = "ops-oncall"
_numbers = itertools.count(1)
_CSRF = re.compile(r'name="csrf_token" value="([^"]*)"')
_DIGEST_FIELD = re.compile(r'<form[^>]*id="approve-form".*?name="action_digest" value="([0-9a-f]{64})"', re.S)


@dataclass
class Attack:
    server: Server
    writer: Engine  # the attacker's connection: the writer role's grants, no signing key

    # --- people and proposals ----------------------------------------------------------------------------

    def approver(self, *groups: str) -> tuple[str, httpx.Client]:
        approver_id = f"binding-{next(_numbers)}-{uuid.uuid4().hex[:6]}"
        token = add_approver(self.server.engine, approver_id, groups)
        client = httpx.Client(base_url=self.server.admin_url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        return approver_id, client

    def bulk_close(self) -> str:
        """Pending; needs two support leads."""
        agent = self.server.add_agent(owner="tester")
        response = self.server.client(agent.token).propose(
            "tickets", "POST", BULK_CLOSE, "close the duplicates", params={"count": 40}
        )
        assert response.state == pdp_pb2.PENDING_APPROVAL, response
        return response.proposal_id

    def critical(self, title: str = "outage") -> str:
        """Pending; needs one of ops-oncall."""
        agent = self.server.add_agent(owner="tester")
        response = self.server.client(agent.token).propose(
            "tickets", "POST", TICKETS, "the site is down", params={"priority": "critical", "title": title}
        )
        assert response.state == pdp_pb2.PENDING_APPROVAL, response
        return response.proposal_id

    # --- what the attacker does with the writer's grants ----------------------------------------------------

    def rewrite_action(self, proposal_id: str, **params: Any) -> str:
        """Replace the stored action's params, its canonical text and its digest consistently; the new digest."""
        row = self.row(proposal_id)
        action = {**row["action"], "params": params}
        new_digest = digest(action)
        text = canonical_json(action).decode("utf-8")
        values = {"action": action, "action_json": text, "action_digest": new_digest}
        with self.writer.begin() as conn:
            conn.execute(update(proposals).where(proposals.c.id == proposal_id).values(**values))
        return new_digest

    def forge_vote_row(self, proposal_id: str, approver_id: str, groups: list[str]) -> None:
        row = self.row(proposal_id)
        with self.writer.begin() as conn:
            conn.execute(
                insert(approvals).values(
                    proposal_id=proposal_id,
                    approver_id=approver_id,
                    verdict="approve",
                    comment="",
                    groups=groups,
                    action_digest=row["action_digest"],
                    decided_at=datetime.now(UTC),
                )
            )

    def forge_vote_event(self, proposal_id: str, approver_id: str, groups: list[str]) -> None:
        """An `approval.granted` exactly as the PDP writes one, correctly chained: all but a PDP signature."""
        row = self.row(proposal_id)
        with self.writer.begin() as conn:
            chain.append(
                conn,
                chain.Event(
                    type="approval.granted",
                    actor=f"approver:{approver_id}",
                    occurred_at=datetime.now(UTC),
                    proposal_id=proposal_id,
                    agent_id=row["agent_id"],
                    policy_version=row["policy_version"],
                    data={
                        "verdict": "approve",
                        "comment": "",
                        "action_digest": row["action_digest"],
                        "groups": groups,
                    },
                ),
            )

    def set_decision(self, proposal_id: str, decision: dict[str, Any]) -> None:
        with self.writer.begin() as conn:
            conn.execute(update(proposals).where(proposals.c.id == proposal_id).values(decision=decision))

    # --- what happened ------------------------------------------------------------------------------------

    def row(self, proposal_id: str) -> dict[str, Any]:
        row = self.server.row(proposal_id)
        assert row is not None
        return row

    def state(self, proposal_id: str) -> str:
        return str(self.row(proposal_id)["state"])

    def tickets(self, proposal_id: str) -> int:
        with self.server.engine.connect() as conn:
            query = select(func.count()).where(execution_tickets.c.proposal_id == proposal_id)
            return int(conn.execute(query).scalar_one())

    def vote_rows(self, proposal_id: str) -> list[str]:
        with self.server.engine.connect() as conn:
            query = select(approvals.c.approver_id).where(approvals.c.proposal_id == proposal_id)
            return sorted(conn.execute(query).scalars())

    def event_types(self, proposal_id: str) -> list[str]:
        with self.server.engine.connect() as conn:
            query = (
                select(audit_events.c.type)
                .where(audit_events.c.proposal_id == proposal_id)
                .order_by(audit_events.c.seq)
            )
            return list(conn.execute(query).scalars())

    def verify(self) -> Report:
        return verify(self.server.engine, public_key=load_public(public_path(signing_key())))

    def disagreements(self, proposal_id: str) -> list[str]:
        return [d.problem for d in self.verify().disagreements if d.proposal_id == proposal_id]


def _libpq(url: str, user: str | None = None) -> str:
    parsed = make_url(url).set(drivername="postgresql")
    if user is not None:
        parsed = parsed.set(username=user, password=None)
    return parsed.render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def attack(server: Server) -> Iterator[Attack]:
    """On PostgreSQL the attacker connects as a login in the writer role the service itself runs as."""
    if server.engine.dialect.name != "postgresql":
        yield Attack(server, server.engine)
        return
    suffix = uuid.uuid4().hex[:10]
    writer, auditor, login = f"pdp_writer_{suffix}", f"pdp_auditor_{suffix}", f"pdp_attacker_{suffix}"
    create_roles(server.engine, writer, auditor)
    admin = _libpq(server.database_url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(sql.Identifier(login), sql.Identifier(writer)))
    engine = create_db_engine(make_url(server.database_url).set(username=login).render_as_string(hide_password=False))
    try:
        yield Attack(server, engine)
    finally:
        engine.dispose()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (login,))
            for role in (login, writer, auditor):
                conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def _detail(client: httpx.Client, proposal_id: str) -> dict[str, Any]:
    response = client.get(f"/api/v1/proposals/{proposal_id}")
    assert response.status_code == 200, response.text
    detail: dict[str, Any] = response.json()
    return detail


def _approve(client: httpx.Client, proposal_id: str, action_digest: str) -> httpx.Response:
    return client.post(f"/api/v1/proposals/{proposal_id}/approve", json={"action_digest": action_digest})


def _conflict(response: httpx.Response, *words: str) -> str:
    assert response.status_code == 409, response.text
    message: str = response.json()["error"]
    for word in words:
        assert word in message, message
    return message


# --- (a) the action the approver saw ---------------------------------------------------------------------


def test_an_action_rewritten_after_the_approver_looked_gets_no_vote_and_no_ticket(attack: Attack) -> None:
    proposal = attack.critical()
    _, oncall = attack.approver(ONCALL)
    with oncall:
        seen = _detail(oncall, proposal)
        assert seen["action"]["params"] == {"priority": "critical", "title": "outage"}
        assert seen["action_digest"] == attack.row(proposal)["action_digest"]
        # Between the look and the click: the same ticket, but now it closes every ticket there is.
        attack.rewrite_action(proposal, priority="critical", title="outage", close_all=True)
        _conflict(_approve(oncall, proposal, seen["action_digest"]), "action")
    assert attack.state(proposal) == "PENDING_APPROVAL"
    assert attack.tickets(proposal) == 0 and attack.vote_rows(proposal) == []
    assert attack.event_types(proposal) == ["proposal.decided"]
    assert any("action" in problem for problem in attack.disagreements(proposal))


def test_an_action_rewritten_before_the_approver_looked_gets_no_vote_either(attack: Attack) -> None:
    """The approver is shown the rewritten action and approves exactly what they saw: still not what the PDP decided."""
    proposal = attack.critical()
    rewritten = attack.rewrite_action(proposal, priority="critical", title="outage", close_all=True)
    _, oncall = attack.approver(ONCALL)
    with oncall:
        seen = _detail(oncall, proposal)
        assert seen["action_digest"] == rewritten
        assert seen["can_vote"] is False and "audit log" in seen["why_not"]
        _conflict(_approve(oncall, proposal, rewritten))
    assert attack.state(proposal) == "PENDING_APPROVAL"
    assert attack.tickets(proposal) == 0 and attack.vote_rows(proposal) == []


def test_the_html_form_carries_the_digest_the_page_showed(attack: Attack) -> None:
    proposal = attack.critical()
    approver_id = f"binding-page-{uuid.uuid4().hex[:6]}"
    token = add_approver(attack.server.engine, approver_id, [ONCALL])
    with closing(httpx.Client(base_url=attack.server.admin_url, timeout=30)) as browser:
        form = browser.get("/login")
        csrf = _CSRF.search(form.text)
        assert csrf
        browser.post("/login", data={"token": token, "csrf_token": csrf.group(1)})
        page = browser.get(f"/proposals/{proposal}")
        assert page.status_code == 200
        shown = _DIGEST_FIELD.search(page.text)
        assert shown, "the approve form has no action_digest field"
        assert shown.group(1) == attack.row(proposal)["action_digest"]
        token_field = _CSRF.search(page.text)
        assert token_field
        attack.rewrite_action(proposal, priority="critical", title="outage", close_all=True)
        clicked = browser.post(
            f"/proposals/{proposal}/approve",
            data={"csrf_token": token_field.group(1), "action_digest": shown.group(1), "comment": "ok"},
        )
        assert clicked.status_code == 409, clicked.text
        assert "action" in html.unescape(clicked.text)
        # Without the field at all the form is malformed: 422, naming it.
        missing = browser.post(f"/proposals/{proposal}/approve", data={"csrf_token": token_field.group(1)})
        assert missing.status_code == 422 and "action_digest" in missing.text
    assert attack.state(proposal) == "PENDING_APPROVAL"
    assert attack.tickets(proposal) == 0 and attack.vote_rows(proposal) == []


def test_an_approval_must_name_the_digest_it_saw(attack: Attack) -> None:
    proposal = attack.critical()
    other = attack.critical(title="another outage")
    _, oncall = attack.approver(ONCALL)
    with oncall:
        for body in ({}, {"comment": "ok"}, {"action_digest": ""}, {"action_digest": "ABC"}, {"action_digest": 7}):
            response = oncall.post(f"/api/v1/proposals/{proposal}/approve", json=body)
            assert response.status_code == 422, (body, response.text)
            assert response.json()["field"] == "action_digest", response.text
        assert oncall.post(f"/api/v1/proposals/{proposal}/approve").status_code == 422
        # A well-formed digest of something else (another proposal's action, a stale view) is a conflict.
        stale = _detail(oncall, other)["action_digest"]
        _conflict(_approve(oncall, proposal, stale), "action")
        _conflict(_approve(oncall, proposal, "0" * 64), "action")
        assert attack.vote_rows(proposal) == [] and attack.state(proposal) == "PENDING_APPROVAL"
        # A rejection may name it too, and is refused on a mismatch just the same.
        rejected = oncall.post(f"/api/v1/proposals/{proposal}/reject", json={"reason": "no", "action_digest": stale})
        _conflict(rejected, "action")
        assert attack.vote_rows(proposal) == []
        # The digest it was shown goes through.
        done = _approve(oncall, proposal, _detail(oncall, proposal)["action_digest"])
        assert done.status_code == 200, done.text
        assert done.json()["state"] == "APPROVED" and attack.tickets(proposal) == 1
    assert attack.disagreements(proposal) == []


# --- (b) votes the PDP never accepted ----------------------------------------------------------------------


def test_an_inserted_vote_row_does_not_count(attack: Attack) -> None:
    proposal = attack.bulk_close()
    lead1_id, lead1 = attack.approver(LEADS)
    lead2_id, lead2 = attack.approver(LEADS)
    with lead1, lead2:
        attack.forge_vote_row(proposal, lead2_id, [LEADS])  # lead-2 never voted
        seen = _detail(lead1, proposal)
        assert [r["approvals"] for r in seen["requirements"]] == [0]  # the page counts only signed votes
        _conflict(_approve(lead1, proposal, seen["action_digest"]), "vote")
        assert attack.state(proposal) == "PENDING_APPROVAL" and attack.tickets(proposal) == 0
        assert any("vote" in problem for problem in attack.disagreements(proposal))

        # An operator removes the forged row; lead-1's real vote is then one of two, not two of two.
        with attack.server.engine.begin() as conn:
            conn.execute(
                approvals.delete().where(approvals.c.proposal_id == proposal, approvals.c.approver_id == lead2_id)
            )
        first = _approve(lead1, proposal, seen["action_digest"])
        assert first.status_code == 200, first.text
        assert first.json()["state"] == "PENDING_APPROVAL"
        assert [r["approvals"] for r in first.json()["requirements"]] == [1]
        second = _approve(lead2, proposal, seen["action_digest"])
        assert second.status_code == 200 and second.json()["state"] == "APPROVED", second.text
    assert attack.vote_rows(proposal) == sorted([lead1_id, lead2_id]) and attack.tickets(proposal) == 1
    assert attack.disagreements(proposal) == []


def test_a_forged_vote_event_with_a_correct_chain_does_not_count(attack: Attack) -> None:
    proposal = attack.bulk_close()
    _, lead1 = attack.approver(LEADS)
    lead2_id, lead2 = attack.approver(LEADS)
    with lead1, lead2:
        attack.forge_vote_event(proposal, lead2_id, [LEADS])  # well chained; only the PDP's signature is missing
        seen = _detail(lead1, proposal)
        first = _approve(lead1, proposal, seen["action_digest"])
        assert first.status_code == 200, first.text
        assert first.json()["state"] == "PENDING_APPROVAL"  # one of two: the forged event counted for nothing
        assert [r["approvals"] for r in first.json()["requirements"]] == [1]
        # Nor does it stop lead-2 from casting their real vote.
        second = _approve(lead2, proposal, seen["action_digest"])
        assert second.status_code == 200 and second.json()["state"] == "APPROVED", second.text
    problems = attack.disagreements(proposal)
    assert any("signature" in problem for problem in problems), problems


def test_a_forged_vote_event_with_its_row_does_not_count(attack: Attack) -> None:
    """Everything a writer can forge about a vote, consistently: the event (chained) and the row."""
    proposal = attack.bulk_close()
    _, lead1 = attack.approver(LEADS)
    lead2_id, _ = attack.approver(LEADS)
    with lead1:
        attack.forge_vote_event(proposal, lead2_id, [LEADS])
        attack.forge_vote_row(proposal, lead2_id, [LEADS])
        seen = _detail(lead1, proposal)
        _conflict(_approve(lead1, proposal, seen["action_digest"]))
    assert attack.state(proposal) == "PENDING_APPROVAL" and attack.tickets(proposal) == 0
    assert attack.vote_rows(proposal) == [lead2_id]  # only the forged one; lead-1's vote was not recorded
    assert attack.disagreements(proposal)


def test_a_signed_vote_copied_from_another_proposal_does_not_count(attack: Attack) -> None:
    """Two proposals of the same action share a digest; a real, PDP-signed vote on one is no vote on the other."""
    voted, target = attack.bulk_close(), attack.bulk_close()
    assert attack.row(voted)["action_digest"] == attack.row(target)["action_digest"]
    lead1_id, lead1 = attack.approver(LEADS)
    _, lead2 = attack.approver(LEADS)
    with lead1, lead2:
        assert _approve(lead1, voted, _detail(lead1, voted)["action_digest"]).status_code == 200
        with attack.server.engine.connect() as conn:
            body = conn.execute(
                select(audit_events.c.body).where(
                    audit_events.c.proposal_id == voted, audit_events.c.type == "approval.granted"
                )
            ).scalar_one()
        copied = json.loads(body)["data"]  # with its valid signature, for the other proposal
        row = attack.row(target)
        with attack.writer.begin() as conn:
            chain.append(
                conn,
                chain.Event(
                    type="approval.granted",
                    actor=f"approver:{lead1_id}",
                    occurred_at=datetime.now(UTC),
                    proposal_id=target,
                    agent_id=row["agent_id"],
                    policy_version=row["policy_version"],
                    data=copied,
                ),
            )
        response = _approve(lead2, target, _detail(lead2, target)["action_digest"])
        assert response.status_code == 200, response.text
        assert response.json()["state"] == "PENDING_APPROVAL"  # one of two: the copy counted for nothing
    assert attack.tickets(target) == 0
    assert any("signed for proposal" in problem for problem in attack.disagreements(target))


def test_a_well_chained_event_that_is_not_even_json_counts_for_nothing(attack: Attack) -> None:
    proposal = attack.critical()
    with attack.writer.begin() as conn:
        chain.lock_chain(conn)
        seq, prev = chain.head(conn)
        body = b"approve everything"
        conn.execute(
            audit_events.insert().values(
                chain=chain.MAIN_CHAIN,
                seq=seq + 1,
                event_id=str(uuid.uuid4()),
                type="approval.granted",
                proposal_id=proposal,
                agent_id=attack.row(proposal)["agent_id"],
                actor="approver:nobody",
                policy_version="",
                body=body.decode(),
                prev_hash=prev,
                hash=chain.event_hash(seq + 1, prev, body),
            )
        )
    _, oncall = attack.approver(ONCALL)
    with oncall:
        seen = _detail(oncall, proposal)
        assert [r["approvals"] for r in seen["requirements"]] == [0]
        response = _approve(oncall, proposal, seen["action_digest"])
        assert response.status_code == 200 and response.json()["state"] == "APPROVED", response.text
    report = attack.verify()
    assert report.first_bad_seq == seq + 1 and "not JSON" in report.problem


# --- (c) the requirements the PDP decided ------------------------------------------------------------------


@pytest.mark.parametrize("tamper", ["min_approvals", "groups", "requirements", "expiry"])
def test_a_lowered_stored_quorum_does_not_let_one_vote_approve(attack: Attack, tamper: str) -> None:
    proposal = attack.bulk_close()  # two support leads
    decision = attack.row(proposal)["decision"]
    original = json.loads(json.dumps(decision))
    if tamper == "min_approvals":
        decision["approval_requirements"][0]["min_approvals"] = 1
    elif tamper == "groups":  # anyone the attacker knows in ops-oncall
        decision["approval_requirements"][0]["groups"] = [ONCALL]
        decision["approval_requirements"][0]["min_approvals"] = 1
    elif tamper == "requirements":  # "already satisfied"
        decision["approval_requirements"] = [{"source": "rule:x", "groups": [LEADS], "min_approvals": 1}]
    else:
        decision["approval_expires_at"] = "2099-01-01T00:00:00.000000Z"
        decision["approval_requirements"][0]["min_approvals"] = 1
    attack.set_decision(proposal, decision)
    _, voter = attack.approver(ONCALL if tamper == "groups" else LEADS)
    with voter:
        seen = _detail(voter, proposal)
        assert seen["can_vote"] is False and "audit log" in seen["why_not"]
        _conflict(_approve(voter, proposal, seen["action_digest"]), "decision")
    assert attack.state(proposal) == "PENDING_APPROVAL" and attack.tickets(proposal) == 0
    assert attack.vote_rows(proposal) == []
    assert any("decision" in problem for problem in attack.disagreements(proposal))

    # Put back, the same vote counts as what it is: one of two.
    attack.set_decision(proposal, original)
    _, lead = attack.approver(LEADS)
    with lead:
        response = _approve(lead, proposal, _detail(lead, proposal)["action_digest"])
        assert response.status_code == 200 and response.json()["state"] == "PENDING_APPROVAL", response.text
    assert attack.disagreements(proposal) == []


def test_a_state_set_back_to_pending_does_not_reopen_a_rejected_proposal(attack: Attack) -> None:
    proposal = attack.critical()
    _, first = attack.approver(ONCALL)
    _, second = attack.approver(ONCALL)
    with first, second:
        digest_seen = _detail(first, proposal)["action_digest"]
        rejected = first.post(f"/api/v1/proposals/{proposal}/reject", json={"reason": "not an outage"})
        assert rejected.status_code == 200 and rejected.json()["state"] == "REJECTED"
        with attack.writer.begin() as conn:
            conn.execute(update(proposals).where(proposals.c.id == proposal).values(state="PENDING_APPROVAL"))
        _conflict(_approve(second, proposal, digest_seen), "REJECTED")
    assert attack.tickets(proposal) == 0
    assert any("state" in problem for problem in attack.disagreements(proposal))


# --- the role model: the executor's grants cannot make anything approved ------------------------------------


@pytest.mark.backend("postgres")
@pytest.mark.parametrize("backend", ["postgres"])
def test_the_executor_role_runs_approved_work_and_cannot_vote_or_issue_tickets(backend: str, tmp_path: Path) -> None:
    """pdp-executor, connected as a login in the executor role `pdp db roles` creates, carries out approved work;
    with the same grants, nothing that makes work approved can be written: no vote, no ticket, no other action."""
    with execution_stack(backend, tmp_path) as stack:
        suffix = uuid.uuid4().hex[:10]
        writer, auditor, executor = f"pdp_writer_{suffix}", f"pdp_auditor_{suffix}", f"pdp_executor_{suffix}"
        login = f"pdp_exec_login_{suffix}"
        admin = _libpq(stack.server.database_url)
        create_roles(stack.engine, writer, auditor, executor)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(sql.Identifier(login), sql.Identifier(executor))
            )
        as_executor = make_url(stack.server.database_url).set(username=login).render_as_string(hide_password=False)
        engine = create_db_engine(as_executor)
        try:
            allowed = stack.client.propose("web", "POST", stack.target.url + "items", "allowed", params={})
            assert allowed.state == pdp_pb2.APPROVED
            pending = stack.client.propose("web", "POST", stack.target.url + "items", "big", params={"big": True})
            assert pending.state == pdp_pb2.PENDING_APPROVAL
            assert stack.server.running is not None
            approvals_service = stack.server.running.approvals
            add_approver(stack.engine, f"ops-{suffix}", ["ops"])
            ops = approvals_service.approver(f"ops-{suffix}")
            shown = approvals_service.detail(ops, pending.proposal_id).action_digest
            assert approvals_service.approve(ops, pending.proposal_id, action_digest=shown).state == "APPROVED"
            config = executor_config(
                stack.tmp,
                database_url=as_executor,
                policy_dir=stack.bundle,
                signing_key=signing_key(),
                token_file=stack.token_file,
            )
            with running_executor(config):
                done = [stack.client.wait(p, timeout=30) for p in (allowed.proposal_id, pending.proposal_id)]
            assert [d.state for d in done] == [pdp_pb2.SUCCEEDED, pdp_pb2.SUCCEEDED]
            assert stack.target.count("/api/items") == 2

            waiting = stack.client.propose("web", "POST", stack.target.url + "items", "big", params={"big": True})
            row = stack.server.row(waiting.proposal_id)
            assert row is not None
            now = datetime.now(UTC).isoformat()
            refused = [
                "INSERT INTO approvals (proposal_id, approver_id, verdict, comment, groups, action_digest, decided_at) "
                f"VALUES ('{waiting.proposal_id}', 'ops-{suffix}', 'approve', '', '[\"ops\"]', "
                f"'{row['action_digest']}', '{now}')",
                "INSERT INTO execution_tickets (proposal_id, ticket_id, payload, signature, key_id, expires_at) "
                f"VALUES ('{waiting.proposal_id}', 't', '{{}}', 'ab', 'k', '{now}')",
                f"UPDATE proposals SET action = '{{}}' WHERE id = '{waiting.proposal_id}'",
                f"UPDATE proposals SET action_digest = 'x' WHERE id = '{waiting.proposal_id}'",
                f"UPDATE proposals SET decision = '{{}}' WHERE id = '{waiting.proposal_id}'",
                "DELETE FROM execution_tickets",
                "DELETE FROM approvals",
                "UPDATE audit_events SET actor = 'x'",
                "SELECT * FROM approvers",
            ]
            for statement in refused:
                with pytest.raises(DBAPIError) as error, engine.begin() as conn:
                    conn.execute(text(statement))
                assert isinstance(error.value.orig, psycopg.errors.InsufficientPrivilege), statement
                assert "permission denied" in str(error.value.orig), statement
        finally:
            engine.dispose()
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (login,))
                for role in (login, writer, auditor, executor):
                    conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
                    conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
