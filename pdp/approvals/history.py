"""What the audit chain recorded about one proposal's approval: the signed request, the votes that count, its state.

The vote path computes eligibility and quorum from this alone, and ``pdp audit verify`` compares the mutable
rows with it (:mod:`pdp.approvals.consistency`). A vote counts only if the PDP signed it
(:mod:`pdp.approvals.signed`) for this proposal, for the action digest of the signed request, and it is its
approver's first; an event that fails any of these is kept as a problem and counts for nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Connection, bindparam, select

from pdp.approvals.quorum import APPROVE, REJECT, Vote
from pdp.approvals.signed import ApprovalRequest, SignedVote, Unverified, open_request, open_vote
from pdp.audit.events import DECIDED, GRANTED, VOTES, state_after
from pdp.store.models import audit_events

_VERDICT = {GRANTED: APPROVE, "approval.rejected": REJECT}


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    seq: int
    type: str
    actor: str
    data: Mapping[str, Any]  # empty when the type alone says what it records (events.body_needed)
    occurred_at: str = ""


@dataclass(frozen=True, slots=True)
class CountedVote:
    vote: SignedVote
    comment: str  # hashed in the chain, not signed: shown, never counted

    def quorum_vote(self) -> Vote:
        return Vote(self.vote.approver_id, frozenset(self.vote.groups), self.vote.verdict)


@dataclass(frozen=True, slots=True)
class History:
    proposal_id: str
    decided: Mapping[str, Any] | None  # data of the first proposal.decided event
    decided_events: int  # more than one means someone appended one
    decision: Mapping[str, Any] | None  # the latest decision: decided's, or a re-decision's at quorum
    request: ApprovalRequest | None  # verified; None when there is none or it does not verify
    request_problem: str  # why ``request`` is None although the decision needs approval ("" otherwise)
    votes: tuple[CountedVote, ...]  # the ones that count, in chain order
    recorded_votes: Mapping[str, tuple[str, tuple[str, ...], str]]  # approver -> (verdict, groups, digest), as logged
    problems: tuple[str, ...]  # events that do not count, and why
    state: str | None  # after the last state-changing event
    pending: bool  # decided PENDING_APPROVAL, and no event since moved it (a forged one can only end it)

    @property
    def needs_approval(self) -> bool:
        return self.decided is not None and _outcome(self.decided) == "needs_approval"

    def quorum_votes(self) -> list[Vote]:
        return [v.quorum_vote() for v in self.votes]


def _outcome(decided: Mapping[str, Any]) -> object:
    decision = decided.get("decision")
    return decision.get("outcome") if isinstance(decision, Mapping) else None


def _approver(actor: str) -> str:
    return actor.removeprefix("approver:") if actor.startswith("approver:") else ""


def read(proposal_id: str, events: Iterable[RecordedEvent], public_key: Ed25519PublicKey | None) -> History:
    """Fold one proposal's events, in seq order. Without a public key nothing verifies and no vote counts."""
    decided: Mapping[str, Any] | None = None
    decided_events = 0
    decision: Mapping[str, Any] | None = None
    request: ApprovalRequest | None = None
    request_problem = ""
    votes: list[CountedVote] = []
    recorded: dict[str, tuple[str, tuple[str, ...], str]] = {}
    problems: list[str] = []
    state: str | None = None
    pending = False
    for event in events:
        data = event.data
        if event.type == DECIDED and decided_events:
            decided_events += 1
            problems.append(f"seq {event.seq}: a second proposal.decided event")
            continue
        changed = state_after(event.type, data)
        if changed is not None:
            state = changed
            # Pending is only ever a proposal's first state: whatever moved it on, it never comes back.
            pending = event.type == DECIDED and changed == "PENDING_APPROVAL"
        if event.type == DECIDED:
            decided_events += 1
            decided = data
            decision = data.get("decision") if isinstance(data.get("decision"), Mapping) else None
            if _outcome(data) == "needs_approval":
                request, request_problem = _request(proposal_id, data, public_key)
        elif event.type == "proposal.denied" and isinstance(data.get("redecision"), Mapping):
            decision = data["redecision"]
        elif event.type in VOTES:
            approver = _approver(event.actor)
            groups = data.get("groups")
            recorded.setdefault(
                approver,
                (
                    str(data.get("verdict", "")),
                    tuple(str(g) for g in groups) if isinstance(groups, list) else (),
                    str(data.get("action_digest", "")),
                ),
            )
            counted = _vote(proposal_id, event, request, public_key, votes)
            if isinstance(counted, str):
                problems.append(f"seq {event.seq}: {event.type} by {event.actor!r} does not count: {counted}")
            else:
                votes.append(counted)
    return History(
        proposal_id,
        decided,
        decided_events,
        decision,
        request,
        request_problem,
        tuple(votes),
        recorded,
        tuple(problems),
        state,
        pending,
    )


