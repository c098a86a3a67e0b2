"""Circuit breakers, as the executors keep them: count outcomes, open, let one trial through, close.

A tool has two kinds of breaker, rows of ``circuit_breakers`` shared by every executor and PDP replica (the
PDP's side is pdp/execution/circuits.py):

- The **tool-wide** breaker (``agent_id = ''``) denies the tool to every agent. It opens on a streak of
  failures of the target that at least ``min_agents`` distinct agents took part in, none of them counting for
  more than ``ceil(failures / min_agents)`` of the ``failures`` it takes. An agent chooses its requests (a slow
  path, a huge page), so the failures of one agent alone never open it.
- An agent's **own** breaker (``agent_id = <agent>``) denies the tool to that agent alone, once that agent's
  own consecutive failures reach ``failures``: one agent's failures are answered by stopping that agent.

Successes: an agent's success resets its own count and takes that agent's failures out of the tool's streak;
the streak ends when ``min_agents`` distinct agents have succeeded since it began. So one agent that succeeds,
by luck or on purpose, cannot hide a target that fails for the others: it takes as many agents to end a streak
as to open the breaker.

Both kinds: open for ``cooldown``, then half-open, when exactly one execution in that scope runs as its trial
(one execution may be the trial of both); the trial's success closes the breaker, its failure opens it for
another cool-down. While a breaker is open only its trial changes it: executions already running when it opened
(stragglers) neither close it nor push its cool-down out. A trial whose action the connector rejected, or
whose worker died, proves nothing and frees the slot for another trial.

``min_agents: 1`` is the single breaker per tool of before: any agent's failures count, any success ends the
streak, and there are no per-agent breakers.

Every function here runs in a transaction that holds the audit chain's lock (executor/claims.py), so a row read
and written back cannot race another executor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, astuple, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, exists, func, insert, or_, select, update

from executor.config import BreakerSettings
from pdp.audit.chain import Event
from pdp.canonical import timestamp
from pdp.policy.duration import parse_duration
from pdp.store.models import circuit_breakers, proposals

TOOL_WIDE = ""  # the agent_id of a tool-wide breaker's row

_cb = circuit_breakers.c


def held(now: datetime) -> ColumnElement[bool]:
    """Whether a breaker holds a ``proposals`` row back: its tool's or its agent's own on the tool is open, or
    half-open with its trial running. Used by the claim and by the executor's read-only check before it."""
    return exists().where(
        _cb.tool == proposals.c.tool,
        or_(_cb.agent_id == TOOL_WIDE, _cb.agent_id == proposals.c.agent_id),
        or_(_cb.opened_until > now, _cb.trial_proposal_id.is_not(None)),
    )


@dataclass(slots=True)
class Trials:
    """The half-open breakers of the served tools, each still to give its one trial, as one claim sees them."""

    tools: set[str] = field(default_factory=set)
    agents: set[tuple[str, str]] = field(default_factory=set)
    given: set[tuple[str, str]] = field(default_factory=set)  # (tool, scope) whose trial went to a row here

    @classmethod
    def load(cls, conn: Connection, served: Iterable[str], now: datetime) -> Trials:
        rows = conn.execute(
            select(_cb.tool, _cb.agent_id).where(
                _cb.tool.in_(list(served)), _cb.opened_until <= now, _cb.trial_proposal_id.is_(None)
            )
        ).all()
        trials = cls()
        for row in rows:
            if row.agent_id == TOOL_WIDE:
                trials.tools.add(row.tool)
            else:
                trials.agents.add((row.tool, row.agent_id))
        return trials

    def _scopes(self, tool: str, agent_id: str) -> list[str]:
        own = [agent_id] if (tool, agent_id) in self.agents else []
        return ([TOOL_WIDE] if tool in self.tools else []) + own

    def given_away(self, tool: str, agent_id: str) -> bool:
        """A trial this proposal would need went to another proposal of this claim."""
        return any((tool, scope) in self.given for scope in self._scopes(tool, agent_id))

    def take(self, conn: Connection, tool: str, agent_id: str, proposal_id: str, now: datetime) -> bool:
        """Make the proposal the trial of every half-open breaker it must pass; False: not all were free."""
        taken: list[str] = []
        for scope in self._scopes(tool, agent_id):
            self.given.add((tool, scope))
            won = conn.execute(
                update(circuit_breakers)
                .where(_cb.tool == tool, _cb.agent_id == scope, _cb.trial_proposal_id.is_(None))
                .values(trial_proposal_id=proposal_id, updated_at=now)
            )
            if won.rowcount != 1:
                for scope_taken in taken:
                    _free(conn, tool, proposal_id, scope_taken)
                return False
            taken.append(scope)
        return True


