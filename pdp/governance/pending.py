"""The cap on one agent's proposals pending approval (``PDP_MAX_PENDING_PER_AGENT``).

Approvers' attention is the scarce resource, and every pending proposal (params up to 64 KiB each) waits in
the database and in approvers' lists until someone decides it or it expires. Without a cap, one agent can
queue tens of thousands. So a proposal that would become pending while its agent already has the maximum
pending is **recorded and denied** (reason ``limit:max_pending_per_agent``, ``retry_after_seconds`` = until the
agent's earliest pending proposal expires), like any governance limit (DESIGN §4 point 4, §8): a deny is an
answer the agent can read, and auditors see the attempt. Counted exactly inside the recording transaction,
after the audit chain's lock, so replicas cannot both admit the last slot.
"""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import datetime

from sqlalchemy import ColumnElement, Connection, bindparam, func, literal_column, select

from pdp.governance.limits import Governed, Hit
from pdp.policy.decision import Outcome, Reason
from pdp.proposals.states import ProposalState
from pdp.store.models import proposals

LIMIT_ID = "max_pending_per_agent"
DEFAULT_MAX_PENDING = 1000
# A literal, as in the partial index ix_proposals_pending_agent (migration 0007), so the planner can use it.
_PENDING: ColumnElement[str] = literal_column(f"'{ProposalState.PENDING_APPROVAL.value}'")
_LIVE = (
    proposals.c.agent_id == bindparam("agent_id"),
    proposals.c.state == _PENDING,
    proposals.c.approval_expires_at > bindparam("now"),
)
# Counts at most `cap` rows: the cost is bounded by the cap, not by how many the agent has.
_COUNT = select(func.count()).select_from(select(proposals.c.id).where(*_LIVE).limit(bindparam("cap")).subquery())
_EARLIEST = select(func.min(proposals.c.approval_expires_at)).where(*_LIVE)


def cap_pending(conn: Connection, agent_id: str, now: datetime, governed: Governed, max_pending: int) -> None:
    """Deny ``governed``'s decision in place when it would make the agent's pending proposals exceed the cap."""
    if governed.decision.outcome is not Outcome.NEEDS_APPROVAL:
        return
    params = {"agent_id": agent_id, "now": now, "cap": max_pending}
    pending = int(conn.execute(_COUNT, params).scalar_one())
    if pending < max_pending:
        return
    earliest: datetime | None = conn.execute(_EARLIEST, params).scalar()
    retry = max(1, math.ceil((earliest - now).total_seconds())) if earliest is not None else 60
    reason = Reason(
        f"limit:{LIMIT_ID}",
        Outcome.DENY,
        f"agent {agent_id} already has {pending} proposals pending approval, the most one agent may have "
        f"({LIMIT_ID} = {max_pending}); propose again once some are decided, expire or are cancelled",
    )
    decision = governed.decision
    governed.decision = replace(
        decision,
        outcome=Outcome.DENY,
        reasons=(reason, *decision.reasons),
        retry_after_seconds=max(retry, decision.retry_after_seconds),
        approval_requirements=(),
        approval_expires_at=None,
    )
    governed.limited_by = governed.limited_by or LIMIT_ID
    governed.charged_usd = 0.0
    governed.hits.append(Hit(LIMIT_ID, "deny"))
