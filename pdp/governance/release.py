"""A human lifts a retry-storm quarantine (`pdp agents release ID` or the admin API); audited."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection, select

from pdp.audit import chain
from pdp.audit.chain import Event
from pdp.errors import FailedPrecondition, NotFound
from pdp.governance import store
from pdp.store.models import agents


def release_agent(conn: Connection, agent_id: str, actor: str, now: datetime) -> None:
    """Lift ``agent_id``'s active quarantine in the caller's transaction; NotFound / FailedPrecondition otherwise."""
    chain.lock_chain(conn)
    if conn.execute(select(agents.c.id).where(agents.c.id == agent_id)).first() is None:
        raise NotFound(f"agent {agent_id!r} does not exist")
    if not store.release(conn, agent_id, actor, now):
        raise FailedPrecondition(f"agent {agent_id!r} is not quarantined")
    chain.append(
        conn,
        Event(
            type="agent.released",
            actor=actor,
            occurred_at=now,
            agent_id=agent_id,
            data={"agent_id": agent_id, "released_by": actor},
        ),
    )
