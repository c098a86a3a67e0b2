"""The PolicyTest runner: cases next to the policies, run without a server, deterministic."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from bundles import BUNDLE_TOOLS_YAML, TICKETS, write_text

from pdp.policy import documents
from pdp.policy.bundle import PolicyBundle
from pdp.policy.decision import Decision, Outcome, Reason
from pdp.policy.engine import decide
from pdp.policy.loader import load_bundle
from pdp.policy.testing import DEFAULT_TEST_NOW, decision_input, decisive_rules, run_case, run_tests

POLICY = """
apiVersion: pdp/v1
kind: Boundaries
boundaries:
  - name: locked
    match: 'action.resource.contains("/locked/")'
    tier: human_only
  - name: gated
    match: 'action.resource.contains("/gated/")'
    tier: approval_required
---
apiVersion: pdp/v1
kind: Rules
rules:
  - id: reads
    effect: allow
    when: 'action.kind == "read"'
  - id: writes
    effect: allow
    when: 'action.kind == "write"'
  - id: bulk
    effect: needs_approval
    when: 'has(action.params.count) && action.params.count > 10'
  - id: night
    effect: deny
    when: 'context.now.getHours() >= 22 || context.now.getHours() < 6'
  - id: prod
    effect: deny
    when: 'context.environment == "prod" && has(action.params.count)'
  - id: quota
    effect: deny
    when: 'has(usage.writes_last_hour) && usage.writes_last_hour > 100'
  - id: broken
    effect: allow
    when: 'action.params.boom == 1'
    tools: [iam]
"""


def case(name: str, action: str, expect: str, context: str = "") -> str:
    """One PolicyTest case; ``action`` and ``expect`` are YAML flow mappings' contents."""
    text = f"""
  - name: {name}
    input:
      agent: {{id: a1, owner: alice, roles: [support]}}
      action: {{{action}}}
"""
    if context:
        text += f"      {context}\n"
    return text + f"    expect: {{{expect}}}\n"


def load_with_tests(directory: Path, *cases: str) -> PolicyBundle:
    write_text(directory, "bundle.yaml", BUNDLE_TOOLS_YAML)
    write_text(directory, "policy.yaml", POLICY)
    write_text(directory, "policy_test.yaml", "apiVersion: pdp/v1\nkind: PolicyTest\ntests:" + "".join(cases))
    return load_bundle(directory)


WRITE = f'tool: tickets, operation: POST, resource: "{TICKETS}t/1"'
READ = f'tool: tickets, operation: GET, resource: "{TICKETS}t/1"'
BULK = WRITE + ", params: {count: 40}"

PASSING = [
    case("write is allowed", WRITE, "outcome: allow, rules: [writes], boundary: '', tier: ai_writable"),
    case("read is allowed", READ, "outcome: allow, rules: [reads]"),
    case("bulk needs approval", BULK, "outcome: needs_approval, rules: [bulk]"),
    case(
        "locked is denied",
        f'tool: tickets, operation: POST, resource: "{TICKETS}locked/1"',
        "outcome: deny, rules: [writes], boundary: locked, tier: human_only",
    ),
    case(
        "gated needs approval",
        f'tool: tickets, operation: POST, resource: "{TICKETS}gated/1"',
        "outcome: needs_approval, boundary: gated, tier: approval_required",
    ),
    case("unstated rules are not checked", BULK, "outcome: needs_approval"),
    case("unknown tool", 'tool: payroll, operation: POST, resource: "x"', "outcome: deny, rules: []"),
    case("environment", BULK, "outcome: deny, rules: [prod]", "context: {environment: prod}"),
    case("usage", WRITE, "outcome: deny, rules: [quota]", "usage: {writes_last_hour: 101}"),
    case(
        "erroring rule counts as deny",
        'tool: iam, operation: set, resource: "iam://r/1"',
        "outcome: deny, rules: [broken]",
    ),
    case("quoted now", WRITE, "outcome: deny, rules: [night]", 'context: {now: "2026-01-05T23:00:00Z"}'),
    case("unquoted now", WRITE, "outcome: deny, rules: [night]", "context: {now: 2026-01-05T23:00:00Z}"),
    case(
        "unquoted now with offset",
        WRITE,
        "outcome: allow, rules: [writes]",
        "context: {now: 2026-01-05T23:00:00+02:00}",
    ),
    case(
        "quoted now with offset", WRITE, "outcome: deny, rules: [night]", 'context: {now: "2026-01-05T08:00:00+05:00"}'
    ),
    case("naive now is UTC", WRITE, "outcome: deny, rules: [night]", 'context: {now: "2026-01-05T23:30:00"}'),
    case("default now is 10:00 UTC", WRITE, "outcome: allow, rules: [writes]"),
]


