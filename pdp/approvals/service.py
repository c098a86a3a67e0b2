"""Approval use cases: what an approver may decide, the vote, quorum, re-evaluation, expiry.

Transport-free: the admin endpoint (JSON API and HTML page) is a thin adapter. Errors are the typed
errors of :mod:`pdp.errors`: Unauthenticated (401), PermissionDenied (403: not eligible), NotFound
(404), FailedPrecondition (409: not pending any more), InvalidArgument (422).

Every vote is one unit of the group-commit writer: it takes the audit chain's lock first (which also
serialises it against votes in other replicas), re-reads the proposal and the approver, and writes
the vote, any state change, the ticket and their audit events in one transaction. So two approvers
completing a quorum at the same instant produce exactly one transition and one ticket.

What counts is what the audit chain recorded and the PDP signed (:mod:`pdp.approvals.history`): the
decision's signed approval request (requirements, owner, expiry, the action digest) and the signed votes.
The rows (``proposals``, ``approvals``) are for display; a vote on a proposal whose rows disagree with its
chain is refused (409) and logged, and a vote must name the action digest its approver was shown.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import Connection, Engine, insert, select, update

from pdp.approvals import history, listing, quorum, signed
from pdp.approvals.consistency import StoredProposal, StoredVote, disagreements, stored_action_digest
from pdp.approvals.history import History
from pdp.approvals.quorum import APPROVE, REJECT, Vote
from pdp.approvals.signed import ApprovalRequest
from pdp.audit import chain
from pdp.audit.chain import Event
from pdp.canonical import timestamp
from pdp.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from pdp.execution import tickets
from pdp.governance import limits
from pdp.governance import store as governance_store
from pdp.governance.release import release_agent
from pdp.identity.agents import revoked_at
from pdp.identity.approvers import Approver, active_approver, authenticate_approver
from pdp.identity.names import same_identity
from pdp.observability import logs, metrics, tracing
from pdp.policy.bundle import ActiveBundle
from pdp.policy.decision import ApprovalRequirement, Outcome
from pdp.policy.engine import decide
from pdp.proposals.recorded import decision_input
from pdp.proposals.states import ProposalState
from pdp.store.models import agents, approvals, proposals
from pdp.store.proposals import ApprovalRecord, ProposalRecord, get_proposal_for_update, insert_ticket
from pdp.store.writer import GroupCommitWriter

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
MAX_TEXT = 4096
PENDING = ProposalState.PENDING_APPROVAL


@dataclass(frozen=True, slots=True)
class RequirementView:
    source: str
    groups: tuple[str, ...]
    min_approvals: int
    approvals: int


@dataclass(frozen=True, slots=True)
class TimelineEntry:
    seq: int
    type: str
    actor: str
    occurred_at: str


@dataclass(frozen=True, slots=True)
class PendingItem:
    proposal_id: str
    agent_id: str
    owner: str
    tool: str
    operation: str
    resource: str
    created_at: datetime
    expires_at: datetime | None
    seconds_left: int
    requirements: tuple[RequirementView, ...]
    # Set when the agent was revoked: its proposals can no longer be decided (shown, not hidden).
    agent_revoked_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class PendingPage:
    """One page of the pending list, with opaque cursors to the pages around it (None: no such page)."""

    items: list[PendingItem]
    next_cursor: str | None
    prev_cursor: str | None


@dataclass(frozen=True, slots=True)
class ProposalDetail:
    proposal_id: str
    state: str
    agent_id: str
    owner: str
    action: dict[str, Any]
    # Of the action shown: a vote must send it back, and is refused unless it is the one the PDP decided.
    action_digest: str
    # The agent's own words: recorded, shown, never verified and never seen by policy.
    justification: str
    outcome: str
    boundary: str
    tier: str
    reasons: tuple[dict[str, str], ...]
    policy_version: str
    requirements: tuple[RequirementView, ...]
    created_at: datetime
    expires_at: datetime | None
    seconds_left: int
    approvals: tuple[ApprovalRecord, ...]
    timeline: tuple[TimelineEntry, ...]
    # Whether this approver may vote now, and if not, why.
    can_vote: bool
    why_not: str
    agent_revoked_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class VoteResult:
    proposal_id: str
    state: str
    requirements: tuple[RequirementView, ...]
    approvals: tuple[ApprovalRecord, ...]
    created_at: datetime  # of the proposal: how long approvers took is a metric


def _owner(record: ProposalRecord) -> str:
    return str(record.decision_input.get("agent", {}).get("owner", ""))


def _requirements(requirements: Sequence[ApprovalRequirement], votes: Sequence[Vote]) -> tuple[RequirementView, ...]:
    return tuple(
        RequirementView(p.requirement.source, p.requirement.groups, p.requirement.min_approvals, p.approvals)
        for p in quorum.progress(requirements, votes)
    )


def stored_digest(record: ProposalRecord) -> str:
    """The digest of the stored action, as the executor will compute it before it runs anything."""
    stored = record.stored_action if record.stored_action is not None else record.action
    return stored_action_digest(record.action_json, stored)


def _stored(record: ProposalRecord) -> StoredProposal:
    return StoredProposal(
        record.id,
        record.agent_id,
        record.state.value,
        stored_digest(record),
        record.action_digest,
        record.decision.to_dict(),
        record.decision_input,
    )


_VOTE_ROWS = select(approvals).order_by(approvals.c.decided_at, approvals.c.approver_id)


def _vote_rows(conn: Connection, proposal_id: str) -> list[StoredVote]:
    rows = conn.execute(_VOTE_ROWS.where(approvals.c.proposal_id == proposal_id)).mappings()
    return [StoredVote(r["approver_id"], r["verdict"], tuple(r["groups"]), r["action_digest"]) for r in rows]


@dataclass(frozen=True, slots=True)
class Trusted:
    """A pending proposal as its audit chain has it, its rows agreeing: what a vote may be counted against."""

    request: ApprovalRequest
    decided: Mapping[str, Any]  # data of its proposal.decided event: the action and input as decided
    history: History


def _trust(conn: Connection, record: ProposalRecord, public_key: Ed25519PublicKey) -> Trusted | str:
    """The signed request and votes of a pending proposal, or why no vote may be recorded on it now."""
    found, _ = history.load(conn, record.id, public_key)
    return _judge(record, found, _vote_rows(conn, record.id))


def _judge(record: ProposalRecord, found: History, rows: Sequence[StoredVote]) -> Trusted | str:
    if not found.pending:
        return f"the proposal is {found.state or 'unknown'} (as its audit log records), not pending approval"
    if found.request is None:
        return f"it cannot be approved: {found.request_problem or 'its audit log holds no approval request'}"
    wrong = disagreements(_stored(record), rows, found)
    if wrong:
        return "its database rows disagree with its audit log (" + "; ".join(wrong) + ")"
    if found.decided is None:  # disagreements() reports a missing decision; this only tells the type checker
        return "its audit log holds no decision"
    return Trusted(found.request, found.decided, found)


def _seconds_left(record: ProposalRecord, now: datetime) -> int:
    expires = record.decision.approval_expires_at
    return max(0, int((expires - now).total_seconds())) if expires is not None else 0


def overdue(record: ProposalRecord, now: datetime) -> bool:
    """Pending past its deadline. (A pending proposal without one cannot exist; it would count as overdue.)"""
    expires = record.decision.approval_expires_at
    return record.state is PENDING and (expires is None or expires <= now)


def _load(conn: Connection, proposal_id: str) -> ProposalRecord:
    row = conn.execute(select(proposals).where(proposals.c.id == proposal_id)).mappings().first()
    if row is None:
        raise NotFound(f"proposal {proposal_id!r} not found")
    return ProposalRecord.from_row(row)


def _votes(conn: Connection, proposal_ids: Sequence[str]) -> dict[str, list[tuple[Vote, ApprovalRecord]]]:
    """The vote rows of each proposal, for the pending list (one query for all of them; display only)."""
    found: dict[str, list[tuple[Vote, ApprovalRecord]]] = {pid: [] for pid in proposal_ids}
    if not proposal_ids:
        return found
    for r in conn.execute(_VOTE_ROWS.where(approvals.c.proposal_id.in_(list(proposal_ids)))).mappings():
        found[r["proposal_id"]].append(
            (
                Vote(r["approver_id"], frozenset(r["groups"]), r["verdict"]),
                ApprovalRecord(r["approver_id"], r["verdict"], r["comment"], r["decided_at"]),
            )
        )
    return found


def expire_if_due(conn: Connection, proposal_id: str, now: datetime) -> tuple[ProposalRecord, bool]:
    """In a writer unit: lock the chain, then the proposal; expire it if overdue. (record, whether it expired).

    The one way a proposal expires: the sweeper, every read that finds it overdue, and every vote use it.
    """
    chain.lock_chain(conn)  # the lock order of every writer: chain, then proposal rows
    record = get_proposal_for_update(conn, proposal_id)
    if not overdue(record, now):
        return record, False
    conn.execute(
        update(proposals).where(proposals.c.id == record.id).values(state=ProposalState.EXPIRED.value, updated_at=now)
    )
    chain.append(
        conn,
        Event(
            type="proposal.expired",
            actor="pdp",
            occurred_at=now,
            proposal_id=record.id,
            agent_id=record.agent_id,
            policy_version=record.decision.policy_version,
            data={
                "from_state": PENDING.value,
                "to_state": ProposalState.EXPIRED.value,
                "expires_at": timestamp(record.decision.approval_expires_at)
                if record.decision.approval_expires_at
                else None,
            },
        ),
    )
    return replace(record, state=ProposalState.EXPIRED, updated_at=now), True


class ApprovalService:
    def __init__(
        self,
        reader: Engine,
        writer: GroupCommitWriter,
        bundles: ActiveBundle,
        signing_key: Ed25519PrivateKey,
        *,
        environment: str,
        ticket_ttl: timedelta = tickets.DEFAULT_TTL,
        clock: Clock,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._bundles = bundles
        self._key = signing_key
        self._public = signing_key.public_key()
        self._environment = environment
        self._ticket_ttl = ticket_ttl
        self._clock = clock

    # --- identity ----------------------------------------------------------------------------------

    def authenticate(self, token: str) -> Approver:
        """The approver a bearer token belongs to (Unauthenticated otherwise)."""
        with self._reader.connect() as conn:
            return authenticate_approver(conn, token)

    def approver(self, approver_id: str) -> Approver:
        """The approver behind a session, as the database has them now (Unauthenticated if revoked)."""
        with self._reader.connect() as conn:
            return active_approver(conn, approver_id)

    # --- reads -------------------------------------------------------------------------------------

    def pending(self, approver: Approver) -> list[PendingItem]:
        """The first page of :meth:`pending_page`."""
        return self.pending_page(approver).items

    def pending_page(
        self, approver: Approver, limit: int = listing.DEFAULT_PAGE, cursor: str | None = None
    ) -> PendingPage:
        """One page of the pending proposals this approver may decide, oldest first.

        Reads at most ``limit`` + 1 proposal rows (and their votes), whatever the number pending. Proposals
        past their deadline are left out; the sweeper expires them within a second.
        """
        now = self._clock()
        position = listing.Cursor.decode(cursor) if cursor else None
        with self._reader.connect() as conn:
            page = listing.pending_page(conn, approver, now, listing.check_limit(limit), position)
            records = [(ProposalRecord.from_row(row._mapping), row.agent_revoked_at) for row in page.rows]
            all_votes = _votes(conn, [record.id for record, _ in records])
        items: list[PendingItem] = []
        for record, agent_revoked_at in records:
            votes = [vote for vote, _ in all_votes[record.id]]
            if quorum.ineligible(approver, _owner(record), record.decision.approval_requirements, votes):
                continue  # what SQL could not see: identities compared by their identity key
            action = record.action
            items.append(
                PendingItem(
                    proposal_id=record.id,
                    agent_id=record.agent_id,
                    owner=_owner(record),
                    # .get: a row a database writer forged must not take every approver's list down (the vote
                    # path refuses it; verify reports it).
                    tool=str(action.get("tool", "")),
                    operation=str(action.get("operation", "")),
                    resource=str(action.get("resource", "")),
                    created_at=record.created_at,
                    expires_at=record.decision.approval_expires_at,
                    seconds_left=_seconds_left(record, now),
                    requirements=_requirements(record.decision.approval_requirements, votes),
                    agent_revoked_at=agent_revoked_at,
                )
            )
        return PendingPage(
            items,
            page.next.encode() if page.next else None,
            page.prev.encode() if page.prev else None,
        )

    def detail(self, approver: Approver, proposal_id: str) -> ProposalDetail:
        """Everything an approver needs to decide. Any approver may read any proposal; voting is narrower.

        Progress and votes are the audit chain's (signed votes only); ``can_vote`` is False, with the reason,
        wherever a vote would be refused, including a proposal whose rows disagree with its chain.
        """
        now = self._clock()
        with self._reader.connect() as conn:
            record = _load(conn, proposal_id)
        if overdue(record, now):
            record = self._writer.submit(lambda conn: expire_if_due(conn, proposal_id, now)[0]).result()
        with self._reader.connect() as conn:
            agent_revoked_at = revoked_at(conn, record.agent_id)
            events = history.events_of(conn, proposal_id)
            rows = _vote_rows(conn, proposal_id) if record.decision.approval_requirements else []
        found = history.read(proposal_id, events, self._public)
        votes = found.quorum_votes()
        trusted = _judge(record, found, rows) if record.state is PENDING else None
        decision = record.decision
        requirements = found.request.requirements if found.request else decision.approval_requirements
        if record.state is not PENDING:
            why_not = f"the proposal is {record.state.value}, not pending approval"
        elif agent_revoked_at is not None:
            why_not = _revoked(record.agent_id, agent_revoked_at)
        elif isinstance(trusted, str):
            why_not = trusted
        else:
            owner = found.request.owner if found.request else _owner(record)
            why_not = quorum.ineligible(approver, owner, requirements, votes) or ""
        return ProposalDetail(
            proposal_id=record.id,
            state=record.state.value,
            agent_id=record.agent_id,
            owner=found.request.owner if found.request else _owner(record),
            action=record.action,
            action_digest=stored_digest(record),
            justification=record.justification,
            outcome=decision.outcome.value,
            boundary=decision.boundary,
            tier=decision.tier,
            reasons=tuple(r.to_dict() for r in decision.reasons),
            policy_version=decision.policy_version,
            requirements=_requirements(requirements, votes),
            created_at=record.created_at,
            expires_at=decision.approval_expires_at,
            seconds_left=_seconds_left(record, now) if record.state is PENDING else 0,
            approvals=tuple(_view(v) for v in found.votes),
            timeline=tuple(TimelineEntry(e.seq, e.type, e.actor, e.occurred_at) for e in events),
            can_vote=not why_not,
            why_not=why_not,
            agent_revoked_at=agent_revoked_at,
        )

    # --- votes -------------------------------------------------------------------------------------

    def approve(self, approver: Approver, proposal_id: str, comment: str = "", *, action_digest: str) -> VoteResult:
        """Approve the action whose digest ``action_digest`` the approver was shown (required)."""
        seen = _digest("action_digest", action_digest, required=True)
        return self._vote(approver, proposal_id, APPROVE, _text("comment", comment, required=False), seen)

    def reject(self, approver: Approver, proposal_id: str, reason: str, *, action_digest: str = "") -> VoteResult:
        """Reject; when ``action_digest`` is given it must be the proposal's, as for an approval."""
        seen = _digest("action_digest", action_digest, required=False)
        return self._vote(approver, proposal_id, REJECT, _text("reason", reason, required=True), seen)

    def _vote(self, approver: Approver, proposal_id: str, verdict: str, text: str, seen: str) -> VoteResult:
        with tracing.vote_span(proposal_id, verdict, approver.id) as span, logs.context(proposal_id=proposal_id):
            outcome = self._writer.submit(
                lambda conn: self._vote_unit(conn, approver.id, proposal_id, verdict, text, seen)
            )
            result = outcome.result()  # committed, including an expiry this vote found
            span.set_attribute("pdp.state", result.state)
            if result.state != PENDING.value:
                metrics.approval_finished(result.state.lower(), (self._clock() - result.created_at).total_seconds())
            if result.state == ProposalState.EXPIRED.value:
                raise FailedPrecondition(f"proposal {proposal_id} expired before this vote; nothing was recorded")
            log.info("%s by %s: the proposal is %s", verdict, approver.id, result.state)
            return result

    def _vote_unit(
        self, conn: Connection, approver_id: str, proposal_id: str, verdict: str, text: str, seen: str
    ) -> VoteResult:
        now = self._clock()
        record, expired = expire_if_due(conn, proposal_id, now)  # takes the chain's lock, then the row's
        if expired:
            return VoteResult(record.id, record.state.value, (), (), record.created_at)
        agent_revoked_at = revoked_at(conn, record.agent_id)  # under the chain's lock, like revocation itself
        if agent_revoked_at is not None:  # even if a row was left pending: a revoked agent's work is never approved
            raise FailedPrecondition(
                f"proposal {proposal_id} cannot be decided: {_revoked(record.agent_id, agent_revoked_at)}"
            )
        if record.state is not PENDING:
            raise FailedPrecondition(f"proposal {proposal_id} is {record.state.value}, not pending approval")
        trusted = _trust(conn, record, self._public)
        if isinstance(trusted, str):
            # Someone changed the rows (or the log) outside the PDP: nothing is decided on them until a human looks.
            log.error("vote on proposal %s refused: %s", proposal_id, trusted)
            raise FailedPrecondition(f"proposal {proposal_id}: {trusted}; nothing was recorded")
        request, votes = trusted.request, trusted.history.quorum_votes()
        approver = active_approver(conn, approver_id)  # revoked since login → 401; groups as of now
        why = quorum.ineligible(approver, request.owner, request.requirements, votes)
        if why:
            raise PermissionDenied(why)
        if seen and seen != request.action_digest:
            raise FailedPrecondition(
                f"the action changed since you saw it (you were shown {seen[:12]}…, the proposal's action is "
                f"{request.action_digest[:12]}…): reload the proposal and decide again; nothing was recorded"
            )
        groups = sorted(approver.groups)
        conn.execute(
            insert(approvals).values(
                proposal_id=record.id,
                approver_id=approver.id,
                verdict=verdict,
                comment=text,
                groups=groups,
                action_digest=request.action_digest,
                decided_at=now,
            )
        )
        vote = signed.sign_vote(
            self._key,
            proposal_id=record.id,
            approver_id=approver.id,
            verdict=verdict,
            action_digest=request.action_digest,
            groups=groups,
            decided_at=now,
        )
        votes.append(Vote(approver.id, frozenset(groups), verdict))
        state = PENDING
        if verdict == REJECT:
            state = ProposalState.REJECTED
        elif quorum.quorum_met(request.requirements, votes):
            state = ProposalState.APPROVED
        self._append_vote(conn, record, approver, verdict, text, groups, vote, request, now, state)
        if state is ProposalState.APPROVED:
            state = self._at_quorum(conn, record, trusted, votes, now)
        elif state is ProposalState.REJECTED:
            self._set_state(conn, record.id, state, now)
        views = (*(_view(v) for v in trusted.history.votes), ApprovalRecord(approver.id, verdict, text, now))
        return VoteResult(record.id, state.value, _requirements(request.requirements, votes), views, record.created_at)

    def _append_vote(
        self,
        conn: Connection,
        record: ProposalRecord,
        approver: Approver,
        verdict: str,
        text: str,
        groups: list[str],
        vote: signed.Signed,
        request: ApprovalRequest,
        now: datetime,
        state: ProposalState,
    ) -> None:
        data: dict[str, Any] = {
            "verdict": verdict,
            "comment": text,
            "action_digest": request.action_digest,
            "groups": groups,
            "vote": vote.audit(),  # what quorum counts: the PDP's signature over this vote
        }
        if state is ProposalState.REJECTED:
            data.update(from_state=PENDING.value, to_state=state.value)
        chain.append(
            conn,
            Event(
                type="approval.granted" if verdict == APPROVE else "approval.rejected",
                actor=f"approver:{approver.id}",
                occurred_at=now,
                proposal_id=record.id,
                agent_id=record.agent_id,
                policy_version=record.decision.policy_version,
                data=data,
            ),
        )

    def _at_quorum(
        self, conn: Connection, record: ProposalRecord, trusted: Trusted, votes: list[Vote], now: datetime
    ) -> ProposalState:
        """Re-decide with the current bundle: deny wins (→ DENIED); anything else → APPROVED with a ticket.

        The action and input are the ones the audit chain recorded with the decision (the rows agreed with them
        a moment ago), and the ticket binds the action digest of the signed request.
        """
        bundle = self._bundles.current
        action, context = trusted.decided.get("action"), trusted.decided.get("decision_input")
        request = replace(
            decision_input(
                action if isinstance(action, dict) else record.action,
                context if isinstance(context, dict) else record.decision_input,
            ),
            now=now,
            environment=self._environment,
        )
        if bundle.uses_usage:  # the counters as they are now, as a new proposal would see them
            request = replace(request, usage=governance_store.usage(conn, record.agent_id, now))
        decision = decide(bundle, request)
        approved = [
            {"approver_id": v.approver_id, "groups": sorted(v.groups), "verdict": v.verdict}
            for v in votes
            if v.verdict == APPROVE
        ]
        event = Event(
            type="proposal.approved",
            actor="pdp",
            occurred_at=now,
            proposal_id=record.id,
            agent_id=record.agent_id,
            policy_version=decision.policy_version,
            data={"from_state": PENDING.value, "approvals": approved, "redecision": decision.to_dict()},
        )
        if decision.outcome is Outcome.DENY:
            conn.execute(
                update(proposals)
                .where(proposals.c.id == record.id)
                .values(
                    state=ProposalState.DENIED.value,
                    outcome=decision.outcome.value,
                    decision=decision.to_dict(),
                    policy_version=decision.policy_version,
                    updated_at=now,
                )
            )
            event = Event(
                type="proposal.denied",
                actor="pdp",
                occurred_at=now,
                proposal_id=record.id,
                agent_id=record.agent_id,
                policy_version=decision.policy_version,
                data={
                    "from_state": PENDING.value,
                    "to_state": ProposalState.DENIED.value,
                    "why": "re-evaluated at quorum against the current policy, which denies it",
                    "approvals": approved,
                    "redecision": decision.to_dict(),
                },
            )
            chain.append(conn, event)
            return ProposalState.DENIED
        ticket = tickets.issue(
            self._key,
            proposal_id=record.id,
            action_digest=trusted.request.action_digest,
            outcome="approved",
            approvals=approved,
            policy_version=decision.policy_version,
            issued_at=now,
            ttl=self._ticket_ttl,
        )
        insert_ticket(conn, ticket)
        # Approved spend counts against today's budgets (DESIGN §8); a rejected or expired one never does.
        charged = limits.charge_approved(conn, bundle, request)
        conn.execute(
            update(proposals)
            .where(proposals.c.id == record.id)
            .values(state=ProposalState.APPROVED.value, charged_usd=charged, updated_at=now)
        )
        event.data.update(to_state=ProposalState.APPROVED.value, ticket=ticket.audit())
        chain.append(conn, event)
        return ProposalState.APPROVED

    @staticmethod
    def _set_state(conn: Connection, proposal_id: str, state: ProposalState, now: datetime) -> None:
        conn.execute(update(proposals).where(proposals.c.id == proposal_id).values(state=state.value, updated_at=now))

    # --- quarantines -------------------------------------------------------------------------------

    def release_agent(self, approver: Approver, agent_id: str) -> None:
        """Lift a retry-storm quarantine: any active approver but the agent's owner (separation of duties)."""

        def unit(conn: Connection) -> None:
            owner = conn.execute(select(agents.c.owner).where(agents.c.id == agent_id)).scalar()
            if owner is not None and same_identity(owner, approver.id):
                raise PermissionDenied("separation of duties: the agent's owner may not release it")
            release_agent(conn, agent_id, f"approver:{approver.id}", self._clock())

        self._writer.submit(unit).result()

    # --- expiry ------------------------------------------------------------------------------------

    def expire_due(self) -> int:
        """Expire every pending proposal past its deadline (the sweeper; also called on reads)."""
        now = self._clock()
        with self._reader.connect() as conn:
            due = (
                conn.execute(
                    select(proposals.c.id)
                    .where(proposals.c.state == PENDING.value, proposals.c.approval_expires_at <= now)
                    .limit(1000)
                )
                .scalars()
                .all()
            )
        if not due:
            return 0

        created: list[datetime] = []

        def unit(conn: Connection) -> int:
            for proposal_id in due:
                record, expired = expire_if_due(conn, proposal_id, now)
                if expired:
                    created.append(record.created_at)
            return len(created)

        changed = self._writer.submit(unit).result()
        for created_at in created:  # committed: now they count
            metrics.approval_finished("expired", (now - created_at).total_seconds())
        return changed


def _text(field: str, value: str, *, required: bool) -> str:
    value = value.strip()
    if required and not value:
        raise InvalidArgument(field, "is required")
    if len(value) > MAX_TEXT:
        raise InvalidArgument(field, f"is longer than {MAX_TEXT} characters")
    if "\x00" in value:
        raise InvalidArgument(field, "contains a NUL character")
    return value


def _revoked(agent_id: str, at: datetime) -> str:
    return f"its agent {agent_id!r} was revoked at {timestamp(at)}"


def _digest(field: str, value: str, *, required: bool) -> str:
    if not value and not required:
        return ""
    if not value:
        raise InvalidArgument(field, "is required: the action_digest of the proposal you were shown")
    if not signed.DIGEST.match(value):
        raise InvalidArgument(field, "must be 64 lowercase hexadecimal characters (a SHA-256 digest)")
    return value


def _view(counted: history.CountedVote) -> ApprovalRecord:
    vote = counted.vote
    return ApprovalRecord(vote.approver_id, vote.verdict, counted.comment, _parse_time(vote.decided_at))


def _parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))
