"""The decision function, case by case: precedence, boundary caps, fail closed, approvals, reasons, CEL."""

from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from bundles import NOW, TICKETS, TOOLS, make_bundle, request

from pdp.policy.bundle import PolicyBundle
from pdp.policy.decision import ApprovalRequirement, Decision, Outcome, Reason
from pdp.policy.engine import decide

ALLOW, DENY, NEEDS = Outcome.ALLOW, Outcome.DENY, Outcome.NEEDS_APPROVAL

# --- decision semantics as data ---------------------------------------------------------------------
#
# One bundle (in four variants of its Bundle document) whose rules fire on params flags and whose
# boundaries match on resource path segments, so every case below is pure data: flags and a path in,
# outcome, boundary, tier, matched rules and approval requirements out.

SEMANTIC_BOUNDARIES: list[dict[str, Any]] = [
    # Declared so that neither "first match wins" nor "last match wins" gives the right answers.
    {"name": "open", "match": 'action.resource.contains("/open/")', "tier": "ai_writable"},
    {"name": "locked", "match": 'action.resource.contains("/locked/")', "tier": "human_only"},
    {
        "name": "gated",
        "match": 'action.resource.contains("/gated/")',
        "tier": "approval_required",
        "approval": {"groups": ["leads"], "min_approvals": 2, "expires_in": "30m"},
    },
    # same tier as "locked", declared after it: a tie goes to the first declared
    {"name": "vault", "match": 'action.resource.contains("/vault/")', "tier": "human_only"},
    {"name": "secrets", "match": 'action.resource.contains("/secret/")', "tier": "human_only", "applies_to": "all"},
    # approval_required for reads too, approved under the bundle's default_approval.
    {"name": "audit", "match": 'action.resource.contains("/audit/")', "tier": "approval_required", "applies_to": "all"},
    {"name": "sandbox", "match": 'action.resource.contains("/sandbox/")', "tier": "ai_writable", "applies_to": "all"},
]

SEMANTIC_RULES: list[dict[str, Any]] = [
    {"id": "allow-flag", "effect": "allow", "when": "has(action.params.allow)"},
    {
        "id": "approve-flag",
        "effect": "needs_approval",
        "when": "has(action.params.approve)",
        "approval": {"groups": ["finance", "cfo"], "min_approvals": 1, "expires_in": "10m"},
    },
    # no approval of its own: the bundle's default_approval applies
    {"id": "approve-default", "effect": "needs_approval", "when": "has(action.params.approve_default)"},
    {"id": "deny-flag", "effect": "deny", "when": "has(action.params.deny)"},
]

VARIANTS: dict[str, dict[str, str]] = {
    "deny-default": {"default_effect": "deny", "default_tier": "ai_writable"},
    "allow-default": {"default_effect": "allow", "default_tier": "ai_writable"},
    "gated-default": {"default_effect": "deny", "default_tier": "approval_required"},
    "human-default": {"default_effect": "deny", "default_tier": "human_only"},
}


@pytest.fixture(scope="module")
def semantic_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PolicyBundle]:
    return {
        variant: make_bundle(
            tmp_path_factory.mktemp(variant), rules=SEMANTIC_RULES, boundaries=SEMANTIC_BOUNDARIES, **options
        )
        for variant, options in VARIANTS.items()
    }


# (source, groups, min_approvals, expires_in) as the bundle above declares them
RULE_APPROVE = ("rule:approve-flag", ("finance", "cfo"), 1, timedelta(minutes=10))
RULE_DEFAULT = ("rule:approve-default", ("ops",), 1, timedelta(hours=1))
GATED = ("boundary:gated", ("leads",), 2, timedelta(minutes=30))
AUDIT = ("boundary:audit", ("ops",), 1, timedelta(hours=1))
DEFAULT_TIER = ("bundle.default_tier", ("ops",), 1, timedelta(hours=1))

Requirement = tuple[str, tuple[str, ...], int, timedelta]


@dataclass(frozen=True)
class Case:
    id: str
    path: str  # appended to the tickets prefix
    flags: tuple[str, ...]
    outcome: Outcome
    boundary: str
    tier: str
    variant: str = "deny-default"
    write: bool = True
    matched: tuple[str, ...] | None = None  # None: the rules named by the flags, in bundle order
    approvals: tuple[Requirement, ...] = field(default=())


_FLAG_RULES = {
    "allow": "allow-flag",
    "approve": "approve-flag",
    "approve_default": "approve-default",
    "deny": "deny-flag",
}

