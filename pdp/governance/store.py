"""The database side of limits: counters, identical denials, quarantines. Called inside the proposal's transaction."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, bindparam, case, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from pdp.store.models import limit_counters, proposals, quarantines


def _upsert(dialect: str) -> Any:
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(limit_counters).values(
        limit_id=bindparam("limit_id"),
        scope_key=bindparam("scope_key"),
        window_start=bindparam("window_start"),
        count=bindparam("count"),
        amount=bindparam("amount"),
    )
    excluded = statement.excluded
    return statement.on_conflict_do_update(
        index_elements=[limit_counters.c.limit_id, limit_counters.c.scope_key, limit_counters.c.window_start],
        set_={"count": limit_counters.c.count + excluded.count, "amount": limit_counters.c.amount + excluded.amount},
    ).returning(limit_counters.c.count, limit_counters.c.amount)


# Built once: one statement both counts and reads the new total (the writer thread is the bottleneck).
_COUNT = {dialect: _upsert(dialect) for dialect in ("postgresql", "sqlite")}


def add(
    conn: Connection, limit_id: str, key: str, start: datetime, *, count: int = 0, amount: float = 0.0
) -> tuple[int, float]:
    """Add to a window's counter and return its new (count, amount), in one statement."""
    row = conn.execute(
        _COUNT[conn.dialect.name],
        {"limit_id": limit_id, "scope_key": key, "window_start": start, "count": count, "amount": amount},
    ).one()
    return int(row[0]), float(row[1])


def prune(conn: Connection, before: datetime) -> int:
    """Forget windows that ended long ago (the sweeper calls this)."""
    return conn.execute(limit_counters.delete().where(limit_counters.c.window_start < before)).rowcount


def identical_denials(conn: Connection, agent_id: str, digest: str, since: datetime) -> int:
    """Denied proposals of this agent with this exact action since ``since``, not counting quarantine denials."""
    query = select(func.count()).where(
        proposals.c.agent_id == agent_id,
        proposals.c.created_at >= since,
        proposals.c.action_digest == digest,
        proposals.c.outcome == "deny",
        or_(proposals.c.limited_by.is_(None), proposals.c.limited_by != "quarantine"),
    )
    return int(conn.execute(query).scalar_one())


@dataclass(frozen=True, slots=True)
class QuarantineState:
    active: tuple[datetime, str] | None  # (until, limit id) while quarantined
    released_at: datetime | None  # the last human release: retry storms count from there


_QUARANTINE = select(quarantines.c.until, quarantines.c.limit_id, quarantines.c.released_at).where(
    quarantines.c.agent_id == bindparam("agent_id")
)


def quarantine_state(conn: Connection, agent_id: str, now: datetime) -> QuarantineState:
    row = conn.execute(_QUARANTINE, {"agent_id": agent_id}).first()
    if row is None:
        return QuarantineState(None, None)
    active = (row.until, row.limit_id) if row.released_at is None and row.until > now else None
    return QuarantineState(active, row.released_at)


def quarantine(conn: Connection, agent_id: str, limit_id: str, until: datetime, reason: str, now: datetime) -> None:
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    values = {"limit_id": limit_id, "until": until, "reason": reason, "created_at": now, "released_at": None}
    statement = insert(quarantines).values(agent_id=agent_id, released_by=None, **values)
    conn.execute(
        statement.on_conflict_do_update(index_elements=[quarantines.c.agent_id], set_={**values, "released_by": None})
    )


def release(conn: Connection, agent_id: str, by: str, now: datetime) -> bool:
    """Lift an active quarantine; False when the agent is not quarantined."""
    done = conn.execute(
        update(quarantines)
        .where(and_(quarantines.c.agent_id == agent_id, quarantines.c.released_at.is_(None), quarantines.c.until > now))
        .values(released_at=now, released_by=by)
    )
    return done.rowcount > 0


def day_start(now: datetime) -> datetime:
    """Midnight UTC of ``now``'s day: budgets and ``usage.agent.spend_today_usd`` count from here."""
    return now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def usage(conn: Connection, agent_id: str, now: datetime) -> dict[str, Any]:
    """What CEL sees as ``usage``: the agent's proposals in the last minute and its spend today (UTC), one query."""
    minute_ago, today = now - timedelta(minutes=1), day_start(now)
    created = proposals.c.created_at
    row = conn.execute(
        select(
            func.coalesce(func.sum(case((created > minute_ago, 1), else_=0)), 0),
            func.coalesce(func.sum(case((created >= today, proposals.c.charged_usd), else_=0.0)), 0.0),
        ).where(proposals.c.agent_id == agent_id, created >= min(minute_ago, today))
    ).one()
    return {"agent": {"proposals_last_minute": int(row[0]), "spend_today_usd": float(row[1])}}
