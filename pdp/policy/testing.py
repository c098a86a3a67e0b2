"""Run a bundle's PolicyTest cases: no server, no database, deterministic."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from pdp.policy.bundle import PolicyBundle, PolicyTestCase
from pdp.policy.decision import Decision, Outcome
from pdp.policy.documents import TestInput
from pdp.policy.engine import ActionInput, AgentIdentity, DecisionInput, decide

# A fixed instant, so a case that does not set context.now still decides the same way every run.
DEFAULT_TEST_NOW = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class TestResult:
    case: PolicyTestCase
    decision: Decision
    failures: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failures


def _now(value: datetime | str | None) -> datetime:
    if value is None:
        return DEFAULT_TEST_NOW
    parsed = value if isinstance(value, datetime) else datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def decision_input(spec: TestInput, default_environment: str = "dev") -> DecisionInput:
    """The engine input a test case (or `pdp policy eval` file) describes."""
    agent, action = spec.agent, spec.action
    return DecisionInput(
        agent=AgentIdentity(agent.id, agent.owner, tuple(agent.roles), dict(agent.labels)),
        action=ActionInput(
            tool=action.tool,
            operation=action.operation,
            resource=action.resource,
            params=dict(action.params),
            estimated_cost_usd=float(action.estimated_cost_usd),
            labels=dict(action.labels),
        ),
        now=_now(spec.context.now),
        environment=spec.context.environment or default_environment,
        usage=dict(spec.usage),
    )


def decisive_rules(decision: Decision) -> list[str]:
    """The rules that decided: those (matched or erroring) whose effect is the strongest among rules."""
    effects = [(r.rule_id.removeprefix("rule:"), r.effect) for r in decision.reasons if r.rule_id.startswith("rule:")]
    if not effects:
        return []
    top = max(effect.severity for _, effect in effects)
    return sorted({rule for rule, effect in effects if effect.severity == top})


def run_case(bundle: PolicyBundle, case: PolicyTestCase) -> TestResult:
    expect = case.spec.expect
    decision = decide(bundle, decision_input(case.spec.input))
    failures: list[str] = []
    if decision.outcome is not Outcome(expect.outcome):
        failures.append(f"outcome: expected {expect.outcome}, got {decision.outcome.value}")
    if expect.rules is not None and sorted(set(expect.rules)) != decisive_rules(decision):
        failures.append(f"rules: expected {sorted(set(expect.rules))}, got {decisive_rules(decision)}")
    if expect.boundary is not None and expect.boundary != decision.boundary:
        failures.append(f"boundary: expected {expect.boundary!r}, got {decision.boundary!r}")
    if expect.tier is not None and expect.tier != decision.tier:
        failures.append(f"tier: expected {expect.tier}, got {decision.tier}")
    return TestResult(case, decision, tuple(failures))


def run_tests(bundle: PolicyBundle) -> list[TestResult]:
    return [run_case(bundle, case) for case in bundle.tests]


def failing_tests(bundle: PolicyBundle) -> list[str]:
    """One line per failed expectation, ``file:line: test 'name': …``, in bundle order (empty: all pass)."""
    return [
        f"{result.case.location}: test {result.case.spec.name!r}: {failure}"
        for result in run_tests(bundle)
        for failure in result.failures
    ]