def release_trial(conn: Connection, tool: str, proposal_id: str) -> None:
    """A trial that proves nothing (its worker died, its action was rejected): free the slots it held."""
    _free(conn, tool, proposal_id)


def _free(conn: Connection, tool: str, proposal_id: str, scope: str | None = None) -> None:
    where = [_cb.tool == tool, _cb.trial_proposal_id == proposal_id]
    if scope is not None:
        where.append(_cb.agent_id == scope)
    conn.execute(update(circuit_breakers).where(*where).values(trial_proposal_id=None))


@dataclass(slots=True)
class _Row:
    """One breaker row as read, changed in memory, then written back if it changed."""

    consecutive_failures: int = 0
    opened_until: datetime | None = None
    trial_proposal_id: str | None = None
    streak_failures: int = 0
    streak_succeeded: bool = False


@dataclass(frozen=True, slots=True)
class _Outcome:
    tool: str
    agent_id: str
    proposal_id: str
    ok: bool
    now: datetime
    settings: BreakerSettings
    actor: str

    @property
    def until(self) -> datetime:
        return self.now + parse_duration(self.settings.cooldown)


def record(
    conn: Connection,
    *,
    tool: str,
    agent_id: str,
    proposal_id: str,
    ok: bool,
    now: datetime,
    settings: BreakerSettings,
    actor: str,
) -> list[Event]:
    """Count one execution's outcome against the tool's breaker and the agent's own; the events to append."""
    outcome = _Outcome(tool, agent_id, proposal_id, ok, now, settings, actor)
    scopes = [TOOL_WIDE, agent_id] if agent_id != TOOL_WIDE else [TOOL_WIDE]
    found = {
        row.agent_id: _Row(*row[1:])
        for row in conn.execute(
            select(
                _cb.agent_id,
                _cb.consecutive_failures,
                _cb.opened_until,
                _cb.trial_proposal_id,
                _cb.streak_failures,
                _cb.streak_succeeded,
            ).where(_cb.tool == tool, _cb.agent_id.in_(scopes))
        )
    }
    whole = found.get(TOOL_WIDE, _Row())
    own = found.get(agent_id, _Row()) if agent_id != TOOL_WIDE else _Row()  # an agent id is never empty
    rows = [(TOOL_WIDE, whole)] + ([(agent_id, own)] if agent_id != TOOL_WIDE else [])
    before = [astuple(row) for _, row in rows]
    events = [_tool_wide(conn, outcome, whole, own)]
    if settings.min_agents > 1 and agent_id != TOOL_WIDE:
        events.append(_own(outcome, own))
    for (scope, row), was in zip(rows, before, strict=True):
        if astuple(row) == was:
            continue
        values = {**asdict(row), "updated_at": now}
        if scope in found:
            conn.execute(update(circuit_breakers).where(_cb.tool == tool, _cb.agent_id == scope).values(**values))
        else:
            conn.execute(insert(circuit_breakers).values(tool=tool, agent_id=scope, **values))
    return [event for event in events if event is not None]