SEMANTIC_CASES = [
    # precedence: deny > needs_approval > allow; no match -> default_effect
    Case("allow", "open/1", ("allow",), ALLOW, "open", "ai_writable"),
    Case("needs-approval", "open/1", ("approve",), NEEDS, "open", "ai_writable", approvals=(RULE_APPROVE,)),
    Case("deny", "open/1", ("deny",), DENY, "open", "ai_writable"),
    Case(
        "approval-beats-allow", "open/1", ("allow", "approve"), NEEDS, "open", "ai_writable", approvals=(RULE_APPROVE,)
    ),
    Case("deny-beats-allow", "open/1", ("allow", "deny"), DENY, "open", "ai_writable"),
    Case("deny-beats-approval", "open/1", ("approve", "deny"), DENY, "open", "ai_writable"),
    Case("deny-beats-all", "open/1", ("allow", "approve", "deny"), DENY, "open", "ai_writable"),
    Case("no-match-default-deny", "open/1", (), DENY, "open", "ai_writable"),
    Case("no-match-default-allow", "open/1", (), ALLOW, "open", "ai_writable", variant="allow-default"),
    Case("default-allow-deny-rule", "open/1", ("deny",), DENY, "open", "ai_writable", variant="allow-default"),
    Case(
        "default-allow-approval-rule",
        "open/1",
        ("approve",),
        NEEDS,
        "open",
        "ai_writable",
        variant="allow-default",
        approvals=(RULE_APPROVE,),
    ),
    Case(
        "rule-without-approval-uses-default",
        "open/1",
        ("approve_default",),
        NEEDS,
        "open",
        "ai_writable",
        approvals=(RULE_DEFAULT,),
    ),
    Case(
        "two-approval-rules",
        "open/1",
        ("approve", "approve_default"),
        NEEDS,
        "open",
        "ai_writable",
        approvals=(RULE_APPROVE, RULE_DEFAULT),
    ),
    # human_only: always deny, no approval can override
    Case("human-only-caps-allow", "locked/1", ("allow",), DENY, "locked", "human_only"),
    Case("human-only-caps-approval", "locked/1", ("approve",), DENY, "locked", "human_only"),
    Case("human-only-default-allow", "locked/1", (), DENY, "locked", "human_only", variant="allow-default"),
    # approval_required: allow becomes needs_approval; deny stays deny
    Case(
        "approval-required-caps-allow", "gated/1", ("allow",), NEEDS, "gated", "approval_required", approvals=(GATED,)
    ),
    Case("approval-required-keeps-deny", "gated/1", ("allow", "deny"), DENY, "gated", "approval_required"),
    Case("approval-required-default-deny", "gated/1", (), DENY, "gated", "approval_required"),
    Case(
        "approval-required-default-allow",
        "gated/1",
        (),
        NEEDS,
        "gated",
        "approval_required",
        variant="allow-default",
        approvals=(GATED,),
    ),
    Case(
        "approval-required-and-approval-rule",
        "gated/1",
        ("approve",),
        NEEDS,
        "gated",
        "approval_required",
        approvals=(RULE_APPROVE, GATED),
    ),
    # ai_writable: the rules decide
    Case("ai-writable-allow", "open/1", ("allow",), ALLOW, "open", "ai_writable", variant="gated-default"),
    Case("ai-writable-deny", "open/1", ("deny",), DENY, "open", "ai_writable", variant="human-default"),
    # the most restrictive matching boundary wins, whatever the declaration order
    Case(
        "restrictive-gated-over-open",
        "open/gated/1",
        ("allow",),
        NEEDS,
        "gated",
        "approval_required",
        approvals=(GATED,),
    ),
    Case("restrictive-locked-over-gated", "gated/locked/1", ("allow",), DENY, "locked", "human_only"),
    Case("restrictive-locked-over-open", "locked/open/1", ("allow",), DENY, "locked", "human_only"),
    Case("tie-goes-to-first-declared", "vault/locked/1", ("allow",), DENY, "locked", "human_only"),
    Case(
        "two-approval-boundaries",
        "gated/audit/1",
        ("allow",),
        NEEDS,
        "gated",
        "approval_required",
        approvals=(GATED, AUDIT),
    ),
    # a write no boundary matches gets default_tier (boundary "")
    Case("unmatched-write-ai-writable", "misc/1", ("allow",), ALLOW, "", "ai_writable"),
    Case(
        "unmatched-write-approval-required",
        "misc/1",
        ("allow",),
        NEEDS,
        "",
        "approval_required",
        variant="gated-default",
        approvals=(DEFAULT_TIER,),
    ),
    Case(
        "unmatched-write-approval-rule-and-default-tier",
        "misc/1",
        ("approve",),
        NEEDS,
        "",
        "approval_required",
        variant="gated-default",
        approvals=(RULE_APPROVE, DEFAULT_TIER),
    ),
    Case("unmatched-write-human-only", "misc/1", ("allow",), DENY, "", "human_only", variant="human-default"),
    # a read no boundary matches is not capped, whatever the default tier
    Case("unmatched-read-human-default", "misc/1", ("allow",), ALLOW, "", "ai_writable", "human-default", False),
    Case("unmatched-read-gated-default", "misc/1", ("allow",), ALLOW, "", "ai_writable", "gated-default", False),
    Case("unmatched-read-rules-decide", "misc/1", ("deny",), DENY, "", "ai_writable", "human-default", False),
    # applies_to: writes (the default) is ignored for reads; applies_to: all caps reads
    Case("read-ignores-writes-human-only", "locked/1", ("allow",), ALLOW, "", "ai_writable", write=False),
    Case("read-ignores-writes-approval", "gated/1", ("allow",), ALLOW, "", "ai_writable", write=False),
    Case("read-all-human-only", "secret/1", ("allow",), DENY, "secrets", "human_only", write=False),
    Case(
        "read-all-approval", "audit/1", ("allow",), NEEDS, "audit", "approval_required", write=False, approvals=(AUDIT,)
    ),
    Case("read-all-ai-writable", "sandbox/1", ("allow",), ALLOW, "sandbox", "ai_writable", "human-default", False),
    Case("read-all-wins-over-writes-only", "locked/secret/1", ("allow",), DENY, "secrets", "human_only", write=False),
    Case("write-all-human-only", "secret/1", ("allow",), DENY, "secrets", "human_only"),
    Case(
        "write-all-ai-writable-beats-default", "sandbox/1", ("allow",), ALLOW, "sandbox", "ai_writable", "human-default"
    ),
]


@pytest.mark.parametrize("case", SEMANTIC_CASES, ids=lambda c: c.id)
def test_decision_semantics(semantic_bundles: dict[str, PolicyBundle], case: Case) -> None:
    bundle = semantic_bundles[case.variant]
    params = {flag: True for flag in case.flags}
    decision = decide(bundle, request("tickets", "POST" if case.write else "GET", TICKETS + case.path, params=params))

    assert decision.outcome is case.outcome
    assert decision.boundary == case.boundary
    assert decision.tier == case.tier
    expected_rules = case.matched
    if expected_rules is None:
        named = {_FLAG_RULES[f] for f in case.flags}
        expected_rules = tuple(r["id"] for r in SEMANTIC_RULES if r["id"] in named)
    assert decision.matched_rules == expected_rules
    assert decision.policy_version == bundle.policy_version
    assert not any(r.rule_id.startswith("engine.") for r in decision.reasons)

    got = sorted((a.source, a.groups, a.min_approvals) for a in decision.approval_requirements)
    want = sorted((source, groups, n) for source, groups, n, _ in case.approvals)
    assert got == want
    if case.outcome is NEEDS:
        assert decision.approval_expires_at == NOW + min(expires for *_, expires in case.approvals)
    else:
        assert decision.approval_requirements == ()
        assert decision.approval_expires_at is None