def test_passing_cases(tmp_path: Path) -> None:
    bundle = load_with_tests(tmp_path, *PASSING)
    results = run_tests(bundle)
    assert [r.case.spec.name for r in results] == [c.spec.name for c in bundle.tests]
    assert len(results) == len(PASSING)
    for result in results:
        assert result.passed, (result.case.spec.name, result.failures, result.decision.reasons)
        assert result.failures == ()


FAILING = [
    (
        case("outcome", WRITE, "outcome: deny"),
        ["outcome: expected deny, got allow"],
    ),
    (
        case("rules", BULK, "outcome: needs_approval, rules: [writes]"),
        ["rules: expected ['writes'], got ['bulk']"],
    ),
    (
        case("rules expected empty", BULK, "outcome: needs_approval, rules: []"),
        ["rules: expected [], got ['bulk']"],
    ),
    (
        case(
            "boundary",
            f'tool: tickets, operation: POST, resource: "{TICKETS}locked/1"',
            "outcome: deny, boundary: gated",
        ),
        ["boundary: expected 'gated', got 'locked'"],
    ),
    (
        case(
            "boundary expected none",
            f'tool: tickets, operation: POST, resource: "{TICKETS}gated/1"',
            "outcome: needs_approval, boundary: ''",
        ),
        ["boundary: expected '', got 'gated'"],
    ),
    (
        case("tier", WRITE, "outcome: allow, tier: human_only"),
        ["tier: expected human_only, got ai_writable"],
    ),
    (
        case("everything", BULK, "outcome: allow, rules: [reads], boundary: locked, tier: approval_required"),
        [
            "outcome: expected allow, got needs_approval",
            "rules: expected ['reads'], got ['bulk']",
            "boundary: expected 'locked', got ''",
            "tier: expected approval_required, got ai_writable",
        ],
    ),
    (
        case("now matters", WRITE, "outcome: allow", 'context: {now: "2026-01-05T03:00:00Z"}'),
        ["outcome: expected allow, got deny"],
    ),
]


@pytest.mark.parametrize(("text", "failures"), FAILING, ids=[f[0].split("\n")[1].split(": ", 1)[1] for f in FAILING])
def test_failing_cases(tmp_path: Path, text: str, failures: list[str]) -> None:
    bundle = load_with_tests(tmp_path, text)
    [result] = run_tests(bundle)
    assert not result.passed
    assert list(result.failures) == failures


def test_results_carry_the_decision(tmp_path: Path) -> None:
    bundle = load_with_tests(tmp_path, case("bulk", BULK, "outcome: needs_approval"))
    [result] = run_tests(bundle)
    assert result.decision.outcome is Outcome.NEEDS_APPROVAL
    assert result.decision.policy_version == bundle.policy_version
    assert result.case.location.file == "policy_test.yaml"
    assert result.case.location.line == 4


def test_default_now_is_fixed(tmp_path: Path) -> None:
    assert datetime(2026, 1, 5, 10, 0, tzinfo=UTC) == DEFAULT_TEST_NOW
    probe = case("probe", WRITE, "outcome: deny, rules: [at-ten]")
    write_text(tmp_path, "bundle.yaml", BUNDLE_TOOLS_YAML)
    write_text(
        tmp_path,
        "rules.yaml",
        """
        apiVersion: pdp/v1
        kind: Rules
        rules:
          - id: at-ten
            effect: deny
            when: 'context.now == timestamp("2026-01-05T10:00:00Z")'
        """,
    )
    write_text(tmp_path, "t.yaml", "apiVersion: pdp/v1\nkind: PolicyTest\ntests:" + probe)
    bundle = load_bundle(tmp_path)
    first = run_tests(bundle)
    second = run_tests(bundle)
    assert first[0].passed, first[0].failures
    assert first[0].decision == second[0].decision
    assert first[0].decision.approval_expires_at is None