def _request(
    proposal_id: str, decided: Mapping[str, Any], public_key: Ed25519PublicKey | None
) -> tuple[ApprovalRequest | None, str]:
    if "approval_request" not in decided:
        return None, "no signed approval request (recorded before approvals were signed)"
    if public_key is None:
        return None, "no public key to verify the approval request with"
    try:
        request = open_request(public_key, decided["approval_request"])
    except Unverified as exc:
        return None, str(exc)
    if request.proposal_id != proposal_id:
        return None, f"the signed approval request names proposal {request.proposal_id}"
    return request, ""


def _vote(
    proposal_id: str,
    event: RecordedEvent,
    request: ApprovalRequest | None,
    public_key: Ed25519PublicKey | None,
    earlier: list[CountedVote],
) -> CountedVote | str:
    """The vote this event casts, or why it counts for nothing."""
    if request is None:
        return "the proposal has no verified approval request"
    if public_key is None:
        return "no public key to verify it with"
    try:
        vote = open_vote(public_key, event.data.get("vote"))
    except Unverified as exc:
        return str(exc)
    if vote.proposal_id != proposal_id:
        return f"it was signed for proposal {vote.proposal_id}"
    if vote.approver_id != _approver(event.actor):
        return f"it was signed for approver {vote.approver_id!r}"
    if vote.verdict != _VERDICT[event.type] or event.data.get("verdict") != vote.verdict:
        return f"its signed verdict is {vote.verdict!r}"
    if vote.action_digest != request.action_digest:
        return "it was signed for another action"
    if any(v.vote.approver_id == vote.approver_id for v in earlier):
        return "its approver had already voted"
    return CountedVote(vote, str(event.data.get("comment", "")))


def parse_body(body: str) -> object:
    """An event's body as JSON; one that is not (only a forged row can be) reads as holding nothing."""
    try:
        return json.loads(body)
    except ValueError:
        return None


_EVENTS = (
    select(audit_events.c.seq, audit_events.c.type, audit_events.c.actor, audit_events.c.body)
    .where(audit_events.c.proposal_id == bindparam("proposal_id"))
    .order_by(audit_events.c.seq)
)


def events_of(conn: Connection, proposal_id: str) -> list[RecordedEvent]:
    """The proposal's events in chain order (the proposal_id index finds them)."""
    found = []
    for row in conn.execute(_EVENTS, {"proposal_id": proposal_id}):
        body = parse_body(row.body)
        data = body.get("data") if isinstance(body, dict) else None
        found.append(
            RecordedEvent(
                int(row.seq),
                str(row.type),
                str(row.actor),
                data if isinstance(data, dict) else {},
                str(body.get("occurred_at", "")) if isinstance(body, dict) else "",
            )
        )
    return found


def load(conn: Connection, proposal_id: str, public_key: Ed25519PublicKey) -> tuple[History, list[RecordedEvent]]:
    events = events_of(conn, proposal_id)
    return read(proposal_id, events, public_key), events
