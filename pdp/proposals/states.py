"""Proposal states and which decision outcome starts where (DESIGN §5)."""

from __future__ import annotations

from enum import Enum

from pdp.policy.decision import Outcome


class ProposalState(Enum):
    DENIED = "DENIED"
    PENDING_APPROVAL = "PENDING_APPROVAL"
    APPROVED = "APPROVED"
    REJECTED = "REJECTED"
    EXPIRED = "EXPIRED"
    CANCELLED = "CANCELLED"
    EXECUTING = "EXECUTING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    UNKNOWN = "UNKNOWN"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset(
    {
        ProposalState.DENIED,
        ProposalState.REJECTED,
        ProposalState.EXPIRED,
        ProposalState.CANCELLED,
        ProposalState.SUCCEEDED,
        ProposalState.FAILED,
        ProposalState.UNKNOWN,
    }
)

INITIAL_STATE = {
    Outcome.DENY: ProposalState.DENIED,
    Outcome.NEEDS_APPROVAL: ProposalState.PENDING_APPROVAL,
    Outcome.ALLOW: ProposalState.APPROVED,
}