def test_default_now_sets_approval_expiry(tmp_path: Path) -> None:
    bundle = load_with_tests(tmp_path, case("bulk", BULK, "outcome: needs_approval"))
    [result] = run_tests(bundle)
    # the Bundle's default_approval expires in 1h
    assert result.decision.approval_expires_at == datetime(2026, 1, 5, 11, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (None, DEFAULT_TEST_NOW),
        ("2026-02-03T04:05:06Z", datetime(2026, 2, 3, 4, 5, 6, tzinfo=UTC)),
        ("2026-02-03T04:05:06+00:00", datetime(2026, 2, 3, 4, 5, 6, tzinfo=UTC)),
        ("2026-02-03T04:05:06", datetime(2026, 2, 3, 4, 5, 6, tzinfo=UTC)),
        (datetime(2026, 2, 3, 4, 5, 6, tzinfo=UTC), datetime(2026, 2, 3, 4, 5, 6, tzinfo=UTC)),
        (datetime(2026, 2, 3, 4, 5, 6), datetime(2026, 2, 3, 4, 5, 6, tzinfo=UTC)),
    ],
)
def test_decision_input_now(now: datetime | str | None, expected: datetime) -> None:
    spec = documents.TestInput.model_validate(
        {
            "agent": {"id": "a1"},
            "action": {"tool": "tickets", "operation": "POST", "resource": "x"},
            "context": {} if now is None else {"now": now},
        }
    )
    got = decision_input(spec).now
    assert got == expected
    assert got.utcoffset() is not None


def test_decision_input_maps_every_field() -> None:
    spec = documents.TestInput.model_validate(
        {
            "agent": {"id": "a1", "owner": "alice", "roles": ["support", "ops"], "labels": {"team": "core"}},
            "action": {
                "tool": "tickets",
                "operation": "POST",
                "resource": "r",
                "params": {"count": 3},
                "estimated_cost_usd": 2,
                "labels": {"ticket": "T-1"},
            },
            "context": {"environment": "staging"},
            "usage": {"writes": 4},
        }
    )
    got = decision_input(spec)
    assert (got.agent.id, got.agent.owner, got.agent.roles, dict(got.agent.labels)) == (
        "a1",
        "alice",
        ("support", "ops"),
        {"team": "core"},
    )
    action = got.action
    assert (action.tool, action.operation, action.resource) == ("tickets", "POST", "r")
    assert dict(action.params) == {"count": 3}
    assert action.estimated_cost_usd == 2.0
    assert isinstance(action.estimated_cost_usd, float)
    assert dict(action.labels) == {"ticket": "T-1"}
    assert got.environment == "staging"
    assert dict(got.usage) == {"writes": 4}
    # environment defaults to the caller's choice
    bare = documents.TestInput.model_validate(
        {"agent": {"id": "a"}, "action": {"tool": "t", "operation": "o", "resource": "r"}}
    )
    assert decision_input(bare).environment == "dev"
    assert decision_input(bare, "prod").environment == "prod"
    assert dict(decision_input(bare).usage) == {}


def _decision(*reasons: tuple[str, Outcome]) -> Decision:
    return Decision(Outcome.DENY, tuple(Reason(r, e, "m") for r, e in reasons), "sha256:0")


@pytest.mark.parametrize(
    ("reasons", "expected"),
    [
        ((), []),
        ((("bundle.default_effect", Outcome.DENY),), []),
        ((("catalog.unknown_tool", Outcome.DENY),), []),
        ((("rule:a", Outcome.ALLOW),), ["a"]),
        ((("rule:b", Outcome.ALLOW), ("rule:a", Outcome.ALLOW)), ["a", "b"]),
        ((("rule:a", Outcome.ALLOW), ("rule:n", Outcome.NEEDS_APPROVAL)), ["n"]),
        ((("rule:a", Outcome.ALLOW), ("rule:n", Outcome.NEEDS_APPROVAL), ("rule:d", Outcome.DENY)), ["d"]),
        # a boundary cap is not a rule: the rules that decided are still the allowing ones
        ((("rule:a", Outcome.ALLOW), ("boundary:locked", Outcome.DENY)), ["a"]),
        ((("rule:a", Outcome.ALLOW), ("bundle.default_tier", Outcome.NEEDS_APPROVAL)), ["a"]),
        # the same rule twice (e.g. an error in when and in message) is named once
        ((("rule:x", Outcome.DENY), ("rule:x", Outcome.DENY), ("rule:a", Outcome.DENY)), ["a", "x"]),
    ],
)
def test_decisive_rules(reasons: tuple[tuple[str, Outcome], ...], expected: list[str]) -> None:
    assert decisive_rules(_decision(*reasons)) == expected


def test_run_case_runs_one(tmp_path: Path) -> None:
    bundle = load_with_tests(tmp_path, case("ok", WRITE, "outcome: allow"), case("bad", WRITE, "outcome: deny"))
    ok, bad = bundle.tests
    assert run_case(bundle, ok).passed
    assert not run_case(bundle, bad).passed
    assert run_case(bundle, ok).decision == decide(bundle, decision_input(ok.spec.input))
