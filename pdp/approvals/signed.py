"""What the PDP signs about approvals: each needs-approval decision's request, and each vote it accepts.

    signature = Ed25519( domain tag || canonical JSON of the payload )

    request  b"agent-pdp/approval-request/v1\\n"  {proposal_id, agent_id, owner, action_digest,
                                                  requirements: [{source, groups, min_approvals}],
                                                  expires_at, policy_version}
    vote     b"agent-pdp/approval-vote/v1\\n"     {proposal_id, approver_id, verdict, action_digest,
                                                  groups, decided_at}

Both travel in their audit events (``data.approval_request`` of ``proposal.decided``, ``data.vote`` of
``approval.granted``/``approval.rejected``) as ``{"payload", "signature", "key_id"}``, the payload being the
exact signed text. Quorum is computed from these alone (:mod:`pdp.approvals.history`): someone who can write
the database but does not hold the key can neither lower what a decision requires nor add a vote that counts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pdp.audit.keys import key_id
from pdp.canonical import canonical_json, timestamp
from pdp.policy.decision import ApprovalRequirement, Decision

REQUEST_TAG = b"agent-pdp/approval-request/v1\n"
VOTE_TAG = b"agent-pdp/approval-vote/v1\n"
DIGEST = re.compile(r"^[0-9a-f]{64}$")


class Unverified(Exception):
    """A signed request or vote that does not verify, or lacks a field; the message says which."""


@dataclass(frozen=True, slots=True)
class Signed:
    payload: str  # the exact canonical JSON that was signed
    signature: str  # hex
    key_id: str

    def audit(self) -> dict[str, str]:
        return {"payload": self.payload, "signature": self.signature, "key_id": self.key_id}


@dataclass(frozen=True, slots=True)
class ApprovalRequest:
    """What a needs-approval decision asked for, as the PDP signed it."""

    proposal_id: str
    agent_id: str
    owner: str
    action_digest: str
    requirements: tuple[ApprovalRequirement, ...]
    expires_at: str  # pdp.canonical.timestamp form
    policy_version: str


@dataclass(frozen=True, slots=True)
class SignedVote:
    """A vote the PDP accepted, as it signed it."""

    proposal_id: str
    approver_id: str
    verdict: str
    action_digest: str
    groups: tuple[str, ...]
    decided_at: str  # pdp.canonical.timestamp form


def _sign(key: Ed25519PrivateKey, tag: bytes, payload: dict[str, Any]) -> Signed:
    text = canonical_json(payload)
    return Signed(text.decode("utf-8"), key.sign(tag + text).hex(), key_id(key.public_key()))


def sign_request(
    key: Ed25519PrivateKey, *, proposal_id: str, agent_id: str, owner: str, action_digest: str, decision: Decision
) -> Signed:
    """Sign a needs-approval decision's requirements (pure: call it before the write transaction)."""
    if decision.approval_expires_at is None or not decision.approval_requirements:
        raise ValueError("only a needs-approval decision, with requirements and an expiry, is signed")
    return _sign(
        key,
        REQUEST_TAG,
        {
            "proposal_id": proposal_id,
            "agent_id": agent_id,
            "owner": owner,
            "action_digest": action_digest,
            "requirements": [r.to_dict() for r in decision.approval_requirements],
            "expires_at": timestamp(decision.approval_expires_at),
            "policy_version": decision.policy_version,
        },
    )


def sign_vote(
    key: Ed25519PrivateKey,
    *,
    proposal_id: str,
    approver_id: str,
    verdict: str,
    action_digest: str,
    groups: Sequence[str],
    decided_at: datetime,
) -> Signed:
    return _sign(
        key,
        VOTE_TAG,
        {
            "proposal_id": proposal_id,
            "approver_id": approver_id,
            "verdict": verdict,
            "action_digest": action_digest,
            "groups": sorted(groups),
            "decided_at": timestamp(decided_at),
        },
    )


def _opened(public_key: Ed25519PublicKey, tag: bytes, signed: object, what: str) -> dict[str, Any]:
    if not isinstance(signed, Mapping):
        raise Unverified(f"the {what} carries no PDP signature")
    payload, signature = signed.get("payload"), signed.get("signature")
    if not isinstance(payload, str) or not isinstance(signature, str):
        raise Unverified(f"the {what} carries no PDP signature")
    try:
        public_key.verify(bytes.fromhex(signature), tag + payload.encode("utf-8"))
    except (InvalidSignature, ValueError):
        raise Unverified(f"the {what}'s signature does not verify with the PDP's key") from None
    try:
        fields = json.loads(payload)
    except ValueError:
        raise Unverified(f"the signed {what} is not JSON") from None
    if not isinstance(fields, dict):
        raise Unverified(f"the signed {what} is not an object")
    return fields


def open_request(public_key: Ed25519PublicKey, signed: object) -> ApprovalRequest:
    """The request in ``{"payload", "signature"}``; Unverified unless the PDP's key signed exactly it."""
    fields = _opened(public_key, REQUEST_TAG, signed, "approval request")
    try:
        return ApprovalRequest(
            proposal_id=str(fields["proposal_id"]),
            agent_id=str(fields["agent_id"]),
            owner=str(fields["owner"]),
            action_digest=str(fields["action_digest"]),
            requirements=tuple(
                ApprovalRequirement(str(r["source"]), tuple(str(g) for g in r["groups"]), int(r["min_approvals"]))
                for r in fields["requirements"]
            ),
            expires_at=str(fields["expires_at"]),
            policy_version=str(fields["policy_version"]),
        )
    except (KeyError, TypeError, ValueError):
        raise Unverified("the signed approval request lacks a field") from None


def open_vote(public_key: Ed25519PublicKey, signed: object) -> SignedVote:
    """The vote in ``{"payload", "signature"}``; Unverified unless the PDP's key signed exactly it."""
    fields = _opened(public_key, VOTE_TAG, signed, "vote")
    try:
        return SignedVote(
            proposal_id=str(fields["proposal_id"]),
            approver_id=str(fields["approver_id"]),
            verdict=str(fields["verdict"]),
            action_digest=str(fields["action_digest"]),
            groups=tuple(str(g) for g in fields["groups"]),
            decided_at=str(fields["decided_at"]),
        )
    except (KeyError, TypeError, ValueError):
        raise Unverified("the signed vote lacks a field") from None
