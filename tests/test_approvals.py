"""Approval semantics: quorum, separation of duties, rejection, expiry, re-evaluation at quorum, races.

The approval use cases are called in process (the admin endpoint is a thin adapter, tested in
test_admin_*); agents talk to the real gRPC server; approved work is carried out by a real executor.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import BackgroundServer, Server, fresh_database, running_server, server_config, signing_key
from execution import Target, executor_config, running_executor, target_server
from sqlalchemy import func, select

from pdp.approvals import signed
from pdp.approvals.service import ApprovalService, VoteResult
from pdp.audit import chain, events
from pdp.audit.keys import load_public, public_path
from pdp.audit.verify import verify
from pdp.client import PdpClient
from pdp.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from pdp.identity.approvers import Approver, add_approver, revoke_approver
from pdp.policy.loader import load_bundle
from pdp.store.database import create_db_engine
from pdp.store.migrate import upgrade
from pdp.store.models import audit_events, execution_tickets, proposals
from pdp.store.proposals import ProposalRecord, record_proposal
from pdp.v1 import pdp_pb2

OWNER = "alice"


def write_bundle(directory: Path, target_url: str, *, tightened: bool = False, usage: bool = False) -> Path:
    """`web` writes: `two` needs 2 leads, `oncall` needs 1 of ops, `brief` expires in 1 s; tightened denies `two`."""
    directory.mkdir(parents=True, exist_ok=True)
    rules: list[dict[str, Any]] = [
        {"id": "support-may", "effect": "allow", "when": '"support" in agent.roles'},
        {
            "id": "two-leads",
            "effect": "needs_approval",
            "when": "has(action.params.two)",
            "approval": {"groups": ["leads"], "min_approvals": 2, "expires_in": "1h"},
        },
        {"id": "oncall", "effect": "needs_approval", "when": "has(action.params.oncall)"},
        {
            "id": "brief",
            "effect": "needs_approval",
            "when": "has(action.params.brief)",
            "approval": {"groups": ["leads"], "min_approvals": 1, "expires_in": "1s"},
        },
    ]
    if usage:  # a bundle that reads usage counters; this rule never fires here
        rules.append({"id": "busy", "effect": "deny", "when": "usage.agent.proposals_last_minute > 1000"})
    if tightened:
        rules.append({"id": "freeze", "effect": "deny", "when": "has(action.params.two)", "message": '"change freeze"'})
    documents = [
        {
            "apiVersion": "pdp/v1",
            "kind": "Bundle",
            "name": "approvals-tests",
            "default_tier": "ai_writable",
            "default_approval": {"groups": ["ops"], "min_approvals": 1, "expires_in": "1h"},
        },
        {
            "apiVersion": "pdp/v1",
            "kind": "Tools",
            "tools": [
                {"name": "web", "type": "http", "resource_prefix": target_url, "operations": {"POST": "write"}},
                # Unused here; the shared executor config serves it.
                {"name": "kv", "type": "http", "resource_prefix": target_url + "kv/", "operations": {"PUT": "write"}},
            ],
        },
        {"apiVersion": "pdp/v1", "kind": "Rules", "rules": rules},
    ]
    (directory / "bundle.yaml").write_text(yaml.safe_dump_all(documents, sort_keys=False))
    return directory


@dataclass
class World:
    server: Server
    service: ApprovalService
    client: PdpClient
    target: Target
    tmp: Path
    bundle: Path

    def approver(self, approver_id: str, *groups: str) -> Approver:
        add_approver(self.server.engine, approver_id, groups)
        return self.service.approver(approver_id)

    def pending(self, **params: Any) -> str:
        response = self.client.propose(
            "web", "POST", self.target.url + "items", "please <b>approve</b>", params=params or {"two": True}
        )
        assert response.state == pdp_pb2.PENDING_APPROVAL, response
        return response.proposal_id

    def approve(self, approver: Approver, pid: str, comment: str = "") -> VoteResult:
        """Look at the proposal as this approver, then approve the action shown."""
        shown = self.service.detail(approver, pid).action_digest
        return self.service.approve(approver, pid, comment, action_digest=shown)

    def state(self, pid: str) -> str:
        return pdp_pb2.ProposalState.Name(self.client.get(pid).state)

    def events(self, pid: str) -> list[tuple[str, dict[str, Any]]]:
        with self.server.engine.connect() as conn:
            rows = conn.execute(
                select(audit_events.c.type, audit_events.c.body)
                .where(audit_events.c.proposal_id == pid)
                .order_by(audit_events.c.seq)
            ).all()
        return [(r.type, json.loads(r.body)["data"]) for r in rows]

    def tickets(self, pid: str) -> int:
        with self.server.engine.connect() as conn:
            query = select(func.count()).where(execution_tickets.c.proposal_id == pid)
            return int(conn.execute(query).scalar_one())

    def executor_config(self) -> Path:
        token_file = self.tmp / "target.token"
        token_file.write_text(self.target.token)
        return executor_config(
            self.tmp,
            database_url=self.server.database_url,
            policy_dir=self.bundle,
            signing_key=signing_key(),
            token_file=token_file,
        )


@pytest.fixture(params=["sqlite", "postgres"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    with target_server() as target, fresh_database(request.param, tmp_path) as url:
        upgrade(url)
        bundle = write_bundle(tmp_path / "bundle", target.url)
        with running_server(url, policy_dir=bundle) as server:
            assert server.running is not None
            agent = server.add_agent(("support",), owner=OWNER)
            yield World(server, server.running.approvals, server.client(agent.token), target, tmp_path, bundle)


def test_a_quorum_of_two_needs_two_distinct_approvers_then_the_executor_runs_it(world: World) -> None:
    pid = world.pending()
    lead1, lead2 = world.approver("lead-1", "leads"), world.approver("lead-2", "leads")
    first = world.approve(lead1, pid, "looks right")
    assert first.state == "PENDING_APPROVAL"
    assert [(r.min_approvals, r.approvals) for r in first.requirements] == [(2, 1)]
    assert world.state(pid) == "PENDING_APPROVAL" and world.tickets(pid) == 0
    second = world.approve(lead2, pid)
    assert second.state == "APPROVED"
    assert world.tickets(pid) == 1
    with running_executor(world.executor_config()):
        final = world.client.wait(pid, timeout=30)
    assert final.state == pdp_pb2.SUCCEEDED
    assert [(a.approver_id, a.verdict) for a in final.approvals] == [("lead-1", "approve"), ("lead-2", "approve")]
    assert world.target.count("/api/items") == 1
    types = [t for t, _ in world.events(pid)]
    assert types[:4] == ["proposal.decided", "approval.granted", "approval.granted", "proposal.approved"]
    approved = dict(world.events(pid))["proposal.approved"]
    assert [a["approver_id"] for a in approved["approvals"]] == ["lead-1", "lead-2"]
    assert approved["ticket"]["payload"]
    votes = [data for kind, data in world.events(pid) if kind == "approval.granted"]
    assert {v["action_digest"] for v in votes} == {world.server.row(pid)["action_digest"]}  # type: ignore[index]
    # The request and both votes carry the PDP's signature, and every row agrees with the chain after execution.
    key = load_public(public_path(signing_key()))
    request = signed.open_request(key, dict(world.events(pid))["proposal.decided"]["approval_request"])
    assert (request.proposal_id, request.owner, request.action_digest) == (pid, OWNER, votes[0]["action_digest"])
    assert [(r.groups, r.min_approvals) for r in request.requirements] == [(("leads",), 2)]
    assert [signed.open_vote(key, v["vote"]).approver_id for v in votes] == ["lead-1", "lead-2"]
    report = verify(world.server.engine, public_key=key)
    assert report.intact and report.rows is not None and report.rows.agree, report.disagreements
    assert report.rows.proposals == 1 and report.rows.unsigned_requests == 0


def test_one_approver_in_the_groups_of_two_requirements_counts_for_both(world: World) -> None:
    pid = world.pending(two=True, oncall=True)  # 2 of leads AND 1 of ops
    both = world.approver("lead-ops", "leads", "ops")
    lead = world.approver("lead-only", "leads")
    assert world.approve(both, pid).state == "PENDING_APPROVAL"  # leads 1/2, ops 1/1
    assert world.approve(lead, pid).state == "APPROVED"


def test_separation_of_duties_and_one_vote_each(world: World) -> None:
    pid = world.pending()
    owner = world.approver(OWNER, "leads")  # the agent's owner is a lead too
    outsider = world.approver("bob", "finance")
    lead = world.approver("lead-1", "leads")
    with pytest.raises(PermissionDenied, match="separation of duties"):
        world.approve(owner, pid)
    with pytest.raises(PermissionDenied, match="not in a required group"):
        world.approve(outsider, pid)
    world.approve(lead, pid)
    with pytest.raises(PermissionDenied, match="already voted"):
        world.approve(lead, pid)
    with pytest.raises(PermissionDenied, match="already voted"):
        world.service.reject(lead, pid, "changed my mind")
    assert world.state(pid) == "PENDING_APPROVAL"
    assert [t for t, _ in world.events(pid)] == ["proposal.decided", "approval.granted"]
    # The list shows only what an approver may decide.
    assert [p.proposal_id for p in world.service.pending(world.approver("lead-2", "leads"))] == [pid]
    assert world.service.pending(lead) == [] and world.service.pending(owner) == []
    assert world.service.pending(outsider) == []


def test_one_rejection_rejects_and_the_agent_reads_the_reason(world: World) -> None:
    pid = world.pending()
    lead1, lead2 = world.approver("lead-1", "leads"), world.approver("lead-2", "leads")
    world.approve(lead1, pid)
    with pytest.raises(InvalidArgument, match="reason"):
        world.service.reject(lead2, pid, "   ")
    assert world.service.reject(lead2, pid, "wrong customer").state == "REJECTED"
    proposal = world.client.get(pid)
    assert proposal.state == pdp_pb2.REJECTED
    assert [(a.approver_id, a.verdict, a.comment) for a in proposal.approvals] == [
        ("lead-1", "approve", ""),
        ("lead-2", "reject", "wrong customer"),
    ]
    with pytest.raises(FailedPrecondition, match="REJECTED"):
        world.approve(world.approver("lead-3", "leads"), pid)
    assert world.tickets(pid) == 0
    rejected = dict(world.events(pid))["approval.rejected"]
    assert rejected["comment"] == "wrong customer" and rejected["to_state"] == "REJECTED"


def test_voting_after_cancellation_is_a_conflict(world: World) -> None:
    pid = world.pending()
    world.client.cancel(pid)
    with pytest.raises(FailedPrecondition, match="CANCELLED"):
        world.approve(world.approver("lead-1", "leads"), pid)


def test_a_revoked_approver_cannot_vote(world: World) -> None:
    pid = world.pending()
    lead = world.approver("lead-1", "leads")
    revoke_approver(world.server.engine, "lead-1")
    from pdp.errors import Unauthenticated

    with pytest.raises(Unauthenticated):
        world.approve(lead, pid)
    assert world.state(pid) == "PENDING_APPROVAL"


def test_a_policy_tightened_before_quorum_denies_at_quorum(world: World) -> None:
    pid = world.pending()
    lead1, lead2 = world.approver("lead-1", "leads"), world.approver("lead-2", "leads")
    world.approve(lead1, pid)
    assert world.server.running is not None
    world.server.running.bundles.swap(
        load_bundle(write_bundle(world.tmp / "tightened", world.target.url, tightened=True))
    )
    assert world.approve(lead2, pid).state == "DENIED"
    proposal = world.client.get(pid)
    assert proposal.state == pdp_pb2.DENIED
    assert "rule:freeze" in [r.rule_id for r in proposal.decision.reasons]
    assert world.tickets(pid) == 0
    denied = dict(world.events(pid))["proposal.denied"]
    assert denied["redecision"]["outcome"] == "deny"
    with running_executor(world.executor_config()):
        time.sleep(0.5)
    assert world.target.count() == 0


def test_expiry_without_votes_expires_and_never_executes(world: World) -> None:
    pid = world.pending(brief=True)
    lead = world.approver("lead-1", "leads")
    assert [p.proposal_id for p in world.service.pending(lead)] == [pid]
    time.sleep(1.2)
    # The agent's read sees it expired (the sweeper would too, within a second).
    assert world.state(pid) == "EXPIRED"
    with pytest.raises(FailedPrecondition, match="EXPIRED"):
        world.approve(lead, pid)
    assert world.service.pending(lead) == []
    assert [t for t, _ in world.events(pid)] == ["proposal.decided", "proposal.expired"]
    assert world.tickets(pid) == 0


def test_a_vote_arriving_after_the_deadline_expires_it_and_is_refused(world: World) -> None:
    pid = world.pending(brief=True)
    lead = world.approver("lead-1", "leads")
    assert world.server.running is not None
    world.server.running.sweeper.cancel()  # so that the vote is the first to notice
    shown = world.service.detail(lead, pid).action_digest  # looked in time, clicked too late
    time.sleep(1.2)
    with pytest.raises(FailedPrecondition, match="expired"):
        world.service.approve(lead, pid, action_digest=shown)
    assert world.state(pid) == "EXPIRED"
    assert [t for t, _ in world.events(pid)] == ["proposal.decided", "proposal.expired"]


def test_the_sweeper_expires_overdue_proposals_nobody_reads(world: World) -> None:
    pid = world.pending(brief=True)
    deadline = time.monotonic() + 10
    while world.server.row(pid)["state"] != "EXPIRED":  # type: ignore[index]
        assert time.monotonic() < deadline, "the sweeper did not expire the proposal"
        time.sleep(0.1)


@pytest.mark.backend("postgres")
def test_two_replicas_completing_the_quorum_at_once_issue_one_ticket(tmp_path: Path) -> None:
    with target_server() as target, fresh_database("postgres", tmp_path) as url:
        upgrade(url)
        bundle = write_bundle(tmp_path / "bundle", target.url)
        with running_server(url, policy_dir=bundle) as a, running_server(url, policy_dir=bundle) as b:
            assert a.running is not None and b.running is not None
            agent = a.add_agent(("support",), owner=OWNER)
            world = World(a, a.running.approvals, a.client(agent.token), target, tmp_path, bundle)
            results: dict[str, str] = {}
            for round_ in range(5):
                pid = world.pending()
                world.approve(world.approver(f"first-{round_}", "leads"), pid)
                voters = [
                    (a.running.approvals, world.approver(f"x-{round_}", "leads")),
                    (b.running.approvals, world.approver(f"y-{round_}", "leads")),
                ]
                barrier = threading.Barrier(2)

                shown = a.running.approvals.detail(voters[0][1], pid).action_digest

                def vote(
                    service: ApprovalService,
                    approver: Approver,
                    pid: str = pid,
                    barrier: threading.Barrier = barrier,
                    shown: str = shown,
                ) -> None:
                    barrier.wait()
                    try:
                        results[approver.id] = service.approve(approver, pid, action_digest=shown).state
                    except FailedPrecondition:
                        results[approver.id] = "conflict"

                threads = [threading.Thread(target=vote, args=voter) for voter in voters]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(30)
                outcomes = sorted(results[approver.id] for _, approver in voters)
                assert outcomes == ["APPROVED", "conflict"], outcomes
                assert world.tickets(pid) == 1
                assert [t for t, _ in world.events(pid)].count("proposal.approved") == 1
            with running_executor(world.executor_config()):
                deadline = time.monotonic() + 30
                while target.count() < 5:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                time.sleep(0.5)
            assert target.count() == 5


def test_a_webhook_hears_of_each_new_pending_proposal_without_its_content(tmp_path: Path) -> None:
    with target_server() as target, fresh_database("sqlite", tmp_path) as url:
        upgrade(url)
        bundle = write_bundle(tmp_path / "bundle", target.url)
        config = replace(
            server_config(url, policy_dir=bundle),
            approval_webhooks=target.url + "hooks",
            admin_url="https://pdp.example",
        )
        background = BackgroundServer(config)
        engine = create_db_engine(url)
        try:
            server = Server(f"127.0.0.1:{background.running.port}", url, engine, background.running)
            agent = server.add_agent(("support",), owner=OWNER)
            client = server.client(agent.token)
            pending = client.propose("web", "POST", target.url + "items", "secret reasoning", params={"two": True})
            client.propose("web", "POST", target.url + "items", "allowed, no hook")
            deadline = time.monotonic() + 20
            while target.count("/api/hooks") < 1:
                assert time.monotonic() < deadline, "the webhook was not called"
                time.sleep(0.05)
            server.close_clients()
        finally:
            background.stop()
            engine.dispose()
    assert target.count("/api/hooks") == 1
    body = json.loads(target.seen[-1].body)
    assert body == {
        "event": "proposal.pending_approval",
        "proposal_id": pending.proposal_id,
        "tool": "web",
        "resource": target.url + "items",
        "link": f"https://pdp.example/proposals/{pending.proposal_id}",
    }


def test_a_bundle_that_reads_usage_is_re_decided_with_usage_at_quorum(world: World) -> None:
    pid = world.pending(oncall=True)  # decided by a bundle that does not read usage: no counters recorded
    assert world.server.running is not None
    world.server.running.bundles.swap(load_bundle(write_bundle(world.tmp / "usage", world.target.url, usage=True)))
    # Without fresh counters the `busy` rule could not evaluate, fail closed, and deny what the quorum approved.
    assert world.approve(world.approver("oncall-1", "ops"), pid).state == "APPROVED"
    assert world.tickets(pid) == 1


def test_a_page_of_the_list_is_filled_after_filtering(world: World) -> None:
    for _ in range(2):
        world.pending()  # for the leads: older, and not this approver's
    mine = world.pending(oncall=True)
    page = world.service.pending_page(world.approver("oncall-1", "ops"), limit=1)
    assert [p.proposal_id for p in page.items] == [mine]
    assert page.next_cursor is None and page.prev_cursor is None


def test_a_proposal_decided_before_requests_were_signed_cannot_be_approved(world: World) -> None:
    """After an upgrade, a proposal pending from before has no signed request: it expires, no vote counts on it."""
    pid = world.pending()
    with world.server.engine.connect() as conn:
        row = conn.execute(select(proposals).where(proposals.c.id == pid)).mappings().one()
    legacy = replace(ProposalRecord.from_row(row), id=str(uuid.uuid4()), idempotency_key="")
    with world.server.engine.begin() as conn:  # as the PDP recorded one before it signed approval requests
        record_proposal(conn, legacy)
        chain.append(conn, events.proposal_decided(legacy))
    lead = world.approver("lead-1", "leads")
    detail = world.service.detail(lead, legacy.id)
    assert not detail.can_vote and "recorded before approvals were signed" in detail.why_not
    with pytest.raises(FailedPrecondition, match="recorded before approvals were signed"):
        world.service.approve(lead, legacy.id, action_digest=detail.action_digest)
    assert world.tickets(legacy.id) == 0
    report = verify(world.server.engine, public_key=load_public(public_path(signing_key())))
    assert report.rows is not None and report.rows.unsigned_requests == 1
    assert report.rows.agree, report.disagreements  # not a disagreement: the rows match the (older) events