def test_semantic_cases_cover_every_variant_and_outcome() -> None:
    # guards the table itself: a refactor of the cases must not silently drop a whole dimension
    assert {c.variant for c in SEMANTIC_CASES} == set(VARIANTS)
    assert {c.outcome for c in SEMANTIC_CASES} == set(Outcome)
    assert len({c.id for c in SEMANTIC_CASES}) == len(SEMANTIC_CASES)


def test_no_match_reason_names_the_default_effect(semantic_bundles: dict[str, PolicyBundle]) -> None:
    for variant, outcome in (("deny-default", DENY), ("allow-default", ALLOW)):
        decision = decide(semantic_bundles[variant], request(resource=TICKETS + "open/1"))
        assert decision.outcome is outcome
        assert [(r.rule_id, r.effect) for r in decision.reasons] == [("bundle.default_effect", outcome)]


@pytest.mark.parametrize(
    ("path", "variant", "source", "effect"),
    [
        ("locked/1", "deny-default", "boundary:locked", DENY),
        ("gated/1", "deny-default", "boundary:gated", NEEDS),
        ("misc/1", "gated-default", "bundle.default_tier", NEEDS),
        ("misc/1", "human-default", "bundle.default_tier", DENY),
    ],
)
def test_capping_boundary_is_a_reason(
    semantic_bundles: dict[str, PolicyBundle], path: str, variant: str, source: str, effect: Outcome
) -> None:
    decision = decide(semantic_bundles[variant], request(resource=TICKETS + path, params={"allow": True}))
    capping = [r for r in decision.reasons if r.rule_id == source]
    assert len(capping) == 1
    assert capping[0].effect is effect
    # the rule that allowed is still explained
    assert Reason("rule:allow-flag", ALLOW, "rule allow-flag matched") in decision.reasons


def test_ai_writable_boundary_adds_no_reason(semantic_bundles: dict[str, PolicyBundle]) -> None:
    decision = decide(semantic_bundles["deny-default"], request(resource=TICKETS + "open/1", params={"allow": True}))
    assert [r.rule_id for r in decision.reasons] == ["rule:allow-flag"]


# --- fail closed --------------------------------------------------------------------------------------

ALLOW_ALL = {"id": "allow-all", "effect": "allow", "when": "true", "description": "everything is fine"}


@dataclass(frozen=True)
class FailCase:
    id: str
    params: dict[str, Any]
    rules: list[dict[str, Any]]
    boundaries: list[dict[str, Any]] = field(default_factory=list)
    source: str = "rule:bad"  # the reason's rule_id
    error: str = ""  # a fragment of the CEL error
    operation: str = "POST"


FAIL_CASES = [
    FailCase(
        "missing-map-key", {}, [{"id": "bad", "effect": "allow", "when": 'action.params.nope == "x"'}], error="nope"
    ),
    FailCase(
        "type-error-string-vs-number",
        {"count": "ten"},
        [{"id": "bad", "effect": "allow", "when": "action.params.count > 10"}],
        error="overload",
    ),
    FailCase(
        "division-by-zero",
        {"zero": 0},
        [{"id": "bad", "effect": "allow", "when": "1 / int(action.params.zero) > 0"}],
        error="divide by zero",
    ),
    FailCase(
        "non-bool-result",
        {"flag": "yes"},
        [{"id": "bad", "effect": "allow", "when": "action.params.flag"}],
        error="expected bool",
    ),
    FailCase(
        "non-string-message",
        {"n": 3},
        [{"id": "bad", "effect": "allow", "when": "true", "message": "action.params.n"}],
        error="expected string",
    ),
    FailCase(
        "erroring-deny-rule",
        {"zero": 0},
        [{"id": "bad", "effect": "deny", "when": "1 / int(action.params.zero) > 0"}],
        error="divide by zero",
    ),
    FailCase(
        "erroring-needs-approval-rule",
        {},
        [{"id": "bad", "effect": "needs_approval", "when": "action.params.nope"}],
        error="nope",
    ),
    FailCase(
        "message-erroring",
        {"zero": 0},
        [{"id": "bad", "effect": "allow", "when": "true", "message": "string(1 / int(action.params.zero))"}],
        error="divide by zero",
    ),
    FailCase(
        "boundary-match-erroring",
        {},
        [],
        boundaries=[{"name": "broken", "match": 'action.params.nope == "x"', "tier": "ai_writable"}],
        source="boundary:broken",
        error="nope",
    ),
    FailCase(
        "boundary-all-erroring-on-read",
        {},
        [],
        boundaries=[{"name": "broken", "match": "action.params.nope", "tier": "ai_writable", "applies_to": "all"}],
        source="boundary:broken",
        error="nope",
        operation="GET",
    ),
    FailCase(
        "tool-glob-still-evaluated",
        {},
        [{"id": "bad", "effect": "allow", "when": "action.params.nope", "tools": ["tick*"]}],
        error="nope",
    ),
    FailCase(
        "tool-list-still-evaluated",
        {},
        [{"id": "bad", "effect": "allow", "when": "action.params.nope", "tools": ["iam", "tickets"]}],
        error="nope",
    ),
]


@pytest.mark.parametrize("case", FAIL_CASES, ids=lambda c: c.id)
def test_any_cel_error_denies_and_says_why(tmp_path: Path, case: FailCase) -> None:
    # default_effect allow and an allow-everything rule: only the error can deny
    bundle = make_bundle(tmp_path, rules=[ALLOW_ALL, *case.rules], boundaries=case.boundaries, default_effect="allow")
    decision = decide(bundle, request(operation=case.operation, params=case.params))

    assert decision.outcome is DENY
    errors = [r for r in decision.reasons if r.rule_id == case.source]
    assert len(errors) == 1, decision.reasons
    assert errors[0].effect is DENY
    assert case.error in errors[0].message
    assert "failed" in errors[0].message
    # the error is listed first, and the allowing rule is still explained
    assert decision.reasons[0] == errors[0]
    assert Reason("rule:allow-all", ALLOW, "everything is fine") in decision.reasons
    assert "bad" not in decision.matched_rules
    assert decision.approval_requirements == ()


