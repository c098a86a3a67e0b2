"""Applying a bundle's limits to one decision (DESIGN §4 point 4, §8).

Limits run after rules, boundaries and the circuit breaker, inside the transaction that records the
proposal, after it took the audit chain's lock. Every replica's propose transaction takes that lock
(PostgreSQL advisory lock; SQLite's single writer), so the counters read here and written back are
exact across replicas: two `pdp serve` processes enforce one limit, never the sum of two.

In order:

1. **Quarantine.** An agent quarantined by a retry storm is denied outright until it ends or a human
   releases it (``retry_after_seconds`` = time left). Nothing else is counted for it.
2. **Rate** (`rate: N/window`, fixed windows aligned to the epoch). A proposal that finds N already
   admitted in its window is denied with ``retry_after_seconds`` = the window's remaining time; any
   other is admitted and counted, whatever the rules said.
3. **Budget** (`budget_usd: N/day`, UTC days). Only an allowed proposal is checked: if the day's spend
   plus its estimated cost would pass N, the limit's ``on_exceed`` applies (deny until midnight UTC, or
   needs-approval). Allowed proposals are charged now; approved ones when their quorum is reached. A
   denied proposal costs nothing.
4. **Retry storm** (`retry_storm: {repeats: N, window, quarantine}`). When a denied proposal makes N
   identical denied proposals (same agent, same action digest) within the window, the agent is
   quarantined. So a storming agent gets exactly N proposals decided before the quarantine stops it.

Anything that cannot be computed (a scope key's CEL error) denies, with the error as the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection

from pdp.audit.chain import Event
from pdp.canonical import timestamp
from pdp.governance import store
from pdp.governance.store import day_start
from pdp.policy.bundle import Limit, PolicyBundle
from pdp.policy.cel import CelError
from pdp.policy.decision import ApprovalRequirement, Decision, Outcome, Reason
from pdp.policy.engine import DecisionInput, evaluate_key

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
QUARANTINE = "quarantine"


@dataclass(frozen=True, slots=True)
class Hit:
    """A limit that changed (or, for a quarantine, caused) the outcome; for metrics and logs."""

    limit_id: str
    effect: str  # deny | needs_approval | quarantine


@dataclass(slots=True)
class Governed:
    """The decision after limits, and what the proposal's transaction must record with it."""

    decision: Decision
    limited_by: str | None = None
    charged_usd: float = 0.0
    hits: list[Hit] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)


def scope_key(bundle: PolicyBundle, limit: Limit, request: DecisionInput) -> str:
    agent, tool = request.agent.id, request.action.tool
    if limit.scope == "agent":
        return f"agent:{agent}"
    if limit.scope == "tool":
        return f"tool:{tool}"
    if limit.scope == "agent+tool":
        return f"agent+tool:{agent}|{tool}"
    assert limit.key is not None
    return "key:" + evaluate_key(bundle, limit.key, request)


def window_start(now: datetime, window: timedelta) -> datetime:
    seconds = window.total_seconds()
    return EPOCH + timedelta(seconds=math.floor((now - EPOCH).total_seconds() / seconds) * seconds)


def _seconds(delta: timedelta) -> int:
    return max(1, math.ceil(delta.total_seconds()))


def _deny(decision: Decision, reason: Reason, retry_after: int) -> Decision:
    return replace(
        decision,
        outcome=Outcome.DENY,
        reasons=(reason, *decision.reasons),
        retry_after_seconds=max(retry_after, decision.retry_after_seconds),
        approval_requirements=(),
        approval_expires_at=None,
    )


