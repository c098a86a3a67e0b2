"""Quorum and eligibility, as pure functions of the decision's requirements and the votes so far.

DESIGN §4 point 3: every ApprovalRequirement must be met; each counts the distinct approvers who
belong to one of its groups (membership when they voted). One approver in the groups of two
requirements counts toward both.

Approver ids, owners and group names are compared by :func:`~pdp.identity.names.identity_key`, never as
raw strings: ``Alice`` and `` alice`` are the owner ``alice`` (no self-approval) and one approver (one vote).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pdp.identity.approvers import Approver
from pdp.identity.names import identity_key
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


def _keys(names: Iterable[str]) -> set[str]:
    return {identity_key(name) for name in names}


def progress(requirements: Sequence[ApprovalRequirement], votes: Iterable[Vote]) -> list[Progress]:
    approving = [(identity_key(v.approver_id), _keys(v.groups)) for v in votes if v.verdict == APPROVE]
    return [
        Progress(req, len({who for who, groups in approving if groups & _keys(req.groups)})) for req in requirements
    ]


def quorum_met(requirements: Sequence[ApprovalRequirement], votes: Iterable[Vote]) -> bool:
    """Every requirement met. No requirements means nothing can approve it (fail closed)."""
    return bool(requirements) and all(p.met for p in progress(requirements, votes))


def ineligible(
    approver: Approver, owner: str, requirements: Sequence[ApprovalRequirement], votes: Iterable[Vote]
) -> str | None:
    """Why ``approver`` may not vote on this proposal, or None when they may."""
    me = identity_key(approver.id)
    if me == identity_key(owner):
        return "separation of duties: the agent's owner may not decide its proposals"
    if any(identity_key(v.approver_id) == me for v in votes):
        return "you have already voted on this proposal"
    groups = {g for req in requirements for g in req.groups}
    if not _keys(approver.groups) & _keys(groups):
        return f"not in a required group ({', '.join(sorted(groups)) or 'none'})"
    return None