def test_rule_limited_to_another_tool_is_not_evaluated(tmp_path: Path) -> None:
    erroring = {"id": "iam-only", "effect": "deny", "when": "1 / int(action.params.zero) > 0", "tools": ["iam"]}
    bundle = make_bundle(tmp_path, rules=[ALLOW_ALL, erroring])

    tickets = decide(bundle, request("tickets", "POST", TICKETS + "t/1", params={"zero": 0}))
    assert tickets.outcome is ALLOW
    assert all(r.rule_id != "rule:iam-only" for r in tickets.reasons)

    # the same input for the tool it is limited to does evaluate it (and so denies)
    iam = decide(bundle, request("iam", "set", "iam://roles/admin", params={"zero": 0}))
    assert iam.outcome is DENY
    assert [r.rule_id for r in iam.reasons if r.effect is DENY] == ["rule:iam-only"]


def test_rule_limited_by_glob_to_another_tool_is_not_evaluated(tmp_path: Path) -> None:
    erroring = {"id": "iam-glob", "effect": "deny", "when": "action.params.nope", "tools": ["ia*"]}
    bundle = make_bundle(tmp_path, rules=[ALLOW_ALL, erroring])
    assert decide(bundle, request("tickets")).outcome is ALLOW
    assert decide(bundle, request("iam", "set", "iam://x")).outcome is DENY


def test_boundary_for_writes_only_is_not_evaluated_for_reads(tmp_path: Path) -> None:
    broken = {"name": "broken", "match": "action.params.nope", "tier": "ai_writable"}
    bundle = make_bundle(tmp_path, rules=[ALLOW_ALL], boundaries=[broken])
    assert decide(bundle, request(operation="GET")).outcome is ALLOW
    assert decide(bundle, request(operation="POST")).outcome is DENY


def test_errors_are_deduplicated_and_sorted(tmp_path: Path) -> None:
    rules = [
        {"id": "zz-bad", "effect": "allow", "when": "action.params.nope"},
        {"id": "aa-bad", "effect": "allow", "when": "action.params.nope"},
        ALLOW_ALL,
    ]
    boundaries = [{"name": "mm-bad", "match": "action.params.nope", "tier": "ai_writable"}]
    decision = decide(make_bundle(tmp_path, rules=rules, boundaries=boundaries), request())
    ids = [r.rule_id for r in decision.reasons]
    assert ids == ["boundary:mm-bad", "rule:aa-bad", "rule:zz-bad", "rule:allow-all"]


def test_decide_never_raises(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, rules=[ALLOW_ALL], default_effect="allow")
    # a params value protobuf's Struct cannot hold: the engine must answer, and answer no
    decision = decide(bundle, request(params={"x": object()}))
    assert decision.outcome is DENY
    assert [r.rule_id for r in decision.reasons] == ["engine.internal_error"]
    assert decision.policy_version == bundle.policy_version


# --- approval requirements ------------------------------------------------------------------------------


def test_approval_requirement_fields_and_expiry(tmp_path: Path) -> None:
    rules = [
        {
            "id": "bulk",
            "effect": "needs_approval",
            "when": "true",
            "approval": {"groups": ["support-leads", "ops"], "min_approvals": 2, "expires_in": "1h30m"},
        }
    ]
    boundaries = [
        {
            "name": "billing",
            "match": "true",
            "tier": "approval_required",
            "approval": {"groups": ["finance"], "min_approvals": 3, "expires_in": "2d"},
        }
    ]
    decision = decide(make_bundle(tmp_path, rules=rules, boundaries=boundaries), request())
    assert decision.outcome is NEEDS
    assert decision.approval_requirements == (
        ApprovalRequirement("rule:bulk", ("support-leads", "ops"), 2),
        ApprovalRequirement("boundary:billing", ("finance",), 3),
    )
    assert decision.approval_expires_at == NOW + timedelta(hours=1, minutes=30)


def test_expiry_follows_now(tmp_path: Path) -> None:
    rules = [{"id": "r", "effect": "needs_approval", "when": "true"}]
    bundle = make_bundle(tmp_path, rules=rules, default_approval={"groups": ["ops"], "expires_in": "90s"})
    later = datetime(2027, 3, 1, 23, 59, 30, tzinfo=UTC)
    decision = decide(bundle, request(now=later))
    assert decision.approval_requirements == (ApprovalRequirement("rule:r", ("ops",), 1),)
    assert decision.approval_expires_at == later + timedelta(seconds=90)


@pytest.mark.parametrize("operation", ["POST", "GET"])
def test_default_effect_needs_approval_uses_default_approval(tmp_path: Path, operation: str) -> None:
    bundle = make_bundle(tmp_path, default_effect="needs_approval")
    decision = decide(bundle, request(operation=operation))
    assert decision.outcome is NEEDS
    assert [(a.groups, a.min_approvals) for a in decision.approval_requirements] == [(("ops",), 1)]
    assert decision.approval_expires_at == NOW + timedelta(hours=1)


# --- reasons and policy version ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "params", "message"),
    [
        (
            {
                "id": "m",
                "effect": "deny",
                "when": "true",
                "message": '"bulk change of " + string(int(action.params.n))',
            },
            {"n": 40},
            "bulk change of 40",
        ),
        (
            {"id": "m", "effect": "deny", "when": "true", "description": "plain words", "message": '"from cel"'},
            {},
            "from cel",
        ),
        (
            {"id": "m", "effect": "deny", "when": "true", "description": "Bulk changes need a lead"},
            {},
            "Bulk changes need a lead",
        ),
        ({"id": "m", "effect": "deny", "when": "true"}, {}, "rule m matched"),
    ],
    ids=["cel-message", "message-over-description", "description", "fallback"],
)
def test_reason_text(tmp_path: Path, rule: dict[str, Any], params: dict[str, Any], message: str) -> None:
    decision = decide(make_bundle(tmp_path, rules=[rule]), request(params=params))
    assert decision.reasons == (Reason("rule:m", DENY, message),)