def apply(
    conn: Connection,
    bundle: PolicyBundle,
    request: DecisionInput,
    decision: Decision,
    action_digest: str,
    proposal_id: str,
) -> Governed:
    """The decision after the bundle's limits; counters, quarantines and their events are written on ``conn``."""
    now = request.now
    agent = request.agent.id
    governed = Governed(decision)

    state = store.quarantine_state(conn, agent, now)
    if state.active is not None:
        until, limit_id = state.active
        reason = Reason(
            f"limit:{limit_id}",
            Outcome.DENY,
            f"agent {agent} is quarantined after a retry storm until {timestamp(until)}; "
            "a human can lift it (`pdp agents release`)",
        )
        governed.decision = _deny(decision, reason, _seconds(until - now))
        governed.limited_by = QUARANTINE
        governed.hits.append(Hit(limit_id, "quarantine"))
        return governed

    limits = [limit for limit in bundle.limits if limit.applies_to(request.action.tool)]
    if not limits:
        governed.charged_usd = _cost(request) if decision.outcome is Outcome.ALLOW else 0.0
        return governed
    keys: dict[str, str] = {}
    for limit in limits:
        try:
            keys[limit.id] = scope_key(bundle, limit, request)
        except CelError as exc:  # fail closed: a limit that cannot be applied denies
            reason = Reason(f"limit:{limit.id}", Outcome.DENY, f"scope key failed: {exc}")
            governed.decision = _deny(governed.decision, reason, 0)
            governed.limited_by = limit.id
            governed.hits.append(Hit(limit.id, "deny"))

    for limit in limits:
        if limit.kind != "rate" or limit.id not in keys:
            continue
        start = window_start(now, limit.window)
        if store.add(conn, limit.id, keys[limit.id], start, count=1)[0] > limit.count:
            store.add(conn, limit.id, keys[limit.id], start, count=-1)  # over: this one is not admitted
            retry = _seconds(start + limit.window - now)
            reason = Reason(
                f"limit:{limit.id}",
                Outcome.DENY,
                f"rate limit {limit.count} per {_human(limit.window)} reached for {keys[limit.id]}; "
                f"retry after {retry}s",
            )
            governed.decision = _deny(governed.decision, reason, retry)
            governed.limited_by = governed.limited_by or limit.id
            governed.hits.append(Hit(limit.id, "deny"))

    cost = _cost(request)
    budgets = [limit for limit in limits if limit.kind == "budget" and limit.id in keys]
    charged: list[Limit] = []
    if governed.decision.outcome is Outcome.ALLOW:
        for limit in budgets:
            # Charge optimistically (one statement); take it back if it went over.
            total = store.add(conn, limit.id, keys[limit.id], day_start(now), amount=cost)[1]
            if total <= limit.budget_usd:
                charged.append(limit)
                continue
            spent = total - cost
            for taken in [*charged, limit]:
                store.add(conn, taken.id, keys[taken.id], day_start(now), amount=-cost)
            message = (
                f"budget {limit.budget_usd:g} USD/day for {keys[limit.id]}: {spent:g} spent today, "
                f"this would add {cost:g}"
            )
            if limit.on_exceed is Outcome.NEEDS_APPROVAL:
                governed.decision = _escalate(bundle, governed.decision, limit, message, now)
                governed.hits.append(Hit(limit.id, "needs_approval"))
            else:
                tomorrow = day_start(now) + timedelta(days=1)
                reason = Reason(f"limit:{limit.id}", Outcome.DENY, message)
                governed.decision = _deny(governed.decision, reason, _seconds(tomorrow - now))
                governed.hits.append(Hit(limit.id, "deny"))
            governed.limited_by = governed.limited_by or limit.id
            break
    if governed.decision.outcome is Outcome.ALLOW:
        governed.charged_usd = cost

    if governed.decision.outcome is Outcome.DENY:
        for limit in limits:
            if limit.kind == "retry_storm":
                _retry_storm(conn, limit, request, action_digest, proposal_id, governed, state.released_at)
    return governed


def charge_approved(conn: Connection, bundle: PolicyBundle, request: DecisionInput) -> float:
    """At quorum: an approved proposal's cost counts against today's budgets; returns the amount charged."""
    cost = _cost(request)
    for limit in bundle.limits:
        if limit.kind == "budget" and limit.applies_to(request.action.tool):
            try:
                key = scope_key(bundle, limit, request)
            except CelError:
                continue  # it could not be computed when proposed either; nothing to charge against
            store.add(conn, limit.id, key, day_start(request.now), amount=cost)
    return cost


def _cost(request: DecisionInput) -> float:
    return float(request.action.estimated_cost_usd)


def _escalate(bundle: PolicyBundle, decision: Decision, limit: Limit, message: str, now: datetime) -> Decision:
    approval = limit.approval or bundle.default_approval
    if approval is None:  # nobody could approve it: fail closed
        reason = Reason(f"limit:{limit.id}", Outcome.DENY, message + "; needs approval but no approver is named")
        return _deny(decision, reason, 0)
    requirement = ApprovalRequirement(f"limit:{limit.id}", approval.groups, approval.min_approvals)
    expires = now + approval.expires_in
    if decision.approval_expires_at is not None:
        expires = min(expires, decision.approval_expires_at)
    return replace(
        decision,
        outcome=Outcome.NEEDS_APPROVAL,
        reasons=(Reason(f"limit:{limit.id}", Outcome.NEEDS_APPROVAL, message), *decision.reasons),
        approval_requirements=(*decision.approval_requirements, requirement),
        approval_expires_at=expires,
    )


def _retry_storm(
    conn: Connection,
    limit: Limit,
    request: DecisionInput,
    digest: str,
    proposal_id: str,
    governed: Governed,
    released: datetime | None,
) -> None:
    now, agent = request.now, request.agent.id
    since = now - limit.window
    if released is not None and released > since:
        since = released  # a human's release starts the count again
    repeats = store.identical_denials(conn, agent, digest, since) + 1  # this proposal is not inserted yet
    if repeats < limit.repeats:
        return
    until = now + limit.quarantine
    reason = f"{repeats} identical denied proposals within {_human(limit.window)}"
    store.quarantine(conn, agent, limit.id, until, reason, now)
    governed.hits.append(Hit(limit.id, "quarantine"))
    governed.events.append(
        Event(
            type="agent.quarantined",
            actor="pdp",
            occurred_at=now,
            proposal_id=proposal_id,
            agent_id=agent,
            policy_version=governed.decision.policy_version,
            data={"limit": limit.id, "until": timestamp(until), "reason": reason, "action_digest": digest},
        )
    )


def _human(window: timedelta) -> str:
    seconds = int(window.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0 and seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{window.total_seconds():g}s"
