"""Circuit breakers: the executors open them (executor/breakers.py), the PDP denies while one is open.

They live in the database (``circuit_breakers``) so every executor and PDP replica sees the same state: per
tool, a tool-wide breaker (``agent_id = ''``) that denies the tool to every agent, and per agent on a tool,
that agent's own breaker, which denies the tool to that agent alone. Closed: no row, or a row without
``opened_until``. Open: ``now < opened_until``; the PDP denies with ``retry_after_seconds``. Half-open:
``opened_until`` has passed; the PDP admits proposals again and the executors let exactly one execution in
that scope through as the trial, whose outcome closes the breaker or opens it for another cool-down.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, replace
from datetime import datetime

from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError

from pdp.policy.decision import Decision, Outcome, Reason
from pdp.store.models import circuit_breakers

log = logging.getLogger(__name__)

REASON = "circuit.open"
REFRESH_SECONDS = 0.5


TOOL_WIDE = ""  # the agent_id of a tool-wide breaker's row


@dataclass(frozen=True, slots=True)
class OpenBreaker:
    """A breaker that may deny a tool: the tool-wide one, or (``agent_id``) that agent's own."""

    until: datetime
    agent_id: str = TOOL_WIDE


def deny_if_open(decision: Decision, tool: str, breaker: OpenBreaker | None, now: datetime) -> Decision:
    """An open breaker turns allow and needs-approval into deny with a retry hint; deny stays deny."""
    if breaker is None or now >= breaker.until or decision.outcome is Outcome.DENY:
        return decision
    retry_after = max(1, math.ceil((breaker.until - now).total_seconds()))
    if breaker.agent_id == TOOL_WIDE:
        message = f"tool {tool} is failing: its circuit breaker is open; retry after {retry_after}s"
    else:
        message = (
            f"tool {tool} kept failing for this agent: this agent's own circuit breaker for it is open "
            f"(other agents are not affected); retry after {retry_after}s"
        )
    reason = Reason(REASON, Outcome.DENY, message)
    return replace(
        decision,
        outcome=Outcome.DENY,
        reasons=(reason, *decision.reasons),
        retry_after_seconds=retry_after,
        approval_requirements=(),
        approval_expires_at=None,
    )


class CircuitBoard:
    """The PDP's view of the breakers not closed, refreshed from the database by a background thread.

    A proposal is decided against a view at most ``REFRESH_SECONDS`` old, which keeps a database
    round trip off every Propose. When the database cannot be read, the last view stays.
    """

    def __init__(self, engine: Engine, refresh: float = REFRESH_SECONDS) -> None:
        self._engine = engine
        self._refresh = refresh
        self._open: dict[tuple[str, str], datetime] = {}  # (tool, agent_id or '') -> opened_until
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pdp-circuits", daemon=True)

    def start(self) -> None:
        self.load()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def breaker(self, tool: str, agent_id: str) -> OpenBreaker | None:
        """Of the tool's breaker and the agent's own on it, the one that denies the agent longest."""
        whole = self._open.get((tool, TOOL_WIDE))
        own = self._open.get((tool, agent_id)) if agent_id != TOOL_WIDE else None
        if own is not None and (whole is None or own > whole):
            return OpenBreaker(own, agent_id)
        return None if whole is None else OpenBreaker(whole)

    def load(self) -> None:
        query = select(circuit_breakers.c.tool, circuit_breakers.c.agent_id, circuit_breakers.c.opened_until).where(
            circuit_breakers.c.opened_until.is_not(None)
        )
        with self._engine.connect() as conn:
            self._open = {(row.tool, row.agent_id): row.opened_until for row in conn.execute(query)}

    def _run(self) -> None:
        while not self._stop.wait(self._refresh):
            try:
                self.load()
            except SQLAlchemyError:
                log.warning("cannot refresh circuit breakers; keeping the last view", exc_info=True)
