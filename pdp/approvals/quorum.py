"""Quorum and eligibility, as pure functions of the decision's requirements and the votes so far.

DESIGN §4 point 3: every ApprovalRequirement must be met; each counts the distinct approvers who
belong to one of its groups (membership when they voted). One approver in the groups of two
requirements counts toward both.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pdp.identity.approvers import Approver
from pdp.policy.decision import ApprovalRequirement

APPROVE = "approve"
REJECT = "reject"


@dataclass(frozen=True, slots=True)
class Vote:
    approver_id: str
    groups: frozenset[str]
    verdict: str


@dataclass(frozen=True, slots=True)
class Progress:
    requirement: ApprovalRequirement
    approvals: int

    @property
    def met(self) -> bool:
        return self.approvals >= self.requirement.min_approvals


def progress(requirements: Sequence[ApprovalRequirement], votes: Iterable[Vote]) -> list[Progress]:
    approving = [v for v in votes if v.verdict == APPROVE]
    return [
        Progress(req, len({v.approver_id for v in approving if v.groups & set(req.groups)})) for req in requirements
    ]


def quorum_met(requirements: Sequence[ApprovalRequirement], votes: Iterable[Vote]) -> bool:
    """Every requirement met. No requirements means nothing can approve it (fail closed)."""
    return bool(requirements) and all(p.met for p in progress(requirements, votes))


def ineligible(
    approver: Approver, owner: str, requirements: Sequence[ApprovalRequirement], votes: Iterable[Vote]
) -> str | None:
    """Why ``approver`` may not vote on this proposal, or None when they may."""
    if approver.id == owner:
        return "separation of duties: the agent's owner may not decide its proposals"
    if any(v.approver_id == approver.id for v in votes):
        return "you have already voted on this proposal"
    groups = {g for req in requirements for g in req.groups}
    if not approver.groups & groups:
        return f"not in a required group ({', '.join(sorted(groups)) or 'none'})"
    return None
