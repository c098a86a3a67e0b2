"""Where a proposal's mutable rows disagree with what its audit events recorded.

The rows (``proposals``, ``approvals``) are what people and the executor read; the chain is what the PDP
signed and hashed. One set of rules serves both readers of this module: the vote path refuses to record a
vote on a proposal whose rows disagree (409: an operator must look), and ``pdp audit verify`` reports every
such proposal by id.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pdp.approvals.history import History
from pdp.canonical import digest, digest_of, loads, same_values, timestamp


@dataclass(frozen=True, slots=True)
class StoredProposal:
    """A proposal row as stored. The three columns that repeat the decision are None when not read."""

    id: str
    agent_id: str
    state: str
    # The digest of the action as stored, computed as the executor will before it runs anything.
    stored_action_digest: str
    action_digest: str
    decision: Any
    decision_input: Any
    outcome: str | None = None
    policy_version: str | None = None
    approval_expires_at: datetime | None = None
    check_columns: bool = False


@dataclass(frozen=True, slots=True)
class StoredVote:
    approver_id: str
    verdict: str
    groups: tuple[str, ...]
    action_digest: str


def stored_action_digest(action_json: str | None, action: Any) -> str:
    """What the executor will compute before it runs anything: SHA-256 of ``proposals.action_json`` (the exact
    bytes the PDP digested), provided the JSONB ``action`` copy, which approvers and agents read, says the same.

    A row from before ``action_json`` existed (left NULL where the migration could not rebuild it) falls back
    to the canonical JSON of the copy; the executor refuses such a row anyway.
    """
    if action_json is None:
        try:
            return digest(action)
        except (TypeError, ValueError):
            return "(no canonical form)"
    try:
        exact = loads(action_json)
    except ValueError:
        return "(action_json is not canonical JSON)"
    if not same_values(action, exact):
        return "(the stored action differs from its canonical text)"
    return digest_of(action_json.encode("utf-8"))


def disagreements(stored: StoredProposal, votes: Iterable[StoredVote], history: History) -> list[str]:
    """What in the rows differs from the chain (empty when they tell the same story)."""
    decided = history.decided
    if decided is None:
        return ["the audit log has no proposal.decided event for this proposal"]
    problems: list[str] = []
    if stored.stored_action_digest != decided.get("action_digest"):
        problems.append("the stored action differs from the action its proposal.decided event recorded")
    if stored.action_digest != decided.get("action_digest"):
        problems.append("the stored action_digest differs from the one its proposal.decided event recorded")
    # Numbers compared as the doubles they name: JSONB gives 1e23 back as an integer that is not that float.
    if not same_values(stored.decision_input, decided.get("decision_input")):
        problems.append("the stored decision input (agent, owner, context) differs from its proposal.decided event's")
    decision = history.decision
    if decision is not None:
        if not same_values(stored.decision, decision):
            problems.append("the stored decision differs from the decision its audit log recorded")
        if stored.check_columns:
            problems += _columns(stored, decision, decided)
    if history.state is not None and stored.state != history.state:
        problems.append(
            f"the stored state {stored.state} differs from {history.state}, the state its audit log records"
        )
    problems += _request(stored, decided, history)
    problems += _votes(votes, history)
    return problems


def _columns(stored: StoredProposal, decision: Mapping[str, Any], decided: Mapping[str, Any]) -> list[str]:
    """outcome and policy_version follow the latest decision; approval_expires_at is the first decision's."""
    first = _mapping(decided.get("decision"))
    expires = first.get("approval_expires_at")
    column = timestamp(stored.approval_expires_at) if stored.approval_expires_at is not None else None
    wrong = [
        name
        for name, value, recorded in (
            ("outcome", stored.outcome, decision.get("outcome")),
            ("policy_version", stored.policy_version, decision.get("policy_version")),
            ("approval_expires_at", column, expires),
        )
        if value != recorded
    ]
    return [f"the stored {name} column differs from the decision its audit log recorded" for name in wrong]


def _request(stored: StoredProposal, decided: Mapping[str, Any], history: History) -> list[str]:
    """The signed request must say what the decided event says; a request that does not verify is itself wrong."""
    request = history.request
    if request is None:
        present = "approval_request" in decided
        return [f"its approval request does not verify: {history.request_problem}"] if present else []
    decision = _mapping(decided.get("decision"))
    agent = _mapping(_mapping(decided.get("decision_input")).get("agent"))
    wrong = [
        name
        for name, signed, recorded in (
            ("action_digest", request.action_digest, decided.get("action_digest")),
            ("requirements", [r.to_dict() for r in request.requirements], decision.get("approval_requirements")),
            ("expires_at", request.expires_at, decision.get("approval_expires_at")),
            ("policy_version", request.policy_version, decision.get("policy_version")),
            ("owner", request.owner, agent.get("owner")),
            ("agent_id", request.agent_id, stored.agent_id),
        )
        if signed != recorded
    ]
    return [f"the signed approval request's {name} differs from its proposal.decided event" for name in wrong]


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _votes(stored: Iterable[StoredVote], history: History) -> list[str]:
    """Vote rows against the signed votes (or, for a proposal decided before votes were signed, the vote events)."""
    if history.request is not None:
        expected = {
            v.vote.approver_id: (v.vote.verdict, tuple(sorted(v.vote.groups)), v.vote.action_digest)
            for v in history.votes
        }
    else:
        expected = {a: (verdict, tuple(sorted(g)), d) for a, (verdict, g, d) in history.recorded_votes.items()}
    rows = {v.approver_id: (v.verdict, tuple(sorted(v.groups)), v.action_digest) for v in stored}
    problems = [f"the vote row of {a!r} has no signed vote in the audit log" for a in sorted(rows.keys() - expected)]
    problems += [f"the vote of {a!r} in the audit log has no vote row" for a in sorted(expected.keys() - rows)]
    problems += [
        f"the vote row of {a!r} differs from its signed vote"
        for a in sorted(rows.keys() & expected.keys())
        if rows[a] != expected[a]
    ]
    return problems