def test_every_matching_rule_is_a_reason(tmp_path: Path) -> None:
    rules = [
        {"id": "a", "effect": "allow", "when": "true", "message": '"a says yes"'},
        {"id": "n", "effect": "needs_approval", "when": "true", "message": '"n wants a human"'},
        {"id": "d", "effect": "deny", "when": "true", "message": '"d says no"'},
        {"id": "x", "effect": "deny", "when": "false", "message": '"never"'},
    ]
    decision = decide(make_bundle(tmp_path, rules=rules), request())
    assert decision.outcome is DENY
    assert decision.matched_rules == ("a", "n", "d")
    # strongest first
    assert decision.reasons == (
        Reason("rule:d", DENY, "d says no"),
        Reason("rule:n", NEEDS, "n wants a human"),
        Reason("rule:a", ALLOW, "a says yes"),
    )


def test_policy_version_is_the_bundles(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, rules=[ALLOW_ALL])
    assert re.fullmatch(r"sha256:[0-9a-f]{16}", bundle.policy_version)
    for req in (request(), request("nope"), request(params={"x": object()})):
        assert decide(bundle, req).policy_version == bundle.policy_version


# --- the catalog ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tool", "operation", "resource", "check"),
    [
        ("payroll", "POST", TICKETS + "t/1", "unknown_tool"),
        ("Tickets", "POST", TICKETS + "t/1", "unknown_tool"),
        ("tickets", "DELETE", TICKETS + "t/1", "unknown_operation"),
        ("tickets", "post", TICKETS + "t/1", "unknown_operation"),
        ("tickets", "POST", "https://evil.example/api/t/1", "resource_outside_prefix"),
        ("tickets", "POST", "http://127.0.0.1:8282/api", "resource_outside_prefix"),
        ("tickets", "POST", TICKETS, "resource_outside_prefix"),  # the bare prefix is the tool's whole scope
        ("iam", "set", "iam://", "resource_outside_prefix"),
        ("tickets", "POST", "", "resource_outside_prefix"),
        ("tickets", "POST", "http://127.0.0.1:8282/apix/t/1", "resource_outside_prefix"),
        ("tickets", "POST", "iam://roles/admin", "resource_outside_prefix"),
        ("tickets", "POST", TICKETS + "t/../../admin", "resource_not_canonical"),
        ("tickets", "POST", TICKETS + "../admin", "resource_not_canonical"),
        ("tickets", "POST", TICKETS + "t/%2e%2e/admin", "resource_not_canonical"),
        ("tickets", "POST", TICKETS + "t/%2E%2E/admin", "resource_not_canonical"),
        ("tickets", "POST", TICKETS + "t/.%2e/admin", "resource_not_canonical"),
        ("tickets", "POST", TICKETS + "t/./1", "resource_not_canonical"),
        ("tickets", "POST", TICKETS + "t/..", "resource_not_canonical"),
        ("tickets", "POST", TICKETS + "t\\..\\admin", "resource_not_canonical"),
        ("tickets", "POST", TICKETS + "t/1 2", "resource_not_canonical"),
        ("tickets", "POST", TICKETS + "t/1\x00", "resource_not_canonical"),
        ("iam", "get", "iam://roles/../admin", "resource_not_canonical"),
        # What a URL parser or HTTP server reads differently from the plain string.
        ("iam", "get", "iam://roles@evil.example/admin", "resource_not_canonical"),
        ("tickets", "POST", TICKETS + "..;/admin/users", "resource_not_canonical"),
        ("tickets", "POST", TICKETS + "t;jsessionid=1/x", "resource_not_canonical"),
        ("tickets", "POST", TICKETS + "/evil.example/x", "resource_not_canonical"),
        ("tickets", "POST", TICKETS + "t//1", "resource_not_canonical"),
        ("tickets", "POST", TICKETS + "t/%252e%252e/admin", "resource_not_canonical"),
        # One spelling per resource: nothing a client drops, a router skips or a decoder rewrites.
        ("tickets", "POST", TICKETS + "t/1#x", "resource_not_canonical"),
        ("tickets", "POST", TICKETS + "t/1?x", "resource_not_canonical"),  # no query unless the tool opts in
        ("tickets", "POST", TICKETS + "t/%31", "resource_not_canonical"),  # an encoded unreserved character
        ("tickets", "POST", TICKETS + "t/%7e", "resource_not_canonical"),
        ("tickets", "POST", TICKETS + "t/%7b", "resource_not_canonical"),  # lowercase hex
        ("tickets", "POST", TICKETS + "t/%3D", "resource_not_canonical"),  # a sub-delimiter is written raw
        ("tickets", "POST", TICKETS + "t/%2f%2f1", "resource_not_canonical"),
        ("tickets", "POST", TICKETS + "t/%2F", "resource_not_canonical"),
        ("tickets", "POST", TICKETS + "t/1%3bx", "resource_not_canonical"),
        ("tickets", "POST", TICKETS + "t/1%3F", "resource_not_canonical"),
        ("tickets", "POST", TICKETS + "t/1%", "resource_not_canonical"),
        ("tickets", "POST", TICKETS + "t/1%4", "resource_not_canonical"),
        ("tickets", "POST", TICKETS + "t/1%20", "resource_not_canonical"),
        ("tickets", "POST", TICKETS + "t/1%09", "resource_not_canonical"),
        ("tickets", "POST", TICKETS + "t/{1}", "resource_not_canonical"),  # written %7B1%7D
        ("tickets", "POST", TICKETS + "t/1\u0085", "resource_not_canonical"),
        ("tickets", "POST", TICKETS + "t/1%C2%85", "resource_not_canonical"),
        ("tickets", "POST", TICKETS + "t/1\u00a0", "resource_not_canonical"),
        ("tickets", "POST", TICKETS + "t/1%C2%A0", "resource_not_canonical"),
        ("tickets", "POST", TICKETS + "t/1\u200b", "resource_not_canonical"),
        ("tickets", "POST", TICKETS + "t/1%E2%80%8B", "resource_not_canonical"),
        ("tickets", "POST", TICKETS + "t/\u202e1", "resource_not_canonical"),
        ("tickets", "POST", TICKETS + "t/%E2%80%AE1", "resource_not_canonical"),
        ("tickets", "POST", TICKETS + "t/caf\u00e9", "resource_not_canonical"),  # raw non-ASCII
        ("tickets", "POST", TICKETS + "t/cafe%CC%81", "resource_not_canonical"),  # not NFC
        ("tickets", "POST", TICKETS + "t/%C0%AE%C0%AE", "resource_not_canonical"),  # overlong UTF-8 dots
        ("tickets", "POST", TICKETS + "t/%FF", "resource_not_canonical"),
        ("iam", "get", "iam:///admin", "resource_not_canonical"),
        ("iam", "get", "iam://ro%6Ces/admin", "resource_not_canonical"),
        ("iam", "get", "IAM://roles/admin", "resource_outside_prefix"),
    ],
)
def test_catalog_violation_denies_before_any_rule(
    tmp_path: Path, tool: str, operation: str, resource: str, check: str
) -> None:
    # an allow-everything rule, an allow default and an ai_writable default: only the catalog can deny
    bundle = make_bundle(tmp_path, rules=[ALLOW_ALL], default_effect="allow")
    decision = decide(bundle, request(tool, operation, resource))
    assert decision.outcome is DENY
    assert len(decision.reasons) == 1
    assert decision.reasons[0].rule_id == f"catalog.{check}"
    assert decision.reasons[0].effect is DENY
    assert decision.reasons[0].message
    assert decision.matched_rules == ()
    assert decision.boundary == ""
    assert decision.policy_version == bundle.policy_version


