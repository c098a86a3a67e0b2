"""What the engine returns: an outcome that explains itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any

from pdp.canonical import timestamp


class Outcome(Enum):
    ALLOW = "allow"
    DENY = "deny"
    NEEDS_APPROVAL = "needs_approval"

    @property
    def severity(self) -> int:
        """deny > needs_approval > allow: the higher wins when effects combine."""
        return _SEVERITY[self]


_SEVERITY = {Outcome.ALLOW: 0, Outcome.NEEDS_APPROVAL: 1, Outcome.DENY: 2}


class Tier(Enum):
    AI_WRITABLE = "ai_writable"
    APPROVAL_REQUIRED = "approval_required"
    HUMAN_ONLY = "human_only"

    @property
    def restriction(self) -> int:
        """The most restrictive matching boundary wins."""
        return _RESTRICTION[self]


_RESTRICTION = {Tier.AI_WRITABLE: 0, Tier.APPROVAL_REQUIRED: 1, Tier.HUMAN_ONLY: 2}


@dataclass(frozen=True, slots=True)
class Reason:
    rule_id: str
    effect: Outcome
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"rule_id": self.rule_id, "effect": self.effect.value, "message": self.message}


@dataclass(frozen=True, slots=True)
class ApprovalRequirement:
    source: str
    groups: tuple[str, ...]
    min_approvals: int

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "groups": list(self.groups), "min_approvals": self.min_approvals}


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    reasons: tuple[Reason, ...]
    policy_version: str
    boundary: str = ""
    tier: str = ""
    retry_after_seconds: int = 0
    approval_requirements: tuple[ApprovalRequirement, ...] = ()
    approval_expires_at: datetime | None = None
    # Rules whose condition matched, in bundle order; kept for tests, metrics and audit.
    matched_rules: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """Canonical, JSON-ready form stored with the proposal (and later in the audit body)."""
        return {
            "outcome": self.outcome.value,
            "reasons": [r.to_dict() for r in self.reasons],
            "boundary": self.boundary,
            "tier": self.tier,
            "policy_version": self.policy_version,
            "retry_after_seconds": self.retry_after_seconds,
            "approval_requirements": [a.to_dict() for a in self.approval_requirements],
            "approval_expires_at": (
                timestamp(self.approval_expires_at) if self.approval_expires_at is not None else None
            ),
            "matched_rules": list(self.matched_rules),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Decision:
        expires = data.get("approval_expires_at")
        return cls(
            outcome=Outcome(data["outcome"]),
            reasons=tuple(Reason(r["rule_id"], Outcome(r["effect"]), r["message"]) for r in data.get("reasons", [])),
            policy_version=data.get("policy_version", ""),
            boundary=data.get("boundary", ""),
            tier=data.get("tier", ""),
            retry_after_seconds=int(data.get("retry_after_seconds", 0)),
            approval_requirements=tuple(
                ApprovalRequirement(a["source"], tuple(a["groups"]), int(a["min_approvals"]))
                for a in data.get("approval_requirements", [])
            ),
            approval_expires_at=datetime.fromisoformat(expires) if expires else None,
            matched_rules=tuple(data.get("matched_rules", [])),
        )
