"""Agent identities in the database: add, list, revoke, authenticate.

Ids and owners follow :mod:`pdp.identity.names`. Revoking an agent also stops the work it already has in the
system: its proposals waiting for approval, and its approved ones not yet taken by an executor, are
cancelled in the same transaction (see :func:`revoke_agent`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, Engine, bindparam, insert, select, update

from pdp.audit import chain, events
from pdp.errors import AlreadyExists, NotFound, Unauthenticated
from pdp.identity.names import check_id, colliding
from pdp.identity.tokens import new_token, token_hash
from pdp.policy.engine import AgentIdentity
from pdp.proposals.states import ProposalState
from pdp.store.database import write_transaction
from pdp.store.models import agents, proposals


@dataclass(frozen=True, slots=True)
class AgentRecord:
    identity: AgentIdentity
    created_at: datetime
    revoked_at: datetime | None


def add_agent(
    engine: Engine,
    agent_id: str,
    owner: str,
    roles: tuple[str, ...] = (),
    labels: dict[str, str] | None = None,
) -> str:
    """Create an agent and return its token — the only time the token exists in clear.

    The id and the owner must be canonical names (:mod:`pdp.identity.names`); an id that only differs from an
    existing one in case, width or invisible characters is refused like an exact duplicate.
    """
    check_id("id", agent_id)
    check_id("owner", owner)
    token = new_token()
    with write_transaction(engine) as conn:
        existing = conn.execute(select(agents.c.id)).scalars()
        same = colliding(agent_id, existing)
        if same is not None:
            taken = "already exists" if same == agent_id else f"would be confused with the existing agent {same!r}"
            raise AlreadyExists(f"agent {agent_id!r} {taken}")
        conn.execute(
            insert(agents).values(
                id=agent_id,
                owner=owner,
                roles=list(roles),
                labels=dict(labels or {}),
                token_hash=token_hash(token),
                created_at=datetime.now(UTC),
                revoked_at=None,
            )
        )
    return token


def list_agents(engine: Engine) -> list[AgentRecord]:
    with engine.connect() as conn:
        rows = conn.execute(select(agents).order_by(agents.c.id)).mappings().all()
    return [
        AgentRecord(
            AgentIdentity(r["id"], r["owner"], tuple(r["roles"]), dict(r["labels"])),
            r["created_at"],
            r["revoked_at"],
        )
        for r in rows
    ]


@dataclass(frozen=True, slots=True)
class Revocation:
    agent_id: str
    revoked_at: datetime
    # False when the agent was already revoked (its leftover proposals are still cancelled).
    newly_revoked: bool
    cancelled: tuple[str, ...]


# Work a revoked agent must not get done: waiting for approvers, or approved and waiting for an executor.
# EXECUTING is already with a connector; it finishes (or is reconciled) like any other.
STOPPED_BY_REVOCATION = (ProposalState.PENDING_APPROVAL, ProposalState.APPROVED)
REVOKED_REASON = "agent revoked"


def revoke_agent(engine: Engine, agent_id: str, actor: str = "operator", now: datetime | None = None) -> Revocation:
    """Revoke the agent and cancel its pending and approved-not-executing proposals, in one transaction.

    Takes the audit chain's lock first, as every writer does, so no vote and no executor claim interleaves:
    once this commits, nothing the agent proposed can still be approved or start executing. Appends
    ``agent.revoked`` and one ``proposal.cancelled`` (``reason: agent revoked``, ``actor``) per proposal.
    Revoking a revoked agent keeps its first revocation time and cancels anything still left.
    """
    now = now or datetime.now(UTC)
    with write_transaction(engine) as conn:
        chain.lock_chain(conn)
        # A write first: on SQLite it takes the write lock before any read, so no snapshot goes stale.
        newly = conn.execute(
            update(agents).where(agents.c.id == agent_id, agents.c.revoked_at.is_(None)).values(revoked_at=now)
        ).rowcount
        since: datetime | None = conn.execute(select(agents.c.revoked_at).where(agents.c.id == agent_id)).scalar()
        if since is None:
            raise NotFound(f"agent {agent_id!r} does not exist")
        if newly:
            chain.append(conn, events.agent_revoked(agent_id, actor, now))
        stopped = conn.execute(
            select(proposals.c.id, proposals.c.state, proposals.c.policy_version)
            .where(
                proposals.c.agent_id == agent_id,
                proposals.c.state.in_([state.value for state in STOPPED_BY_REVOCATION]),
            )
            .order_by(proposals.c.created_at, proposals.c.id)
        ).all()
        for proposal in stopped:
            conn.execute(
                update(proposals)
                .where(proposals.c.id == proposal.id)
                .values(state=ProposalState.CANCELLED.value, updated_at=now)
            )
            chain.append(
                conn,
                events.proposal_cancelled_by(
                    proposal.id,
                    agent_id,
                    proposal.policy_version,
                    from_state=proposal.state,
                    actor=actor,
                    at=now,
                    reason=REVOKED_REASON,
                ),
            )
    return Revocation(agent_id, since, bool(newly), tuple(p.id for p in stopped))


def revoked_at(conn: Connection, agent_id: str) -> datetime | None:
    """When the agent was revoked (None while it is active or unknown), in the caller's transaction."""
    value: datetime | None = conn.execute(select(agents.c.revoked_at).where(agents.c.id == agent_id)).scalar()
    return value


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated agent and the digest of the token it presented."""

    agent: AgentIdentity
    token_hash: str


_BY_TOKEN = select(agents.c.id, agents.c.owner, agents.c.roles, agents.c.labels).where(
    agents.c.token_hash == bindparam("token_hash"), agents.c.revoked_at.is_(None)
)
_ACTIVE = select(agents.c.id).where(
    agents.c.id == bindparam("agent_id"),
    agents.c.token_hash == bindparam("token_hash"),
    agents.c.revoked_at.is_(None),
)


def authenticate(conn: Connection, token: str) -> Caller:
    """The agent a token belongs to; Unauthenticated if the token is unknown or revoked."""
    digest = token_hash(token)
    row = conn.execute(_BY_TOKEN, {"token_hash": digest}).first()
    if row is None:
        raise Unauthenticated("unknown or revoked token")
    return Caller(AgentIdentity(row.id, row.owner, tuple(row.roles), dict(row.labels)), digest)


def require_active(conn: Connection, caller: Caller) -> None:
    """Raise Unauthenticated unless the caller's token is still valid, inside the caller's own transaction.

    Every database operation an agent triggers runs this first, so a revocation takes effect on the
    agent's next request even when its identity came from :class:`TokenCache`.
    """
    if conn.execute(_ACTIVE, {"agent_id": caller.agent.id, "token_hash": caller.token_hash}).first() is None:
        raise Unauthenticated("unknown or revoked token")


class TokenCache:
    """Token digest → identity, so the hot path skips a database round trip to learn who is calling.

    Safe because an agent's identity never changes after creation (only revocation does, and
    :func:`require_active` checks that in every transaction). Unknown tokens are never cached.
    """

    def __init__(self, max_entries: int = 10_000) -> None:
        self._entries: OrderedDict[str, Caller] = OrderedDict()
        self._max = max_entries
        self._lock = threading.Lock()

    def get(self, token: str) -> Caller | None:
        digest = token_hash(token)
        with self._lock:
            caller = self._entries.get(digest)
            if caller is not None:
                self._entries.move_to_end(digest)
            return caller

    def put(self, caller: Caller) -> None:
        with self._lock:
            self._entries[caller.token_hash] = caller
            self._entries.move_to_end(caller.token_hash)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)