def test_catalog_denial_evaluates_no_rule(tmp_path: Path) -> None:
    # an erroring rule would add its own reason if it were evaluated
    bundle = make_bundle(tmp_path, rules=[{"id": "bad", "effect": "allow", "when": "action.params.nope"}])
    decision = decide(bundle, request("tickets", "DELETE"))
    assert [r.rule_id for r in decision.reasons] == ["catalog.unknown_operation"]


@pytest.mark.parametrize("resource", [TICKETS + "t/..%2fadmin", TICKETS + "t/%2e%2e%2fadmin", TICKETS + "t/..%5cadmin"])
def test_catalog_rejects_dot_segments_before_encoded_separators(tmp_path: Path, resource: str) -> None:
    bundle = make_bundle(tmp_path, rules=[ALLOW_ALL])
    decision = decide(bundle, request(resource=resource))
    assert [r.rule_id for r in decision.reasons] == ["catalog.resource_not_canonical"]


@pytest.mark.parametrize(
    "resource",
    [
        TICKETS + "t/1",
        TICKETS + "t/1..2",
        TICKETS + "t/.hidden",
        TICKETS + "t/a.b/c",
        TICKETS + "t/a=b&c:d@e!$'()*+,",
        TICKETS + "t/caf%C3%A9",
        TICKETS + "t/%7Bid%7D",  # what cannot be written raw is encoded, in uppercase hex
    ],
)
def test_catalog_accepts_canonical_resources(tmp_path: Path, resource: str) -> None:
    bundle = make_bundle(tmp_path, rules=[ALLOW_ALL])
    assert decide(bundle, request(resource=resource)).outcome is ALLOW


QUERY_TOOLS = [dict(TOOLS[0], query=True), *TOOLS[1:]]


@pytest.mark.parametrize(
    "resource",
    [TICKETS + "t?q=..x", TICKETS + "t?q=a+b", TICKETS + "t?next=a//b", TICKETS + "t?a=%3D&b=%26%2B&c=%C3%A9"],
)
def test_a_query_needs_the_tools_opt_in_and_is_then_seen_verbatim(tmp_path: Path, resource: str) -> None:
    rules = [{"id": "all", "effect": "allow", "when": "true", "message": "action.resource"}]
    without = decide(make_bundle(tmp_path / "without", rules=rules), request(resource=resource))
    assert [r.rule_id for r in without.reasons] == ["catalog.resource_not_canonical"]
    assert "query: true" in without.reasons[0].message
    opted_in = decide(make_bundle(tmp_path / "with", rules=rules, tools=QUERY_TOOLS), request(resource=resource))
    assert opted_in.reasons == (Reason("rule:all", ALLOW, resource),)


ANY_HTTPS = [{"name": "web", "type": "http", "resource_prefix": "https://", "operations": {"GET": "read"}}]


@pytest.mark.parametrize(
    ("resource", "admitted"),
    [
        ("https://api.example/x", True),
        ("https://api.example:8443/x", True),
        ("https://10.0.0.1/x", True),
        ("https://[::1]:8443/x", True),
        ("https://xn--caf-dma.example/x", True),
        # Each below names an origin above (or nothing) another way; a rule on the host would miss it.
        ("https://API.example/x", False),
        ("https://api.example:443/x", False),  # the default port
        ("https://api.example:/x", False),
        ("https://api.example:08443/x", False),
        ("https://api.example./x", False),  # the root label
        ("https://api..example/x", False),
        ("https://api.example", False),  # no path: "/" on the wire
        ("https://api.example?x", False),
        ("https://167772161/x", False),  # 10.0.0.1 to inet_aton
        ("https://0xa.0.0.1/x", False),
        ("https://10.1/x", False),
        ("https://010.0.0.1/x", False),
        ("https://[0:0::1]/x", False),
        ("https://[::1]x/x", False),
        ("https://api%2Eexample/x", False),
        ("https://caf\u00e9.example/x", False),  # IDNA is written as xn--
        ("https://user@api.example/x", False),
        ("https:///x", False),
    ],
)
def test_an_http_origin_has_one_spelling(tmp_path: Path, resource: str, admitted: bool) -> None:
    bundle = make_bundle(tmp_path, rules=[ALLOW_ALL], tools=ANY_HTTPS)
    decision = decide(bundle, request("web", "GET", resource))
    assert (decision.outcome is ALLOW) == admitted, decision.reasons
    if not admitted:
        assert [r.rule_id for r in decision.reasons] == ["catalog.resource_not_canonical"]


def test_a_rule_on_the_path_part_covers_every_query(tmp_path: Path) -> None:
    # the pattern docs/policies.md gives for a tool with query: true
    rules = [ALLOW_ALL, {"id": "no-admin", "effect": "deny", "when": f'variables.path == "{TICKETS}admin"'}]
    bundle = make_bundle(tmp_path, rules=rules, tools=QUERY_TOOLS, variables={"path": 'action.resource.split("?")[0]'})
    for resource in (TICKETS + "admin", TICKETS + "admin?x=1", TICKETS + "admin?a=%3D&b"):
        decision = decide(bundle, request(resource=resource))
        assert (decision.outcome, "no-admin" in decision.matched_rules) == (DENY, True), resource
    assert decide(bundle, request(resource=TICKETS + "admins?x=1")).outcome is ALLOW


