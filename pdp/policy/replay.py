"""Replay recorded decisions against a candidate bundle: what a policy change would do to real traffic.

Every ``proposal.decided`` audit event carries the action, the decision and everything else the engine saw
(the agent's identity snapshot, ``context.now``, the environment, usage), so the engine can decide it again
with another bundle, exactly. :func:`replay` does that for a stream of event bodies and counts the outcomes
old -> new; :func:`decided_events` is the one place that reads them from the database.

A recorded decision that runtime state changed after the engine (an open circuit breaker, a governance
limit) cannot be reproduced by a bundle alone: it is counted apart and never reported as a change.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select

from pdp.canonical import timestamp
from pdp.policy.bundle import PolicyBundle
from pdp.policy.decision import Decision, Outcome, Reason
from pdp.policy.engine import DecisionInput, decide
from pdp.proposals.recorded import decision_input
from pdp.store.models import audit_events

DECIDED = "proposal.decided"
# Reasons that runtime state added after the engine decided: a bundle cannot reproduce them.
CIRCUIT_REASON = "circuit.open"
LIMIT_REASON_PREFIX = "limit:"

OUTCOMES = (Outcome.ALLOW, Outcome.NEEDS_APPROVAL, Outcome.DENY)


class UnreadableEvent(ValueError):
    """A ``proposal.decided`` body without what a replay needs."""


@dataclass(frozen=True, slots=True)
class RecordedDecision:
    """One decided proposal as the audit log holds it."""

    proposal_id: str
    occurred_at: datetime
    request: DecisionInput
    decision: Decision

    @property
    def decided_by_runtime_state(self) -> bool:
        return any(
            r.rule_id == CIRCUIT_REASON or r.rule_id.startswith(LIMIT_REASON_PREFIX) for r in self.decision.reasons
        )


def _parse_time(value: Any) -> datetime:
    if not isinstance(value, str):
        raise UnreadableEvent(f"expected a timestamp, got {value!r}")
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise UnreadableEvent(f"timestamp without a zone: {value!r}")
    return parsed


def recorded_decision(body: Mapping[str, Any]) -> RecordedDecision:
    """The replayable parts of a ``proposal.decided`` event body; :class:`UnreadableEvent` when missing."""
    try:
        data = body["data"]
        action, recorded, seen = data["action"], data["decision"], data["decision_input"]
        _parse_time(seen["context"]["now"])  # recorded times carry their zone
        request = decision_input(action, seen)
        return RecordedDecision(
            proposal_id=str(body["proposal_id"]),
            occurred_at=_parse_time(body["occurred_at"]),
            request=request,
            decision=Decision.from_dict(recorded),
        )
    except UnreadableEvent:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UnreadableEvent(f"{type(exc).__name__}: {exc}") from exc


def content_digest(policy_version: str) -> str:
    """The content part of a policy version (``sha256:…``), without the ``+git.…`` commit."""
    return policy_version.split("+", 1)[0]


@dataclass(frozen=True, slots=True)
class Change:
    """A proposal the candidate would decide differently."""

    proposal_id: str
    occurred_at: datetime
    agent_id: str
    tool: str
    operation: str
    resource: str
    old: Outcome
    new: Outcome
    reasons: tuple[Reason, ...]  # the candidate's decisive reasons: those whose effect is its outcome
    old_policy_version: str

    @property
    def is_flip(self) -> bool:
        """allow -> deny or deny -> allow; changes to or from needs_approval are not flips."""
        return {self.old, self.new} == {Outcome.ALLOW, Outcome.DENY}

    def to_dict(self) -> dict[str, Any]:
        return {
            "proposal_id": self.proposal_id,
            "occurred_at": timestamp(self.occurred_at),
            "agent_id": self.agent_id,
            "tool": self.tool,
            "operation": self.operation,
            "resource": self.resource,
            "recorded": self.old.value,
            "candidate": self.new.value,
            "flip": self.is_flip,
            "reasons": [r.to_dict() for r in self.reasons],
            "recorded_policy_version": self.old_policy_version,
        }


@dataclass(frozen=True, slots=True)
class ReplayReport:
    """What replaying a history with a candidate bundle found."""

    candidate_version: str
    compared: int  # proposals re-decided and compared
    runtime_decided: int  # decided by runtime state (breaker/limit): not compared
    without_usage: int  # recorded without usage counters, but the candidate reads usage: not compared
    unreadable: int  # proposal.decided events without what a replay needs: skipped
    same_content: int  # compared proposals decided by a bundle with the candidate's very content
    counts: Mapping[tuple[Outcome, Outcome], int]  # (recorded, candidate) -> proposals, all nine cells
    changes: tuple[Change, ...]  # oldest first
    recorded_versions: Mapping[str, int] = field(default_factory=dict)  # policy_version -> compared proposals
    first_at: datetime | None = None  # the replayed proposals' time range (compared or not)
    last_at: datetime | None = None

    @property
    def replayed(self) -> int:
        return self.compared + self.runtime_decided + self.without_usage + self.unreadable

    @property
    def flips(self) -> tuple[Change, ...]:
        return tuple(c for c in self.changes if c.is_flip)

    @property
    def identical(self) -> bool:
        """Every compared proposal was decided by a bundle with the candidate's content."""
        return self.compared > 0 and self.same_content == self.compared

    def failed(self, *, on_flip: bool, on_any_change: bool) -> bool:
        return bool((on_any_change and self.changes) or (on_flip and self.flips))

    def to_dict(self, limit: int | None = None) -> dict[str, Any]:
        """JSON-ready; ``limit`` caps the listed changes (``changes_not_listed`` says how many were left off)."""
        listed = self.changes if limit is None else self.changes[:limit]
        return {
            "candidate_policy_version": self.candidate_version,
            "replayed": self.replayed,
            "compared": self.compared,
            "decided_by_runtime_state": self.runtime_decided,
            "recorded_without_usage": self.without_usage,
            "unreadable": self.unreadable,
            "same_content_as_candidate": self.same_content,
            "identical": self.identical,
            "from": timestamp(self.first_at) if self.first_at else None,
            "to": timestamp(self.last_at) if self.last_at else None,
            "recorded_policy_versions": dict(sorted(self.recorded_versions.items())),
            "counts": {old.value: {new.value: self.counts[old, new] for new in OUTCOMES} for old in OUTCOMES},
            "changed": len(self.changes),
            "flips": len(self.flips),
            "changes": [c.to_dict() for c in listed],
            "changes_not_listed": len(self.changes) - len(listed),
        }