def _tool_wide(conn: Connection, o: _Outcome, whole: _Row, own: _Row) -> Event | None:
    """The tool-wide breaker and its streak (``own`` is the agent's row, which holds its part in the streak)."""
    if whole.opened_until is not None:  # open or half-open: only its trial decides
        if whole.trial_proposal_id != o.proposal_id:  # a straggler: counted, nothing more
            whole.consecutive_failures += 0 if o.ok else 1
            return None
        whole.trial_proposal_id = None
        if o.ok:
            whole.opened_until = None
            _end_streak(conn, o, whole, own)
            return _closed(o, TOOL_WIDE)
        whole.consecutive_failures += 1
        whole.opened_until = o.until
        return _opened(o, TOOL_WIDE, whole, trial=o.proposal_id)
    if o.ok:
        if whole.consecutive_failures == 0:  # no streak: the common case, which writes nothing
            return None
        whole.consecutive_failures -= own.streak_failures  # an agent's success takes its own failures out
        own.streak_failures, own.streak_succeeded = 0, True
        if whole.consecutive_failures <= 0 or _succeeded(conn, o) >= o.settings.min_agents:
            _end_streak(conn, o, whole, own)
        return None
    if o.agent_id == TOOL_WIDE:  # no agent to attribute it to: it cannot count toward min_agents
        return None
    whole.consecutive_failures += 1
    own.streak_failures += 1
    members = _members(conn, o, own)
    share = math.ceil(o.settings.failures / o.settings.min_agents)  # no agent counts for more than its share
    if len(members) < o.settings.min_agents or sum(min(n, share) for n in members.values()) < o.settings.failures:
        return None
    whole.opened_until = o.until
    return _opened(o, TOOL_WIDE, whole, agents=sorted(members))


def _own(o: _Outcome, own: _Row) -> Event | None:
    """The agent's own breaker on the tool: the same states as the tool-wide one, for this agent alone."""
    if own.opened_until is not None:
        if own.trial_proposal_id != o.proposal_id:  # a straggler: counted, nothing more
            own.consecutive_failures += 0 if o.ok else 1
            return None
        own.trial_proposal_id = None
        if o.ok:
            own.consecutive_failures, own.opened_until = 0, None
            return _closed(o, o.agent_id)
        own.consecutive_failures += 1
        own.opened_until = o.until
        return _opened(o, o.agent_id, own, trial=o.proposal_id)
    if o.ok:
        own.consecutive_failures = 0
        return None
    own.consecutive_failures += 1
    if own.consecutive_failures < o.settings.failures:
        return None
    own.opened_until = o.until
    return _opened(o, o.agent_id, own)


def _others(o: _Outcome) -> list[ColumnElement[bool]]:
    return [_cb.tool == o.tool, _cb.agent_id != TOOL_WIDE, _cb.agent_id != o.agent_id]


def _succeeded(conn: Connection, o: _Outcome) -> int:
    """Distinct agents that succeeded since the tool's streak began, this one included."""
    if o.settings.min_agents <= 1:
        return 1
    query = select(func.count()).select_from(circuit_breakers).where(*_others(o), _cb.streak_succeeded.is_(True))
    return 1 + int(conn.execute(query).scalar_one())


def _members(conn: Connection, o: _Outcome, own: _Row) -> Mapping[str, int]:
    """The agents with failures in the tool's streak, and how many each."""
    rows = conn.execute(select(_cb.agent_id, _cb.streak_failures).where(*_others(o), _cb.streak_failures > 0))
    return {**{row.agent_id: row.streak_failures for row in rows}, o.agent_id: own.streak_failures}


def _end_streak(conn: Connection, o: _Outcome, whole: _Row, own: _Row) -> None:
    whole.consecutive_failures = 0
    own.streak_failures, own.streak_succeeded = 0, False
    conn.execute(
        update(circuit_breakers)
        .where(*_others(o), or_(_cb.streak_failures > 0, _cb.streak_succeeded.is_(True)))
        .values(streak_failures=0, streak_succeeded=False, updated_at=o.now)
    )


def _scope(o: _Outcome, agent_id: str) -> dict[str, Any]:
    return {"tool": o.tool, "scope": "agent", "agent_id": agent_id} if agent_id else {"tool": o.tool, "scope": "tool"}


def _opened(
    o: _Outcome, agent_id: str, row: _Row, *, trial: str | None = None, agents: list[str] | None = None
) -> Event:
    data = {**_scope(o, agent_id), "consecutive_failures": row.consecutive_failures}
    if agents is not None:
        data["agents"] = agents  # whose failures opened it
    if trial is not None:
        data["trial_proposal_id"] = trial  # the half-open trial that failed
    data["until"] = timestamp(row.opened_until) if row.opened_until is not None else None
    return Event("circuit.opened", o.actor, o.now, agent_id=agent_id or None, data=data)


def _closed(o: _Outcome, agent_id: str) -> Event:
    data = {**_scope(o, agent_id), "trial_proposal_id": o.proposal_id}
    return Event("circuit.closed", o.actor, o.now, agent_id=agent_id or None, data=data)
