"""Governance limits (kind: Limits): rates, budgets, retry-storm quarantine, usage in CEL, across replicas."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import PDP, Server, fresh_database, running_server, start_serve
from sqlalchemy import select
from test_observability import delta, scrape, value

from pdp.client import PdpClient, PdpClientError
from pdp.governance.limits import window_start
from pdp.identity.approvers import add_approver
from pdp.policy.loader import BundleError, load_bundle
from pdp.policy.testing import run_tests
from pdp.store.migrate import upgrade
from pdp.store.models import audit_events
from pdp.v1 import pdp_pb2

PREFIX = "https://svc.internal/api/"


def write_bundle(directory: Path, limits: list[dict[str, Any]], rules: list[dict[str, Any]] | None = None) -> Path:
    """Tool `svc` (GET read, POST write); support may POST except to /forbidden; the given limits."""
    directory.mkdir(parents=True, exist_ok=True)
    documents: list[dict[str, Any]] = [
        {
            "apiVersion": "pdp/v1",
            "kind": "Bundle",
            "name": "limits-tests",
            "default_tier": "ai_writable",
            "default_approval": {"groups": ["ops"], "min_approvals": 1, "expires_in": "1h"},
        },
        {
            "apiVersion": "pdp/v1",
            "kind": "Tools",
            "tools": [
                {
                    "name": "svc",
                    "type": "http",
                    "resource_prefix": PREFIX,
                    "operations": {"GET": "read", "POST": "write"},
                },
                {"name": "other", "type": "http", "resource_prefix": "https://o/", "operations": {"POST": "write"}},
            ],
        },
        {
            "apiVersion": "pdp/v1",
            "kind": "Rules",
            "rules": rules
            or [
                {"id": "support-may", "effect": "allow", "when": '"support" in agent.roles'},
                {"id": "forbidden", "effect": "deny", "when": 'action.resource.endsWith("/forbidden")'},
            ],
        },
    ]
    if limits:
        documents.append({"apiVersion": "pdp/v1", "kind": "Limits", "limits": limits})
    (directory / "bundle.yaml").write_text(yaml.safe_dump_all(documents, sort_keys=False))
    return directory


# --- loading ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "message"),
    [
        ({"id": "x", "rate": "10/1m", "budget_usd": "5/day"}, "exactly one of"),
        ({"id": "x"}, "exactly one of"),
        ({"id": "x", "rate": "ten/1m"}, "write N/window"),
        ({"id": "x", "rate": "10/1 fortnight"}, "invalid duration"),
        ({"id": "x", "budget_usd": "5/week"}, "N/day"),
        ({"id": "x", "budget_usd": "-5/day"}, "N/day"),
        ({"id": "x", "rate": "10/1m", "on_exceed": "needs_approval"}, "budget_usd limits only"),
        ({"id": "x", "retry_storm": {"repeats": 3}, "scope": "tool"}, "per agent"),
        ({"id": "x", "rate": "1/1m", "tools": ["nosuch"]}, "no tool in the catalog matches"),
        ({"id": "x", "rate": "1/1m", "scope": {"key": "agent.roles"}}, "limit x"),
        ({"id": "x", "rate": "1/1m", "speed": 3}, "unknown key"),
    ],
)
def test_bad_limits_are_load_errors(tmp_path: Path, limit: dict[str, Any], message: str) -> None:
    with pytest.raises(BundleError, match=message):
        load_bundle(write_bundle(tmp_path, [limit]))


def test_duplicate_limit_ids_are_refused(tmp_path: Path) -> None:
    limits = [{"id": "x", "rate": "1/1m"}, {"id": "x", "rate": "2/1m"}]
    with pytest.raises(BundleError, match="duplicate limit id 'x'"):
        load_bundle(write_bundle(tmp_path, limits))


def test_the_example_bundle_has_each_kind_of_limit() -> None:
    bundle = load_bundle(Path(__file__).parent.parent / "policies")
    assert {limit.kind for limit in bundle.limits} == {"rate", "budget", "retry_storm"}
    assert {limit.scope for limit in bundle.limits} == {"agent", "agent+tool", "key"}


def test_policy_tests_can_set_usage(tmp_path: Path) -> None:
    rules = [
        {"id": "may", "effect": "allow", "when": "true"},
        {"id": "slow-down", "effect": "deny", "when": "usage.agent.proposals_last_minute >= 30"},
    ]
    directory = write_bundle(tmp_path, [], rules)
    case = {
        "name": "a busy agent is told to slow down",
        "input": {
            "agent": {"id": "a"},
            "action": {"tool": "svc", "operation": "POST", "resource": PREFIX + "x"},
            "usage": {"agent": {"proposals_last_minute": 31, "spend_today_usd": 0}},
        },
        "expect": {"outcome": "deny", "rules": ["slow-down"]},
    }
    (directory / "tests.yaml").write_text(
        yaml.safe_dump({"apiVersion": "pdp/v1", "kind": "PolicyTest", "tests": [case]})
    )
    bundle = load_bundle(directory)
    assert bundle.uses_usage
    assert all(result.passed for result in run_tests(bundle))


# --- against a running server ----------------------------------------------------------------------


@dataclass
class World:
    server: Server
    tmp: Path

    def agent(self, roles: tuple[str, ...] = ("support",), owner: str = "owner") -> tuple[str, PdpClient]:
        agent = self.server.add_agent(roles, owner=owner)
        return agent.id, self.server.client(agent.token)

    def events(self, kind: str) -> list[dict[str, Any]]:
        with self.server.engine.connect() as conn:
            rows = conn.execute(
                select(audit_events.c.body).where(audit_events.c.type == kind).order_by(audit_events.c.seq)
            ).scalars()
            return [json.loads(body) for body in rows]


def _world(url: str, tmp: Path, limits: list[dict[str, Any]], rules: list[dict[str, Any]] | None = None) -> Any:
    return running_server(url, policy_dir=write_bundle(tmp / "bundle", limits, rules))


def propose(client: PdpClient, path: str = "items", cost: float = 0.0, **params: Any) -> pdp_pb2.ProposeResponse:
    return client.propose("svc", "POST", PREFIX + path, "t", params=params or None, estimated_cost_usd=cost)


def fresh_window(window: timedelta, margin: float = 0.3) -> None:
    """Sleep into the start of a fresh fixed window, so a burst does not straddle two."""
    now = datetime.now(UTC)
    start = window_start(now, window)
    left = (start + window - now).total_seconds()
    if left < window.total_seconds() - margin:
        time.sleep(left + 0.02)


def test_a_rate_limit_denies_the_one_over_with_retry_after_then_admits_again(database_url: str, tmp_path: Path) -> None:
    limits = [{"id": "burst", "scope": "agent", "rate": "3/2s"}]
    with _world(database_url, tmp_path, limits) as server:
        world = World(server, tmp_path)
        _, client = world.agent()
        _, other = world.agent()
        fresh_window(timedelta(seconds=2))
        _, before = scrape(server.admin_url + "/metrics")
        outcomes = [propose(client).decision for _ in range(4)]
        _, after = scrape(server.admin_url + "/metrics")
        assert delta(before, after, "pdp_limit_hits_total", limit="burst", effect="deny") == 1
        assert [d.outcome for d in outcomes] == [pdp_pb2.ALLOW] * 3 + [pdp_pb2.DENY]
        denied = outcomes[-1]
        assert denied.reasons[0].rule_id == "limit:burst" and "retry after" in denied.reasons[0].message
        assert 1 <= denied.retry_after_seconds <= 2
        assert propose(other).decision.outcome == pdp_pb2.ALLOW  # per agent
        time.sleep(denied.retry_after_seconds + 0.05)
        assert propose(client).decision.outcome == pdp_pb2.ALLOW


def test_a_budget_allows_up_to_the_cap_and_a_denied_proposal_costs_nothing(database_url: str, tmp_path: Path) -> None:
    limits = [{"id": "spend", "scope": "agent", "budget_usd": "10/day"}]
    with _world(database_url, tmp_path, limits) as server:
        _, client = World(server, tmp_path).agent()
        assert propose(client, cost=4).decision.outcome == pdp_pb2.ALLOW
        assert propose(client, "forbidden", cost=5).decision.outcome == pdp_pb2.DENY  # a rule denies: no charge
        assert propose(client, cost=4).decision.outcome == pdp_pb2.ALLOW  # 8 spent
        over = propose(client, cost=4).decision  # would be 12
        assert over.outcome == pdp_pb2.DENY and over.reasons[0].rule_id == "limit:spend"
        assert "8 spent today" in over.reasons[0].message
        tomorrow = window_start(datetime.now(UTC), timedelta(days=1)) + timedelta(days=1)
        assert 0 < over.retry_after_seconds <= (tomorrow - datetime.now(UTC)).total_seconds() + 1
        assert propose(client, cost=2).decision.outcome == pdp_pb2.ALLOW  # exactly 10: the denied one cost nothing
        assert propose(client, cost=0.01).decision.outcome == pdp_pb2.DENY


def test_a_budget_can_escalate_to_approval_and_approved_spend_counts(database_url: str, tmp_path: Path) -> None:
    limits = [
        {
            "id": "spend",
            "scope": "agent",
            "budget_usd": "10/day",
            "on_exceed": "needs_approval",
            "approval": {"groups": ["finance"], "min_approvals": 1, "expires_in": "1h"},
        }
    ]
    with _world(database_url, tmp_path, limits) as server:
        _, client = World(server, tmp_path).agent()
        assert propose(client, cost=9).decision.outcome == pdp_pb2.ALLOW
        escalated = propose(client, cost=5)
        assert escalated.state == pdp_pb2.PENDING_APPROVAL
        assert [(r.source, list(r.groups)) for r in escalated.decision.approval_requirements] == [
            ("limit:spend", ["finance"])
        ]
        assert server.running is not None
        approvals = server.running.approvals
        add_approver(server.engine, "fin-1", ["finance"])
        finance = approvals.approver("fin-1")
        shown = approvals.detail(finance, escalated.proposal_id).action_digest
        assert approvals.approve(finance, escalated.proposal_id, action_digest=shown).state == "APPROVED"
        # 14 now spent: even a cheap allowed proposal needs approval for the rest of the day.
        assert propose(client, cost=0.5).state == pdp_pb2.PENDING_APPROVAL


def test_a_retry_storm_quarantines_exactly_after_n_and_a_human_releases_it(
    database_url: str, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    limits = [{"id": "storm", "scope": "agent", "retry_storm": {"repeats": 3, "window": "10m", "quarantine": "15m"}}]
    with _world(database_url, tmp_path, limits) as server:
        world = World(server, tmp_path)
        stormer_id, stormer = world.agent()
        _, bystander = world.agent()
        decided = [propose(stormer, "forbidden").decision for _ in range(5)]
        assert [d.reasons[0].rule_id for d in decided[:3]] == ["rule:forbidden"] * 3  # exactly N get decided
        for d in decided[3:]:
            assert d.outcome == pdp_pb2.DENY and d.reasons[0].rule_id == "limit:storm"
            assert "quarantined" in d.reasons[0].message and 14 * 60 < d.retry_after_seconds <= 15 * 60
        # Everything it proposes is denied now, not just the storming action; other agents are unaffected.
        assert propose(stormer, "fine").decision.reasons[0].rule_id == "limit:storm"
        assert propose(bystander, "fine").decision.outcome == pdp_pb2.ALLOW
        # Different actions denied once each are not a storm.
        assert all(propose(bystander, f"forbidden/{i}/forbidden").decision.outcome == pdp_pb2.DENY for i in range(3))
        assert propose(bystander, "fine").decision.outcome == pdp_pb2.ALLOW
        quarantined = world.events("agent.quarantined")
        assert [e["agent_id"] for e in quarantined] == [stormer_id]
        assert quarantined[0]["data"]["limit"] == "storm"
        _, samples = scrape(server.admin_url + "/metrics")
        assert value(samples, "pdp_quarantined_agents") == 1

        release = subprocess.run(
            [PDP, "agents", "release", stormer_id, "--by", "sam", "--database-url", database_url],
            capture_output=True,
            text=True,
            env=cli_env,
            check=False,
        )
        assert release.returncode == 0, release.stderr
        assert propose(stormer, "fine").decision.outcome == pdp_pb2.ALLOW
        assert world.events("agent.released")[0]["actor"] == "cli:sam"
        assert value(scrape(server.admin_url + "/metrics")[1], "pdp_quarantined_agents") == 0
        again = subprocess.run(
            [PDP, "agents", "release", stormer_id, "--database-url", database_url],
            capture_output=True,
            text=True,
            env=cli_env,
            check=False,
        )
        assert again.returncode == 1 and "not quarantined" in again.stderr
        # The count starts again after a release: two more identical denials are not yet a storm.
        assert [propose(stormer, "forbidden").decision.reasons[0].rule_id for _ in range(2)] == ["rule:forbidden"] * 2


def test_an_approver_can_release_a_quarantined_agent_through_the_api(database_url: str, tmp_path: Path) -> None:
    limits = [{"id": "storm", "scope": "agent", "retry_storm": {"repeats": 1, "window": "10m", "quarantine": "1h"}}]
    with _world(database_url, tmp_path, limits) as server:
        world = World(server, tmp_path)
        stormer_id, stormer = world.agent()
        propose(stormer, "forbidden")
        assert propose(stormer).decision.reasons[0].rule_id == "limit:storm"
        token = add_approver(server.engine, "lead-1", ["ops"])
        headers = {"Authorization": f"Bearer {token}"}
        url = f"{server.admin_url}/api/v1/agents/{stormer_id}/release"
        assert httpx.post(url).status_code == 401
        owner = {"Authorization": f"Bearer {add_approver(server.engine, 'owner', ['ops'])}"}
        assert httpx.post(url, headers=owner).status_code == 403  # separation of duties
        assert httpx.post(url, headers=headers).status_code == 204
        assert httpx.post(url, headers=headers).status_code == 409
        assert httpx.post(f"{server.admin_url}/api/v1/agents/nobody/release", headers=headers).status_code == 404
        assert propose(stormer).decision.outcome == pdp_pb2.ALLOW
        assert world.events("agent.released")[0]["actor"] == "approver:lead-1"


def test_rules_read_usage_counters(database_url: str, tmp_path: Path) -> None:
    rules = [
        {"id": "may", "effect": "allow", "when": "true"},
        {"id": "slow-down", "effect": "deny", "when": "usage.agent.proposals_last_minute >= 2"},
        {
            "id": "big-spender",
            "effect": "deny",
            "when": "usage.agent.spend_today_usd + action.estimated_cost_usd > 5.0",
        },
    ]
    with _world(database_url, tmp_path, [], rules) as server:
        _, client = World(server, tmp_path).agent()
        _, rich = World(server, tmp_path).agent()
        assert [propose(client).decision.outcome for _ in range(3)] == [pdp_pb2.ALLOW, pdp_pb2.ALLOW, pdp_pb2.DENY]
        # Evaluate sees the same counters (and counts nothing).
        assert client.evaluate("svc", "POST", PREFIX + "items", "t").outcome == pdp_pb2.DENY
        assert propose(rich, cost=3).decision.outcome == pdp_pb2.ALLOW
        over = propose(rich, cost=3).decision
        assert over.outcome == pdp_pb2.DENY and "rule:big-spender" in [r.rule_id for r in over.reasons]
        # What the rules saw is recorded with the decision, for replay.
        row = server.row(server_proposals(server, 1)[0])
        assert row is not None and "proposals_last_minute" in json.dumps(row["decision_input"]["usage"])


def server_proposals(server: Server, n: int) -> list[str]:
    from pdp.store.models import proposals

    with server.engine.connect() as conn:
        return list(conn.execute(select(proposals.c.id).order_by(proposals.c.created_at.desc()).limit(n)).scalars())


def test_a_key_scope_counts_per_computed_key(database_url: str, tmp_path: Path) -> None:
    limits = [{"id": "per-resource", "scope": {"key": "action.resource"}, "rate": "1/1h"}]
    with _world(database_url, tmp_path, limits) as server:
        world = World(server, tmp_path)
        _, a = world.agent()
        _, b = world.agent()
        assert propose(a, "x").decision.outcome == pdp_pb2.ALLOW
        assert propose(b, "x").decision.outcome == pdp_pb2.DENY  # same key, other agent
        assert propose(b, "y").decision.outcome == pdp_pb2.ALLOW


# --- two replicas ----------------------------------------------------------------------------------


@pytest.mark.backend("postgres")
def test_two_replicas_enforce_one_limit_not_two(tmp_path: Path, cli_env: dict[str, str]) -> None:
    limits = [{"id": "fleet", "scope": "tool", "rate": "50/1m"}]
    bundle = write_bundle(tmp_path / "bundle", limits)
    with fresh_database("postgres", tmp_path) as url:
        upgrade(url)
        replicas = [start_serve(url, tmp_path, cli_env, f"serve-{i}", policy_dir=bundle) for i in range(2)]
        try:
            from pdp.identity.agents import add_agent
            from pdp.store.database import create_db_engine

            engine = create_db_engine(url)
            tokens = [add_agent(engine, f"agent-{i}", "owner", ("support",)) for i in range(6)]
            engine.dispose()
            fresh_window(timedelta(minutes=1), margin=20)
            results: list[int] = []
            lock = threading.Lock()

            def send(i: int) -> None:
                with PdpClient(replicas[i % 2].address, tokens[i]) as client:
                    for n in range(20):
                        outcome = propose(client, f"{i}/{n}").decision.outcome
                        with lock:
                            results.append(outcome)

            threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
        finally:
            for replica in replicas:
                replica.stop()
    assert len(results) == 120
    assert results.count(pdp_pb2.ALLOW) == 50
    assert results.count(pdp_pb2.DENY) == 70


def test_limit_errors_fail_closed(database_url: str, tmp_path: Path) -> None:
    limits = [{"id": "by-team", "scope": {"key": 'agent.labels["team"]'}, "rate": "100/1m"}]
    with _world(database_url, tmp_path, limits) as server:
        _, client = World(server, tmp_path).agent()  # no team label: the key cannot be computed
        decision = propose(client).decision
        assert decision.outcome == pdp_pb2.DENY
        assert decision.reasons[0].rule_id == "limit:by-team" and "scope key failed" in decision.reasons[0].message


def test_idempotent_replays_count_once(database_url: str, tmp_path: Path) -> None:
    limits = [{"id": "burst", "scope": "agent", "rate": "2/1h"}]
    with _world(database_url, tmp_path, limits) as server:
        _, client = World(server, tmp_path).agent()
        first = client.propose("svc", "POST", PREFIX + "a", "t", idempotency_key="k1")
        assert client.propose("svc", "POST", PREFIX + "a", "t", idempotency_key="k1").proposal_id == first.proposal_id
        assert propose(client).decision.outcome == pdp_pb2.ALLOW  # the replay did not use the second slot
        assert propose(client).decision.outcome == pdp_pb2.DENY
        with pytest.raises(PdpClientError):
            client.propose("svc", "POST", PREFIX + "other", "t", idempotency_key="k1")
