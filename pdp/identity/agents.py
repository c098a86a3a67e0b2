"""Agent identities in the database: add, list, revoke, authenticate."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, Engine, insert, select, update

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


def authenticate(conn: Connection, token: str) -> AgentIdentity:
    """The agent a token belongs to, read from the database on every call so revocation is immediate."""
    row = conn.execute(
        select(agents.c.id, agents.c.owner, agents.c.roles, agents.c.labels).where(
            agents.c.token_hash == token_hash(token), agents.c.revoked_at.is_(None)
        )
    ).first()
    if row is None:
        raise Unauthenticated("unknown or revoked token")
    return AgentIdentity(row.id, row.owner, tuple(row.roles), dict(row.labels))