def decisive_reasons(decision: Decision) -> tuple[Reason, ...]:
    return tuple(r for r in decision.reasons if r.effect is decision.outcome)


def replay(bundle: PolicyBundle, events: Iterable[Mapping[str, Any]]) -> ReplayReport:
    """Re-decide every ``proposal.decided`` event body of ``events`` with ``bundle``; other types are ignored.

    Pure: no clock, no I/O beyond iterating ``events``. Recorded ``now``, environment and usage are used,
    so time-dependent rules decide as they would have then.
    """
    counts: Counter[tuple[Outcome, Outcome]] = Counter({(old, new): 0 for old in OUTCOMES for new in OUTCOMES})
    versions: Counter[str] = Counter()
    changes: list[Change] = []
    compared = runtime_decided = without_usage = unreadable = same_content = 0
    first_at: datetime | None = None
    last_at: datetime | None = None
    candidate_digest = content_digest(bundle.policy_version)
    for body in events:
        if body.get("type") != DECIDED:
            continue
        try:
            recorded = recorded_decision(body)
        except UnreadableEvent:
            unreadable += 1
            continue
        at = recorded.occurred_at
        first_at = at if first_at is None or at < first_at else first_at
        last_at = at if last_at is None or at > last_at else last_at
        if recorded.decided_by_runtime_state:
            runtime_decided += 1
            continue
        if bundle.uses_usage and not recorded.request.usage:
            # The bundle that decided it did not read usage, so its counters were never recorded: a
            # candidate's usage rule would see none and fail, which is no evidence of a change.
            without_usage += 1
            continue
        compared += 1
        old = recorded.decision
        versions[old.policy_version] += 1
        if content_digest(old.policy_version) == candidate_digest:
            same_content += 1
        new = decide(bundle, recorded.request)
        counts[old.outcome, new.outcome] += 1
        if new.outcome is not old.outcome:
            action = recorded.request.action
            changes.append(
                Change(
                    proposal_id=recorded.proposal_id,
                    occurred_at=at,
                    agent_id=recorded.request.agent.id,
                    tool=action.tool,
                    operation=action.operation,
                    resource=action.resource,
                    old=old.outcome,
                    new=new.outcome,
                    reasons=decisive_reasons(new),
                    old_policy_version=old.policy_version,
                )
            )
    changes.sort(key=lambda c: (c.occurred_at, c.proposal_id))
    return ReplayReport(
        candidate_version=bundle.policy_version,
        compared=compared,
        runtime_decided=runtime_decided,
        without_usage=without_usage,
        unreadable=unreadable,
        same_content=same_content,
        counts=dict(counts),
        changes=tuple(changes),
        recorded_versions=dict(versions),
        first_at=first_at,
        last_at=last_at,
    )


def decided_events(engine: Engine, since: datetime | None = None) -> Iterator[dict[str, Any]]:
    """The bodies of ``proposal.decided`` events in log order, streamed; ``since`` bounds ``recorded_at``."""
    query = (
        select(audit_events.c.body)
        .where(audit_events.c.type == DECIDED)
        .order_by(audit_events.c.chain, audit_events.c.seq)
    )
    if since is not None:
        query = query.where(audit_events.c.recorded_at >= since)
    with engine.connect() as conn:
        for row in conn.execution_options(stream_results=True, yield_per=1000).execute(query):
            body: dict[str, Any] = json.loads(row.body)
            yield body
