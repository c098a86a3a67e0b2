"""Gauges computed when Prometheus scrapes: state that lives in the database or in the active bundle.

Nothing on the request path maintains them, so they cannot drift from the truth and cost nothing between
scrapes. Each scrape runs a few indexed queries on its own connection. When the database cannot be read,
the gauge is left out of that scrape (an absent series, which alerts can see) rather than reported as 0.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Connection, Engine, func, or_, select
from sqlalchemy.exc import SQLAlchemyError

from pdp.policy.bundle import ActiveBundle
from pdp.proposals.states import ProposalState
from pdp.store.models import circuit_breakers, proposals, quarantines

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _breakers(conn: Connection, now: datetime) -> list[GaugeMetricFamily]:
    """The tool-wide breakers, and per tool how many agents their own breaker denies it (no agent ids in labels)."""
    tool_wide = GaugeMetricFamily(
        "pdp_circuit_breaker_open", "1 while the tool's circuit breaker is open (executions failing)", labels=["tool"]
    )
    agents = GaugeMetricFamily(
        "pdp_circuit_breaker_agents_open", "Agents that their own circuit breaker denies the tool", labels=["tool"]
    )
    cb = circuit_breakers.c
    rows = conn.execute(
        select(cb.tool, cb.agent_id, cb.opened_until).where(or_(cb.agent_id == "", cb.opened_until.is_not(None)))
    ).all()
    denied: dict[str, int] = {}
    for tool, agent_id, opened_until in rows:
        is_open = opened_until is not None and opened_until > now
        if agent_id == "":
            tool_wide.add_metric([tool], 1.0 if is_open else 0.0)
            denied.setdefault(tool, 0)
        else:
            denied[tool] = denied.get(tool, 0) + is_open
    for tool, count in sorted(denied.items()):
        agents.add_metric([tool], float(count))
    return [tool_wide, agents]


class PdpState(Collector):
    """pdp_policy_info, pdp_pending_approvals, pdp_quarantined_agents and the breaker gauges of one server."""

    def __init__(self, engine: Engine, bundles: ActiveBundle, clock: Clock = _utc_now) -> None:
        self._engine = engine
        self._bundles = bundles
        self._clock = clock

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "pdp_policy_info", "The active policy bundle's version (value 1)", labels=["policy_version"]
        )
        info.add_metric([self._bundles.current.policy_version], 1.0)
        yield info
        now = self._clock()
        try:
            with self._engine.connect() as conn:
                pending = conn.execute(
                    select(func.count())
                    .select_from(proposals)
                    .where(proposals.c.state == ProposalState.PENDING_APPROVAL.value)
                ).scalar_one()
                breakers = _breakers(conn, now)
                quarantined = conn.execute(
                    select(func.count())
                    .select_from(quarantines)
                    .where(quarantines.c.released_at.is_(None), quarantines.c.until > now)
                ).scalar_one()
        except SQLAlchemyError:  # left out, not reported as 0: a scrape must not claim what it could not read
            log.warning("metrics: cannot read pending approvals, breakers and quarantines", exc_info=True)
        else:
            yield GaugeMetricFamily("pdp_pending_approvals", "Proposals waiting for approval", value=float(pending))
            yield from breakers
            yield GaugeMetricFamily(
                "pdp_quarantined_agents", "Agents quarantined by a retry-storm limit", value=float(quarantined)
            )


class ExecutorState(Collector):
    """pdp_executor_inflight and the breaker gauges, as one executor sees them."""

    def __init__(self, engine: Engine, busy: Callable[[], int], clock: Clock = _utc_now) -> None:
        self._engine = engine
        self._busy = busy
        self._clock = clock

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("pdp_executor_inflight", "Executions running in this executor", value=self._busy())
        try:
            with self._engine.connect() as conn:
                breakers = _breakers(conn, self._clock())
        except SQLAlchemyError:
            log.warning("metrics: cannot read circuit breakers", exc_info=True)
        else:
            yield from breakers