@pytest.mark.parametrize(
    "resource",
    [
        TICKETS + "t?",  # empty query
        TICKETS + "t?a&&b",
        TICKETS + "t?a=1;b=2",
        TICKETS + "t?a=1?b",
        TICKETS + "t?q=a%20b",  # whitespace, also encoded ("+" is a form parser's space)
        TICKETS + "t?q=%61",
        TICKETS + "t?q=%2f",
        TICKETS + "t?q=%2F",
        TICKETS + "t?q=x#y",
        TICKETS + "t?next=/../admin",
        TICKETS + "?q=1",  # the bare prefix with a query is still the whole scope
    ],
)
def test_an_opted_in_query_is_in_the_normal_form_too(tmp_path: Path, resource: str) -> None:
    decision = decide(make_bundle(tmp_path, rules=[ALLOW_ALL], tools=QUERY_TOOLS), request(resource=resource))
    assert decision.outcome is DENY
    assert decision.reasons[0].rule_id.startswith("catalog.resource_"), decision.reasons


@pytest.mark.parametrize(("operation", "kind"), [("GET", "read"), ("POST", "write"), ("PATCH", "write")])
def test_action_kind_comes_from_the_catalog(tmp_path: Path, operation: str, kind: str) -> None:
    rules = [{"id": "k", "effect": "deny", "when": "true", "message": '"kind=" + action.kind'}]
    decision = decide(make_bundle(tmp_path, rules=rules), request(operation=operation))
    assert decision.reasons == (Reason("rule:k", DENY, f"kind={kind}"),)


# --- variables -----------------------------------------------------------------------------------------------


def test_variables_in_when_and_message(tmp_path: Path) -> None:
    variables = {
        "count": "int(action.params.count)",
        "bulk": "variables.count > 10",  # a variable referencing another
        "huge": "variables.bulk && variables.count > 100",
        "label": '"bulk change of " + string(variables.count) + " tickets"',
    }
    rules = [
        {"id": "huge", "effect": "deny", "when": "variables.huge", "message": "variables.label"},
        {
            "id": "bulk",
            "effect": "needs_approval",
            "when": "variables.bulk && !variables.huge",
            "message": "variables.label",
        },
        {"id": "small", "effect": "allow", "when": "!variables.bulk"},
    ]
    bundle = make_bundle(tmp_path, rules=rules, variables=variables)
    cases = [
        (3, ALLOW, "small", None),
        (40, NEEDS, "bulk", "bulk change of 40 tickets"),
        (400, DENY, "huge", "bulk change of 400 tickets"),
    ]
    for count, outcome, rule, message in cases:
        decision = decide(bundle, request(params={"count": count}))
        assert decision.outcome is outcome, count
        assert decision.matched_rules == (rule,)
        if message is not None:
            assert decision.reasons[0] == Reason(f"rule:{rule}", outcome, message)


def test_variable_names_inside_string_literals_are_left_alone(tmp_path: Path) -> None:
    variables = {"bulk": "true"}
    rules = [
        {
            "id": "literal",
            "effect": "deny",
            "when": "variables.bulk && action.params.note == \"variables.bulk\" && action.params.q == 'variables.nope'",
            "message": '"see variables.bulk and variables.nope: " + action.params.note',
        }
    ]
    bundle = make_bundle(tmp_path, rules=rules, variables=variables)
    decision = decide(bundle, request(params={"note": "variables.bulk", "q": "variables.nope"}))
    assert decision.reasons == (Reason("rule:literal", DENY, "see variables.bulk and variables.nope: variables.bulk"),)


def test_variables_are_evaluated_per_request(tmp_path: Path) -> None:
    variables = {"who": "agent.id"}
    rules = [{"id": "r", "effect": "deny", "when": "true", "message": '"hello " + variables.who'}]
    bundle = make_bundle(tmp_path, rules=rules, variables=variables)
    assert decide(bundle, request(agent_id="a1")).reasons[0].message == "hello a1"
    assert decide(bundle, request(agent_id="b2")).reasons[0].message == "hello b2"


# --- CEL: extensions and inputs --------------------------------------------------------------------------------

CEL_TRUE = [
    # strings
    ('action.resource.split("/")[2] == "127.0.0.1:8282"', {}),
    ('"ABC".lowerAscii() == "abc"', {}),
    ('"abc".upperAscii() == "ABC"', {}),
    ('"%s-%d".format(["a", 1]) == "a-1"', {}),
    ('"a b".replace(" ", "-") == "a-b"', {}),
    ('["a", "b"].join(",") == "a,b"', {}),
    ('"  x ".trim() == "x"', {}),
    ('"hello".indexOf("l") == 2', {}),
    # math
    ("math.greatest(1, 5, 3) == 5", {}),
    ("math.least([3.0, 1.0]) == 1.0", {}),
    # lists
    ("lists.range(3) == [0, 1, 2]", {}),
    ("[3, 1, 2].sort() == [1, 2, 3]", {}),
    ("[1, 2, 2].distinct() == [1, 2]", {}),
    # sets
    ("sets.contains([1, 2, 3], [2])", {}),
    ("sets.intersects([1, 2], [2, 9])", {}),
    ("!sets.equivalent([1], [2])", {}),
    # encoders
    ('base64.encode(b"hi") == "aGk="', {}),
    ('base64.decode("aGk=") == b"hi"', {}),
    # optional
    ("optional.of(1).orValue(2) == 1", {}),
    ('action.params.?nope.orValue("d") == "d"', {}),
    ("action.params.?n.hasValue()", {"n": 1}),
    # bindings
    ("cel.bind(x, 2, x * x == 4)", {}),
    # core: regex, macros, params as doubles
    ('action.resource.matches("^http://127\\\\.0\\\\.0\\\\.1:8282/api/t/[0-9]+$")', {}),
    ('agent.roles.exists(r, r == "support")', {}),
    ('agent.roles.all(r, r.startsWith("sup"))', {}),
    ('!agent.roles.exists(r, r == "admin")', {}),
    ("[1, 2, 3].exists_one(x, x > 2)", {}),
    ("[1, 2, 3].filter(x, x > 1).size() == 2", {}),
    ("[1, 2].map(x, x * 2) == [2, 4]", {}),
    # params is a JSON object: numbers are doubles, yet compare with int literals
    ("action.params.n == 2.0 && int(action.params.n) == 2", {"n": 2}),
    ("action.params.n == 40 && action.params.n > 10 && action.params.n in [40]", {"n": 40}),
    ("action.params.b == true && action.params.z == null", {"b": True, "z": None}),
    ('action.params.s.size() == 3 && action.params.nested.k == "v"', {"s": "abc", "nested": {"k": "v"}}),
    ("action.params.items.size() == 2 && action.params.items[1].k == 'v'", {"items": [1, {"k": "v"}]}),
    ('agent.id == "a1" && agent.owner == "alice"', {}),
    ('action.tool == "tickets" && action.operation == "POST"', {}),
    # context.now is a timestamp; context.environment comes from the input
    ("context.now.getHours() == 10", {}),
    ("context.now.getDayOfWeek() == 1", {}),
    ("context.now.getFullYear() == 2026", {}),
    ('context.now == timestamp("2026-01-05T10:00:00Z")', {}),
    ('context.now - duration("1h") > timestamp("2026-01-05T08:59:59Z")', {}),
    ('context.environment == "dev"', {}),
    # usage is an empty map unless given
    ("!has(usage.x)", {}),
    ("size(usage) == 0", {}),
]


