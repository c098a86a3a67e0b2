"""The decision function: data in, a decision with its reasons out. No I/O, no clock, never raises."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pdp.policy.bundle import Approval, Boundary, PolicyBundle, Rule
from pdp.policy.catalog import CatalogViolation, Kind, resolve
from pdp.policy.cel import CelError, CelProgram, Variables
from pdp.policy.decision import ApprovalRequirement, Decision, Outcome, Reason, Tier
from pdp.policy.v1 import cel_input_pb2


@dataclass(frozen=True, slots=True)
class AgentIdentity:
    """Who is asking: always from the agent's token, never from the request."""

    id: str
    owner: str = ""
    roles: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ActionInput:
    tool: str
    operation: str
    resource: str
    params: Mapping[str, Any] = field(default_factory=dict)
    estimated_cost_usd: float = 0.0
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DecisionInput:
    """Everything a decision depends on; stored with the proposal so it can be replayed exactly."""

    agent: AgentIdentity
    action: ActionInput
    now: datetime
    environment: str = "dev"
    usage: Mapping[str, Any] = field(default_factory=dict)


def decide(bundle: PolicyBundle, request: DecisionInput) -> Decision:
    """Decide one action proposal against a bundle. Any CEL error denies (fail closed)."""
    try:
        return _decide(bundle, request)
    except Exception as exc:  # a bug here must still produce an answer, and that answer is no
        return Decision(
            outcome=Outcome.DENY,
            reasons=(Reason("engine.internal_error", Outcome.DENY, f"internal error: {type(exc).__name__}"),),
            policy_version=bundle.policy_version,
        )


def _cel_variables(request: DecisionInput, kind: Kind) -> Variables:
    agent, action = request.agent, request.action
    cel_action = cel_input_pb2.Action(
        tool=action.tool,
        operation=action.operation,
        kind=kind.value,
        resource=action.resource,
        estimated_cost_usd=action.estimated_cost_usd,
        labels=action.labels,
    )
    if action.params:
        cel_action.params.update(action.params)
    context = cel_input_pb2.Context(environment=request.environment)
    context.now.FromDatetime(request.now)
    return Variables(
        agent=cel_input_pb2.Agent(id=agent.id, owner=agent.owner, roles=agent.roles, labels=agent.labels),
        action=cel_action,
        context=context,
        usage=dict(request.usage),
    )


def _catalog_denial(bundle: PolicyBundle, violation: CatalogViolation) -> Decision:
    return Decision(
        outcome=Outcome.DENY,
        reasons=(Reason(f"catalog.{violation.check}", Outcome.DENY, violation.message),),
        policy_version=bundle.policy_version,
    )


def _combine(effects: list[Outcome], default: Outcome) -> Outcome:
    """Rule effects combine by precedence; the table, one row a case."""
    if Outcome.DENY in effects:  # any deny (including any CEL error) wins
        return Outcome.DENY
    if Outcome.NEEDS_APPROVAL in effects:  # else any needs_approval
        return Outcome.NEEDS_APPROVAL
    if Outcome.ALLOW in effects:  # else any allow
        return Outcome.ALLOW
    return default  # no rule matched: the bundle's default_effect


def _cap(outcome: Outcome, tier: Tier) -> Outcome:
    """The boundary tier caps what the rules decided."""
    if tier is Tier.HUMAN_ONLY:  # no agent writes here, and no approval can change that
        return Outcome.DENY
    if tier is Tier.APPROVAL_REQUIRED and outcome is Outcome.ALLOW:  # at best needs approval
        return Outcome.NEEDS_APPROVAL
    return outcome  # ai_writable: the rules decide


