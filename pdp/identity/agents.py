"""Agent identities in the database: add, list, revoke, authenticate."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, Engine, bindparam, insert, select, update

from pdp.errors import AlreadyExists, NotFound, Unauthenticated
from pdp.identity.tokens import new_token, token_hash
from pdp.policy.engine import AgentIdentity
from pdp.store.models import agents


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
    """Create an agent and return its token — the only time the token exists in clear."""
    token = new_token()
    with engine.begin() as conn:
        if conn.execute(select(agents.c.id).where(agents.c.id == agent_id)).first() is not None:
            raise AlreadyExists(f"agent {agent_id!r} already exists")
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


def revoke_agent(engine: Engine, agent_id: str) -> None:
    with engine.begin() as conn:
        done = conn.execute(
            update(agents)
            .where(agents.c.id == agent_id, agents.c.revoked_at.is_(None))
            .values(revoked_at=datetime.now(UTC))
        )
        if done.rowcount == 0:
            exists = conn.execute(select(agents.c.id).where(agents.c.id == agent_id)).first()
            if exists is None:
                raise NotFound(f"agent {agent_id!r} does not exist")


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