@pytest.mark.parametrize(("expression", "params"), CEL_TRUE, ids=[e for e, _ in CEL_TRUE])
def test_cel_expression_is_available_and_true(tmp_path: Path, expression: str, params: dict[str, Any]) -> None:
    # the expression must compile (else the bundle does not load) and be true (else the default denies)
    rules = [{"id": "probe", "effect": "allow", "when": expression}]
    decision = decide(make_bundle(tmp_path, rules=rules), request(params=params))
    assert decision.outcome is ALLOW, decision.reasons
    assert decision.matched_rules == ("probe",)


@pytest.mark.parametrize(
    ("expression", "kwargs"),
    [
        ('context.environment == "prod"', {"environment": "prod"}),
        ("context.now.getHours() == 23", {"now": datetime(2026, 1, 5, 23, 30, tzinfo=UTC)}),
        # an aware non-UTC instant is the same instant: 23:30+02:00 is 21:30 UTC
        ("context.now.getHours() == 21", {"now": datetime(2026, 1, 5, 23, 30, tzinfo=timezone(timedelta(hours=2)))}),
        ("has(usage.x) && usage.x == 3", {"usage": {"x": 3}}),
        ('agent.roles == ["a", "b"]', {"roles": ("a", "b")}),
        ('action.labels["team"] == "core"', {"labels": {"team": "core"}}),
        ("action.estimated_cost_usd > 10.0", {"estimated_cost_usd": 12.5}),
    ],
)
def test_cel_sees_the_request(tmp_path: Path, expression: str, kwargs: dict[str, Any]) -> None:
    rules = [{"id": "probe", "effect": "allow", "when": expression}]
    bundle = make_bundle(tmp_path, rules=rules)
    assert decide(bundle, request(**kwargs)).outcome is ALLOW
    # and the same expression is false for the default request
    assert decide(bundle, request()).outcome is DENY


# --- thread safety ------------------------------------------------------------------------------------------


def test_concurrent_decisions_match_sequential(tmp_path: Path) -> None:
    variables = {"count": "has(action.params.count) ? int(action.params.count) : 0"}
    rules = [
        {
            "id": "bulk",
            "effect": "needs_approval",
            "when": "variables.count > 10",
            "message": '"n=" + string(variables.count)',
        },
        {"id": "huge", "effect": "deny", "when": "variables.count > 100"},
        {"id": "read", "effect": "allow", "when": 'action.kind == "read"'},
        {"id": "small", "effect": "allow", "when": "variables.count <= 10 && variables.count > 0"},
        {"id": "zero", "effect": "allow", "when": "1 / int(action.params.count) >= 0", "tools": ["tickets"]},
        {"id": "iam", "effect": "deny", "when": 'action.resource.matches("admin")', "tools": ["iam"]},
    ]
    boundaries = [
        {"name": "locked", "match": 'action.resource.contains("/locked/")', "tier": "human_only"},
        {"name": "gated", "match": 'action.resource.contains("/gated/")', "tier": "approval_required"},
    ]
    bundle = make_bundle(tmp_path, rules=rules, boundaries=boundaries, variables=variables)
    paths = ["t/1", "locked/1", "gated/1"]
    inputs = []
    for i in range(300):
        if i % 7 == 0:
            inputs.append(request("iam", "set", f"iam://{'admin' if i % 2 else 'user'}/{i}", params={"count": i % 5}))
        else:
            op = "GET" if i % 3 == 0 else "POST"
            inputs.append(request("tickets", op, TICKETS + paths[i % 3], params={"count": i % 150}, agent_id=f"a{i}"))

    sequential = [decide(bundle, r).to_dict() for r in inputs]
    assert {d["outcome"] for d in sequential} == {"allow", "deny", "needs_approval"}

    def run(item: tuple[int, Any]) -> tuple[int, dict[str, Any]]:
        index, req = item
        return index, decide(bundle, req).to_dict()

    work = list(enumerate(inputs)) * 4
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(run, work))
    assert len(results) == len(work)
    for index, got in results:
        assert got == sequential[index], index


# --- Decision serialisation round trip (stored with the proposal) ------------------------------------------


def test_decision_round_trips_through_dict(semantic_bundles: dict[str, PolicyBundle]) -> None:
    samples: list[Callable[[], Decision]] = [
        lambda: decide(semantic_bundles["deny-default"], request(resource=TICKETS + "gated/1", params={"approve": 1})),
        lambda: decide(semantic_bundles["deny-default"], request(resource=TICKETS + "locked/1")),
        lambda: decide(semantic_bundles["deny-default"], request("nope")),
    ]
    for sample in samples:
        decision = sample()
        assert Decision.from_dict(decision.to_dict()) == decision