def _decide(bundle: PolicyBundle, request: DecisionInput) -> Decision:
    action = request.action
    kind = resolve(bundle.tools, action.tool, action.operation, action.resource)
    if isinstance(kind, CatalogViolation):
        return _catalog_denial(bundle, kind)

    env = bundle.environment
    activation = env.activation(_cel_variables(request, kind))
    reasons: list[Reason] = []
    errors: list[Reason] = []

    matched_boundaries: list[Boundary] = []
    for boundary in bundle.boundaries:
        if kind is Kind.READ and not boundary.applies_to_all:
            continue
        try:
            if boundary.match.evaluate(activation):
                matched_boundaries.append(boundary)
        except CelError as exc:
            errors.append(Reason(f"boundary:{boundary.name}", Outcome.DENY, f"match failed: {exc}"))

    effects: list[Outcome] = []
    matched_rules: list[Rule] = []
    for rule in bundle.rules_for(action.tool):
        try:
            if not rule.when.evaluate(activation):
                continue
            text = str(rule.message.evaluate(activation)) if rule.message else rule.description
        except CelError as exc:
            errors.append(Reason(f"rule:{rule.id}", Outcome.DENY, f"evaluation failed: {exc}"))
            continue
        matched_rules.append(rule)
        effects.append(rule.effect)
        reasons.append(Reason(f"rule:{rule.id}", rule.effect, text or f"rule {rule.id} matched"))

    if errors:
        effects.append(Outcome.DENY)
    outcome = _combine(effects, bundle.default_effect)
    if not effects:
        reasons.append(
            Reason("bundle.default_effect", outcome, f"no rule matched; the bundle's default is {outcome.value}")
        )

    # The most restrictive matching boundary wins (ties: the first declared). A write no boundary
    # matches gets the bundle's default tier; a read is capped only by boundaries that apply to all.
    winner = max(matched_boundaries, key=lambda b: b.tier.restriction, default=None)
    if winner is not None:
        tier, boundary_name = winner.tier, winner.name
    elif kind is Kind.WRITE:
        tier, boundary_name = bundle.default_tier, ""
    else:
        tier, boundary_name = Tier.AI_WRITABLE, ""

    capped = _cap(outcome, tier)
    if tier is not Tier.AI_WRITABLE:
        source = f"boundary:{boundary_name}" if boundary_name else "bundle.default_tier"
        what = f"boundary {boundary_name!r}" if boundary_name else "no boundary matched this write; the default tier"
        if tier is Tier.HUMAN_ONLY:
            reasons.append(Reason(source, Outcome.DENY, f"{what} is human_only: no agent may do this"))
        else:
            reasons.append(Reason(source, Outcome.NEEDS_APPROVAL, f"{what} requires human approval"))
    outcome = capped

    requirements: tuple[ApprovalRequirement, ...] = ()
    expires_at = None
    if outcome is Outcome.NEEDS_APPROVAL:
        requirements, expires_at = _approvals(
            bundle, request.now, matched_rules, matched_boundaries, tier, from_default=not effects
        )
        if not requirements:  # nobody could ever approve it: say no now rather than let it hang
            outcome = Outcome.DENY
            errors.append(Reason("bundle.default_approval", Outcome.DENY, "needs approval but no approver is named"))

    all_reasons = sorted(set(errors), key=_reason_order) + sorted(set(reasons), key=_reason_order)
    return Decision(
        outcome=outcome,
        reasons=tuple(all_reasons),
        policy_version=bundle.policy_version,
        boundary=boundary_name,
        tier=tier.value,
        approval_requirements=requirements,
        approval_expires_at=expires_at,
        matched_rules=tuple(r.id for r in matched_rules),
    )


def _reason_order(reason: Reason) -> tuple[int, str, str]:
    return (-reason.effect.severity, reason.rule_id, reason.message)


def _approvals(
    bundle: PolicyBundle,
    now: datetime,
    rules: list[Rule],
    boundaries: list[Boundary],
    tier: Tier,
    *,
    from_default: bool,
) -> tuple[tuple[ApprovalRequirement, ...], datetime | None]:
    """Every needs-approval source must be satisfied; the earliest expiry applies."""
    sources: list[tuple[str, Approval | None]] = [
        (f"rule:{r.id}", r.approval) for r in rules if r.effect is Outcome.NEEDS_APPROVAL
    ]
    if from_default and bundle.default_effect is Outcome.NEEDS_APPROVAL:
        sources.append(("bundle.default_effect", None))
    if tier is Tier.APPROVAL_REQUIRED:
        capping = [b for b in boundaries if b.tier is Tier.APPROVAL_REQUIRED]
        sources += [(f"boundary:{b.name}", b.approval) for b in capping]
        if not capping:
            sources.append(("bundle.default_tier", None))
    requirements: list[ApprovalRequirement] = []
    expires: list[datetime] = []
    for source, approval in sources:
        chosen = approval or bundle.default_approval
        if chosen is None:  # the loader refuses such bundles; stay closed if one slips through
            continue
        requirements.append(ApprovalRequirement(source, chosen.groups, chosen.min_approvals))
        expires.append(now + chosen.expires_in)
    return tuple(requirements), min(expires, default=None)


def evaluate_key(bundle: PolicyBundle, program: CelProgram, request: DecisionInput) -> str:
    """A string-valued expression (a limit's scope key) over the request's CEL variables; CelError on failure."""
    action = request.action
    kind = resolve(bundle.tools, action.tool, action.operation, action.resource)
    resolved = kind if isinstance(kind, Kind) else Kind.WRITE  # a catalog denial: the key still has an input
    value = program.evaluate(bundle.environment.activation(_cel_variables(request, resolved)))
    return str(value)
