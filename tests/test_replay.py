"""`pdp policy replay`: a known history, recorded by a real server, re-decided with a candidate bundle.

The history is ten proposals decided by `policies/` (allow, deny, needs_approval, a catalog denial) plus one
denied by an open circuit breaker. The candidate makes `tickets-create` deny and drops the
`tickets-patch-single-ticket` deny rule, so exactly these change: the two ticket creations allow -> deny, the
bulk close and the critical ticket needs_approval -> deny, the PATCH of a non-ticket deny -> allow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ADMIN_MEMBERS, BULK_CLOSE, PDP, POLICIES, TICKETS, running_server
from sqlalchemy import insert

from pdp.canonical import timestamp
from pdp.cli.main import main
from pdp.client import PdpClient, pdp_pb2
from pdp.identity.agents import add_agent
from pdp.policy.bundle import PolicyBundle
from pdp.policy.decision import Outcome
from pdp.policy.engine import ActionInput, AgentIdentity, DecisionInput, decide
from pdp.policy.loader import load_bundle
from pdp.policy.replay import decided_events, replay
from pdp.store.database import create_db_engine
from pdp.store.models import circuit_breakers

PREFIX = "http://127.0.0.1:8282/api/"
ALLOW, DENY, NEEDS = Outcome.ALLOW, Outcome.DENY, Outcome.NEEDS_APPROVAL


@dataclass
class History:
    policy_version: str
    ids: dict[str, str]  # name -> proposal id


def _propose(client: PdpClient, expected: int, *args: Any, **kw: Any) -> str:
    response = client.propose(*args, **kw)
    assert response.decision.outcome == expected, response
    return str(response.proposal_id)


def snapshot(tmp_path: Path) -> Path:
    """A copy of policies/ for the server and the candidate alike, so both start from the very same bundle."""
    copy = tmp_path / "policies"
    shutil.copytree(POLICIES, copy)
    return copy


def record_history(url: str, policies: Path) -> History:
    with running_server(url, policies) as server:
        bot = server.client(add_agent(server.engine, "support-bot", "alice", ("support",)))
        other = server.client(add_agent(server.engine, "other-bot", "bob", ("support",)))
        ids = {
            "create": _propose(bot, pdp_pb2.ALLOW, "tickets", "POST", TICKETS, "fire", params={"title": "Fire"}),
            "admin": _propose(bot, pdp_pb2.DENY, "iam", "POST", ADMIN_MEMBERS, "I need admin"),
            "bulk": _propose(bot, pdp_pb2.NEEDS_APPROVAL, "tickets", "POST", BULK_CLOSE, "bulk", params={"count": 40}),
            "patch_bad": _propose(bot, pdp_pb2.DENY, "tickets", "PATCH", PREFIX + "tickets/abc", "fix"),
            "unknown": _propose(bot, pdp_pb2.DENY, "nosuch", "GET", "x://y", "probe"),
            "scratch": _propose(bot, pdp_pb2.ALLOW, "scratch", "PUT", "https://scratch.internal/notes/1", "notes"),
            "delete": _propose(bot, pdp_pb2.NEEDS_APPROVAL, "tickets", "DELETE", PREFIX + "tickets/7", "duplicate"),
            "patch_ok": _propose(bot, pdp_pb2.ALLOW, "tickets", "PATCH", PREFIX + "tickets/12", "typo"),
            "other": _propose(other, pdp_pb2.ALLOW, "tickets", "POST", TICKETS, "another"),
            "critical": _propose(
                other, pdp_pb2.NEEDS_APPROVAL, "tickets", "POST", TICKETS, "pager", params={"priority": "critical"}
            ),
        }
        # Last: the scratch store's breaker opens, so a write the rules allow is denied by runtime state.
        now = datetime.now(UTC)
        with server.engine.begin() as conn:
            conn.execute(
                insert(circuit_breakers).values(
                    tool="scratch", consecutive_failures=5, opened_until=now + timedelta(hours=1), updated_at=now
                )
            )
        assert server.running is not None
        server.running.circuits.load()
        ids["breaker"] = _propose(bot, pdp_pb2.DENY, "scratch", "PUT", "https://scratch.internal/notes/2", "more")
        version = load_bundle(policies).policy_version
    return History(version, ids)


def make_candidate(policies: Path, tmp_path: Path) -> Path:
    """policies/ with tickets-create turned into a deny and tickets-patch-single-ticket removed."""
    candidate = tmp_path / "candidate"
    shutil.copytree(policies, candidate)
    shutil.rmtree(candidate / "tests")  # cases that name the removed rule would not load
    path = candidate / "rules" / "support.yaml"
    document = yaml.safe_load(path.read_text())
    rules = [r for r in document["rules"] if r["id"] != "tickets-patch-single-ticket"]
    assert len(rules) == len(document["rules"]) - 1
    for rule in rules:
        if rule["id"] == "tickets-create":
            rule["effect"] = "deny"
    document["rules"] = rules
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return candidate


# What the candidate changes, oldest first: (name, recorded, candidate, the candidate's decisive reasons).
EXPECTED_CHANGES = [
    ("create", ALLOW, DENY, ["rule:tickets-create"]),
    ("bulk", NEEDS, DENY, ["rule:tickets-create"]),
    ("patch_bad", DENY, ALLOW, ["rule:tickets-update"]),
    ("other", ALLOW, DENY, ["rule:tickets-create"]),
    ("critical", NEEDS, DENY, ["rule:tickets-create"]),
]
EXPECTED_COUNTS = {
    (ALLOW, ALLOW): 2,  # scratch, patch_ok
    (ALLOW, DENY): 2,  # create, other
    (NEEDS, NEEDS): 1,  # delete
    (NEEDS, DENY): 2,  # bulk, critical
    (DENY, ALLOW): 1,  # patch_bad
    (DENY, DENY): 2,  # admin (human_only), unknown (catalog)
}
OUTCOMES = (ALLOW, NEEDS, DENY)


def pdp(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}  # no settings from the shell
    return subprocess.run([PDP, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120, check=False)


def test_replay_reports_the_exact_changes_of_a_known_history(database_url: str, tmp_path: Path) -> None:
    policies = snapshot(tmp_path)
    history = record_history(database_url, policies)
    ids = history.ids
    candidate = make_candidate(policies, tmp_path)
    bundle = load_bundle(candidate)

    engine = create_db_engine(database_url)
    try:
        report = replay(bundle, decided_events(engine))
    finally:
        engine.dispose()

    assert report.replayed == 11
    assert report.compared == 10
    assert report.runtime_decided == 1  # the breaker's deny: the candidate would allow, but it is not compared
    assert report.unreadable == 0
    assert report.same_content == 0 and not report.identical
    assert report.recorded_versions == {history.policy_version: 10}
    assert {k: v for k, v in report.counts.items() if v} == EXPECTED_COUNTS
    assert len(report.counts) == 9
    got = [(c.proposal_id, c.old, c.new, [r.rule_id for r in c.reasons]) for c in report.changes]
    assert got == [(ids[name], old, new, reasons) for name, old, new, reasons in EXPECTED_CHANGES]
    assert [c.proposal_id for c in report.flips] == [ids["create"], ids["patch_bad"], ids["other"]]
    first = report.changes[0]
    assert (first.agent_id, first.tool, first.operation, first.resource) == ("support-bot", "tickets", "POST", TICKETS)
    assert report.changes[3].agent_id == "other-bot"
    assert report.first_at is not None and report.last_at is not None and report.first_at <= report.last_at

    # The CLI, as CI runs it.
    args = ("policy", "replay", "--candidate", str(candidate), "--database-url", database_url)
    text = pdp(*args, cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    assert "replayed:   11 proposals" in text.stdout
    assert "1 decided by runtime state (breaker/limit): not compared" in text.stdout
    assert "5 would change (3 allow<->deny flips)" in text.stdout
    changed_lines = [line for line in text.stdout.splitlines() if " -> " in line]
    assert len(changed_lines) == 5
    for line, (name, old, new, _) in zip(changed_lines, EXPECTED_CHANGES, strict=True):
        assert ids[name] in line and line.endswith(f"{old.value} -> {new.value}"), line
    assert ids["breaker"] not in text.stdout
    assert "- rule:tickets-create (deny)" in text.stdout

    failing = pdp(*args, "--fail-on-flip", cwd=tmp_path)
    assert failing.returncode == 1, failing.stderr
    assert "3 allow<->deny flip(s)" in failing.stderr

    as_json = pdp(*args, "--format", "json", "--limit", "2", cwd=tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    document = json.loads(as_json.stdout)
    assert document["candidate_policy_version"] == bundle.policy_version
    assert (document["replayed"], document["compared"], document["decided_by_runtime_state"]) == (11, 10, 1)
    assert document["counts"] == {
        old.value: {new.value: EXPECTED_COUNTS.get((old, new), 0) for new in OUTCOMES} for old in OUTCOMES
    }
    assert (document["changed"], document["flips"], document["changes_not_listed"]) == (5, 3, 3)
    assert [(c["proposal_id"], c["recorded"], c["candidate"], c["flip"]) for c in document["changes"]] == [
        (ids["create"], "allow", "deny", True),
        (ids["bulk"], "needs_approval", "deny", False),
    ]

    capped = pdp(*args, "--limit", "1", cwd=tmp_path)
    assert "... and 4 more" in capped.stdout


def test_identical_candidate_changes_nothing(database_url: str, tmp_path: Path) -> None:
    policies = snapshot(tmp_path)
    history = record_history(database_url, policies)
    args = ("policy", "replay", "--candidate", str(policies), "--database-url", database_url)
    result = pdp(*args, "--fail-on-any-change", "--fail-on-flip", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no proposal would be decided differently" in result.stdout
    assert "the candidate has the same content as the bundle that decided every compared proposal" in result.stdout
    assert history.policy_version in result.stdout
    document = json.loads(pdp(*args, "--format", "json", cwd=tmp_path).stdout)
    assert document["identical"] is True and document["changed"] == 0


@pytest.mark.backend("sqlite")
def test_needs_approval_changes_fail_only_when_asked(database_url: str, tmp_path: Path) -> None:
    policies = snapshot(tmp_path)
    with running_server(database_url, policies) as server:
        bot = server.client(add_agent(server.engine, "support-bot", "alice", ("support",)))
        _propose(bot, pdp_pb2.NEEDS_APPROVAL, "tickets", "POST", BULK_CLOSE, "bulk", params={"count": 40})
    candidate = make_candidate(policies, tmp_path)
    args = ("policy", "replay", "--candidate", str(candidate), "--database-url", database_url)
    assert pdp(*args, "--fail-on-flip", cwd=tmp_path).returncode == 0  # needs_approval -> deny is no flip
    result = pdp(*args, "--fail-on-any-change", cwd=tmp_path)
    assert result.returncode == 1
    assert "1 change(s)" in result.stderr


def test_since_excludes_older_proposals(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PDP_DATABASE_URL", raising=False)
    policies = snapshot(tmp_path)
    candidate = make_candidate(policies, tmp_path)
    with running_server(database_url, policies) as server:
        bot = server.client(add_agent(server.engine, "support-bot", "alice", ("support",)))
        old = _propose(bot, pdp_pb2.ALLOW, "tickets", "POST", TICKETS, "first batch")
        time.sleep(1.1)
        boundary = datetime.now(UTC)
        time.sleep(1.1)
        new = _propose(bot, pdp_pb2.ALLOW, "tickets", "POST", TICKETS, "second batch")
        # The CLI in-process: a subprocess's start-up would eat most of a one-second window.
        code = main(
            [
                *("policy", "replay", "--candidate", str(candidate)),
                *("--since", "1s", "--format", "json", "--database-url", database_url),
            ]
        )
    assert code == 0
    document = json.loads(capsys.readouterr().out)
    assert document["replayed"] == 1 and document["since"] == "1s"
    assert [c["proposal_id"] for c in document["changes"]] == [new]

    engine = create_db_engine(database_url)
    try:
        everything = [e["proposal_id"] for e in decided_events(engine)]
        recent = [e["proposal_id"] for e in decided_events(engine, boundary)]
    finally:
        engine.dispose()
    assert everything == [old, new]
    assert recent == [new]


@pytest.mark.backend("sqlite")
def test_usage_errors_exit_2(database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(POLICIES, broken)
    (broken / "bundle.yaml").write_text("apiVersion: pdp/v1\nkind: Bundle\nname: x\nsurprise: 1\n")
    base = ["policy", "replay", "--database-url", database_url]
    assert main([*base, "--candidate", str(broken)]) == 2
    assert "problem(s)" in capsys.readouterr().err
    assert main([*base, "--candidate", str(POLICIES), "--since", "soon"]) == 2
    assert "invalid duration 'soon'" in capsys.readouterr().err
    assert main([*base, "--candidate", str(POLICIES), "--limit", "-1"]) == 2
    with pytest.raises(SystemExit) as exited:
        main(base)  # --candidate is required
    assert exited.value.code == 2
    missing = tmp_path / "no.db"
    assert main(["policy", "replay", "--candidate", str(POLICIES), "--database-url", f"sqlite:///{missing}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not missing.exists()


# --- the pure function, on hand-made event bodies -------------------------------------------------------------


def decided_body(
    bundle: PolicyBundle, request: DecisionInput, proposal_id: str, **decision_changes: Any
) -> dict[str, Any]:
    """A `proposal.decided` body as the server writes it, decided by ``bundle`` (then edited)."""
    decision = decide(bundle, request).to_dict() | decision_changes
    action = request.action
    return {
        "type": "proposal.decided",
        "proposal_id": proposal_id,
        "occurred_at": timestamp(request.now),
        "data": {
            "action": {
                "tool": action.tool,
                "operation": action.operation,
                "resource": action.resource,
                "params": dict(action.params),
                "estimated_cost_usd": action.estimated_cost_usd,
                "labels": dict(action.labels),
            },
            "decision": decision,
            "decision_input": {
                "agent": {"id": request.agent.id, "owner": "", "roles": list(request.agent.roles), "labels": {}},
                "context": {"now": timestamp(request.now), "environment": request.environment},
                "usage": dict(request.usage),
            },
        },
    }


SATURDAY = datetime(2026, 1, 3, 10, 0, tzinfo=UTC)
OPS = AgentIdentity("ops-bot", roles=("ops",))


def test_replay_uses_the_recorded_time_and_environment() -> None:
    weekend = DecisionInput(OPS, ActionInput("proddb", "update", "sql://prod-orders/orders"), SATURDAY)
    in_prod = DecisionInput(
        AgentIdentity("bot", roles=("support",)),
        ActionInput("tickets", "DELETE", PREFIX + "tickets/7"),
        SATURDAY,
        environment="prod",
    )
    bundle = load_bundle(POLICIES)
    bodies = [decided_body(bundle, weekend, "weekend"), decided_body(bundle, in_prod, "prod")]
    assert [b["data"]["decision"]["outcome"] for b in bodies] == ["deny", "deny"]
    report = replay(bundle, bodies)
    # Replayed with today's clock or the default environment, both would be needs_approval.
    assert report.compared == 2 and report.changes == ()
    assert report.counts[DENY, DENY] == 2


def test_runtime_state_and_unreadable_events_are_not_compared() -> None:
    request = DecisionInput(
        AgentIdentity("bot", roles=("support",)), ActionInput("scratch", "PUT", "https://scratch.internal/a"), SATURDAY
    )
    bundle = load_bundle(POLICIES)
    limited = decided_body(
        bundle,
        request,
        "limited",
        outcome="deny",
        reasons=[{"rule_id": "limit:scratch-writes", "effect": "deny", "message": "rate limit"}],
    )
    broken = decided_body(bundle, request, "broken")
    del broken["data"]["decision_input"]
    other_type = {"type": "proposal.cancelled", "proposal_id": "x", "data": {}}
    plain = decided_body(bundle, request, "plain", outcome="deny")  # recorded deny the engine would not give
    report = replay(bundle, [limited, broken, other_type, plain])
    assert (report.replayed, report.compared, report.runtime_decided, report.unreadable) == (3, 1, 1, 1)
    assert [(c.proposal_id, c.old, c.new) for c in report.changes] == [("plain", DENY, ALLOW)]
    assert report.failed(on_flip=True, on_any_change=False)
    assert not report.failed(on_flip=False, on_any_change=False)


def test_same_content_is_recognised_whatever_the_git_commit() -> None:
    bundle = load_bundle(POLICIES)
    request = DecisionInput(OPS, ActionInput("tickets", "GET", PREFIX + "tickets/1"), SATURDAY)
    digest = bundle.policy_version.split("+")[0]
    bodies = [
        decided_body(bundle, request, "same", policy_version=f"{digest}+git.0123456789ab"),
        decided_body(bundle, request, "older", policy_version="sha256:0000000000000000"),
    ]
    report = replay(bundle, bodies)
    assert (report.compared, report.same_content, report.identical) == (2, 1, False)
    assert replay(bundle, bodies[:1]).identical


def test_a_candidate_that_reads_usage_does_not_compare_history_recorded_without_it(tmp_path: Path) -> None:
    candidate = tmp_path / "candidate"
    shutil.copytree(POLICIES, candidate)
    (candidate / "rules" / "usage.yaml").write_text(
        "apiVersion: pdp/v1\nkind: Rules\nrules:\n"
        "  - id: busy\n    effect: deny\n    when: 'usage.agent.proposals_last_minute > 100'\n"
    )
    bundle = load_bundle(candidate)
    assert bundle.uses_usage
    request = DecisionInput(OPS, ActionInput("tickets", "GET", PREFIX + "tickets/1"), SATURDAY)
    counted = replace(request, usage={"agent": {"proposals_last_minute": 3, "spend_today_usd": 0.0}})
    bodies = [decided_body(bundle, request, "before-usage"), decided_body(bundle, counted, "with-usage")]
    report = replay(bundle, bodies)
    # Without the guard, the first would be replayed with no counters and "flip" to deny on a CEL error.
    assert (report.compared, report.without_usage, report.changes) == (1, 1, ())
