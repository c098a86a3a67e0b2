"""Per-tool circuit breakers: the executor opens them, the PDP denies the tool while one is open.

The breaker lives in the database (``circuit_breakers``) so every executor and PDP replica sees the
same state. Closed: no row, or a row without ``opened_until``. Open: ``now < opened_until``; the PDP
denies the tool with ``retry_after_seconds``. Half-open: ``opened_until`` has passed; the PDP admits
proposals again and the executor lets exactly one execution through as the trial, whose outcome
closes the breaker or opens it for another cool-down.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import replace
from datetime import datetime

from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError

from pdp.policy.decision import Decision, Outcome, Reason
from pdp.store.models import circuit_breakers

log = logging.getLogger(__name__)

REASON = "circuit.open"
REFRESH_SECONDS = 0.5


def deny_if_open(decision: Decision, tool: str, opened_until: datetime | None, now: datetime) -> Decision:
    """An open breaker turns allow and needs-approval into deny with a retry hint; deny stays deny."""
    if opened_until is None or now >= opened_until or decision.outcome is Outcome.DENY:
        return decision
    retry_after = max(1, math.ceil((opened_until - now).total_seconds()))
    reason = Reason(
        REASON,
        Outcome.DENY,
        f"tool {tool} is failing: its circuit breaker is open; retry after {retry_after}s",
    )
    return replace(
        decision,
        outcome=Outcome.DENY,
        reasons=(reason, *decision.reasons),
        retry_after_seconds=retry_after,
        approval_requirements=(),
        approval_expires_at=None,
    )


class CircuitBoard:
    """The PDP's view of open breakers, refreshed from the database by a background thread.

    A proposal is decided against a view at most ``REFRESH_SECONDS`` old, which keeps a database
    round trip off every Propose. When the database cannot be read, the last view stays.
    """

    def __init__(self, engine: Engine, refresh: float = REFRESH_SECONDS) -> None:
        self._engine = engine
        self._refresh = refresh
        self._open: dict[str, datetime] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pdp-circuits", daemon=True)

    def start(self) -> None:
        self.load()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def opened_until(self, tool: str) -> datetime | None:
        return self._open.get(tool)

    def load(self) -> None:
        query = select(circuit_breakers.c.tool, circuit_breakers.c.opened_until).where(
            circuit_breakers.c.opened_until.is_not(None)
        )
        with self._engine.connect() as conn:
            self._open = {row.tool: row.opened_until for row in conn.execute(query)}

    def _run(self) -> None:
        while not self._stop.wait(self._refresh):
            try:
                self.load()
            except SQLAlchemyError:
                log.warning("cannot refresh circuit breakers; keeping the last view", exc_info=True)
