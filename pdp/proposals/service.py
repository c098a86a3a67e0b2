"""Proposal use cases: decide, record, read, cancel. Transport-free; the gRPC layer is a thin adapter.

Reads run on the caller's thread (the adapter puts them on a worker thread); writes go through the
group-commit writer and return futures that resolve only after their transaction committed.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Connection, Engine

from pdp.approvals import signed
from pdp.approvals.notify import Notifier
from pdp.approvals.service import expire_if_due, overdue
from pdp.audit import chain, events
from pdp.canonical import canonical_json, digest_of
from pdp.execution import tickets
from pdp.execution.circuits import CircuitBoard, deny_if_open
from pdp.execution.tickets import SignedTicket
from pdp.governance import limits
from pdp.governance import store as governance_store
from pdp.governance.limits import Hit
from pdp.governance.pending import DEFAULT_MAX_PENDING, cap_pending
from pdp.identity.agents import Caller, TokenCache, authenticate, require_active
from pdp.observability.metrics import approval_finished, limit_hit
from pdp.policy.bundle import ActiveBundle, PolicyBundle
from pdp.policy.decision import Decision, Outcome
from pdp.policy.engine import AgentIdentity, DecisionInput, decide
from pdp.proposals.recorded import decision_context
from pdp.proposals.states import INITIAL_STATE, ProposalState
from pdp.proposals.validation import ProposalInput
from pdp.store import proposals as store
from pdp.store.proposals import ProposalRecord, Recorded
from pdp.store.writer import GroupCommitWriter

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


class ProposalService:
    def __init__(
        self,
        engine: Engine,
        writer: GroupCommitWriter,
        bundles: ActiveBundle,
        environment: str,
        signing_key: Ed25519PrivateKey,
        *,
        ticket_ttl: timedelta = tickets.DEFAULT_TTL,
        circuits: CircuitBoard | None = None,
        notifier: Notifier | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
        clock: Clock = utc_now,
    ) -> None:
        self._engine = engine
        self._writer = writer
        self._bundles = bundles
        self._environment = environment
        self._key = signing_key
        self._ticket_ttl = ticket_ttl
        self._circuits = circuits
        self._notifier = notifier
        self._max_pending = max_pending
        self._clock = clock
        self._tokens = TokenCache()

    def identify(self, token: str) -> Caller | None:
        """The caller from the in-process cache, without I/O; None means :meth:`authenticate` is needed."""
        return self._tokens.get(token)

    def authenticate(self, token: str) -> Caller:
        with self._engine.connect() as conn:
            caller = authenticate(conn, token)
        self._tokens.put(caller)
        return caller

    def _decision_input(self, agent: AgentIdentity, proposal: ProposalInput, now: datetime) -> DecisionInput:
        return DecisionInput(agent=agent, action=proposal.action, now=now, environment=self._environment)

    def _decide(self, bundle: PolicyBundle, request: DecisionInput) -> Decision:
        decision = decide(bundle, request)
        if self._circuits is not None:
            tool = request.action.tool
            breaker = self._circuits.breaker(tool, request.agent.id)
            decision = deny_if_open(decision, tool, breaker, request.now)
        return decision

    def evaluate(self, caller: Caller, proposal: ProposalInput) -> Decision:
        """Dry run: the same rules, boundaries and breakers, nothing recorded and no limit counted.

        Blocking (run it off the event loop): the token is re-checked, and a bundle that reads ``usage``
        gets the agent's counters, in one read transaction.
        """
        bundle = self._bundles.current
        request = self._decision_input(caller.agent, proposal, self._clock())
        with self._engine.connect() as conn:
            require_active(conn, caller)
            if bundle.uses_usage:
                request = replace(request, usage=governance_store.usage(conn, caller.agent.id, request.now))
        return self._decide(bundle, request)

    def propose(self, caller: Caller, proposal: ProposalInput) -> Future[Recorded]:
        """Decide now; the future resolves once the proposal and its decision are durable.

        The token is re-checked inside the recording transaction, so a revoked agent records nothing.
        Limits are applied inside that transaction (see pdp/governance/limits.py), then the cap on the
        agent's pending proposals (pdp/governance/pending.py). A bundle that reads
        ``usage`` is decided there too, so the counters it sees are exact.
        """
        bundle = self._bundles.current  # this request finishes on this bundle, whatever reloads meanwhile
        agent = caller.agent
        now = self._clock()
        request = self._decision_input(agent, proposal, now)
        decided_early = not bundle.uses_usage
        decision = self._decide(bundle, request) if decided_early else None
        action = proposal.action_document()
        proposal_id = str(uuid.uuid4())
        # Canonicalised once: these bytes are stored as they are (action_json), so the digest never depends
        # on how the database gives the JSONB copy back.
        action_json = canonical_json(action)
        action_digest = digest_of(action_json)
        # Signed here when it can be: the writer thread is the bottleneck. Limits may still take it back.
        early_ticket = (
            self._ticket(proposal_id, action_digest, decision, now)
            if decision is not None and decision.outcome is Outcome.ALLOW
            else None
        )
        early_request = (
            self._approval_request(proposal_id, agent, action_digest, decision)
            if decision is not None and decision.outcome is Outcome.NEEDS_APPROVAL
            else None
        )

        def unit(conn: Connection) -> Recorded:
            require_active(conn, caller)
            chain.lock_chain(conn)  # limits read and write counters under the chain's lock: exact across replicas
            replay = store.find_replay(conn, agent.id, proposal.idempotency_key, action_digest)
            if replay is not None:
                return replay
            exact, ruled, ticket, approval = request, decision, early_ticket, early_request
            if ruled is None:
                exact = replace(request, usage=governance_store.usage(conn, agent.id, now))
                ruled = self._decide(bundle, exact)
            governed = limits.apply(conn, bundle, exact, ruled, action_digest, proposal_id)
            cap_pending(conn, agent.id, now, governed, self._max_pending)  # one query, for needs-approval only
            final = governed.decision
            if final.outcome is not Outcome.ALLOW:
                ticket = None
            elif ticket is None or final is not ruled:
                ticket = self._ticket(proposal_id, action_digest, final, now)
            if final.outcome is not Outcome.NEEDS_APPROVAL:
                approval = None
            elif approval is None or final is not ruled:  # decided here, or a limit escalated it
                approval = self._approval_request(proposal_id, agent, action_digest, final)
            record = ProposalRecord(
                id=proposal_id,
                agent_id=agent.id,
                session_id=proposal.session_id,
                idempotency_key=proposal.idempotency_key,
                action=action,
                action_json=action_json.decode("utf-8"),
                action_digest=action_digest,
                justification=proposal.justification,
                state=INITIAL_STATE[final.outcome],
                decision=final,
                decision_input=decision_context(exact),
                created_at=now,
                updated_at=now,
                charged_usd=governed.charged_usd,
                limited_by=governed.limited_by,
            )
            store.record_proposal(conn, record)
            if ticket is not None:
                store.insert_ticket(conn, ticket)
            chain.append(conn, events.proposal_decided(record, ticket, approval))  # no decision without its event
            for event in governed.events:
                chain.append(conn, event)
            hits.extend(governed.hits)
            return Recorded(record, replayed=False)

        hits: list[Hit] = []  # counted for metrics once the unit committed (an error records nothing)
        future = self._writer.submit(unit)
        future.add_done_callback(lambda done: self._limit_hits(done, hits))
        if self._notifier is not None:
            future.add_done_callback(self._notify)
        return future

    def _ticket(self, proposal_id: str, action_digest: str, decision: Decision, now: datetime) -> SignedTicket:
        return tickets.issue(
            self._key,
            proposal_id=proposal_id,
            action_digest=action_digest,
            outcome=decision.outcome.value,
            approvals=[],
            policy_version=decision.policy_version,
            issued_at=now,
            ttl=self._ticket_ttl,
        )

    def _approval_request(
        self, proposal_id: str, agent: AgentIdentity, action_digest: str, decision: Decision
    ) -> signed.Signed:
        """What the approvers' quorum will be computed from: the requirements, owner and expiry, signed."""
        return signed.sign_request(
            self._key,
            proposal_id=proposal_id,
            agent_id=agent.id,
            owner=agent.owner,
            action_digest=action_digest,
            decision=decision,
        )

    @staticmethod
    def _limit_hits(done: Future[Recorded], hits: list[Hit]) -> None:
        """Limit hits count for metrics only when the proposal they decided was recorded."""
        if not done.cancelled() and done.exception() is None:
            for hit in hits:
                limit_hit(hit.limit_id, hit.effect)

    def _notify(self, future: Future[Recorded]) -> None:
        """Tell approvers a new proposal waits for them, once it is durable; never blocks or fails the agent."""
        if future.cancelled() or future.exception() is not None or self._notifier is None:
            return
        recorded = future.result()
        if not recorded.replayed and recorded.record.state is ProposalState.PENDING_APPROVAL:
            action = recorded.record.action
            self._notifier.pending_approval(recorded.record.id, action["tool"], action["resource"])

    def get(self, caller: Caller, proposal_id: str) -> ProposalRecord:
        with self._engine.connect() as conn:
            require_active(conn, caller)
            record = store.get_proposal(conn, proposal_id, caller.agent.id)
        now = self._clock()
        if overdue(record, now):
            # Expiry is checked on every read, so the agent never sees an overdue proposal as pending.
            expired = self._writer.submit(lambda conn: expire_if_due(conn, proposal_id, now)[1]).result()
            if expired:  # committed: now it counts
                approval_finished("expired", (now - record.created_at).total_seconds())
            with self._engine.connect() as conn:
                record = store.get_proposal(conn, proposal_id, caller.agent.id)
        return record

    def cancel(self, caller: Caller, proposal_id: str) -> Future[ProposalRecord]:
        now = self._clock()

        def unit(conn: Connection) -> ProposalRecord:
            require_active(conn, caller)
            chain.lock_chain(conn)  # before the row: the lock order votes and executors use too
            cancelled = store.cancel_proposal(conn, proposal_id, caller.agent.id, now)
            chain.append(conn, events.proposal_cancelled(cancelled, now))
            return cancelled

        return self._writer.submit(unit)
