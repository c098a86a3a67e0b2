"""Execution tickets: the PDP's signed permission to carry out one proposal's exact action.

    signature = Ed25519( b"agent-pdp/ticket/v1\\n" || canonical JSON of the payload )

The payload names the proposal, the SHA-256 digest of its canonical action, the outcome that made
it executable, the approvals, the policy version and a validity window. The executor trusts only the
PDP's public key: it checks the signature over the stored payload bytes, hashes the stored canonical
action text (``proposals.action_json``, never a re-serialisation of the JSONB copy, whose numbers the
database may rewrite), and refuses a ticket that has expired, on a retry too. So a forged or edited
ticket row, or an action edited after signing, runs nothing.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pdp.audit.keys import key_id
from pdp.canonical import canonical_json, digest_of, timestamp

DOMAIN_TAG = b"agent-pdp/ticket/v1\n"
DEFAULT_TTL = timedelta(minutes=10)


@dataclass(frozen=True, slots=True)
class SignedTicket:
    proposal_id: str
    ticket_id: str
    payload: str  # the exact canonical JSON that was signed
    signature: str  # hex
    key_id: str
    expires_at: datetime

    def row(self) -> dict[str, Any]:
        return {
            "proposal_id": self.proposal_id,
            "ticket_id": self.ticket_id,
            "payload": self.payload,
            "signature": self.signature,
            "key_id": self.key_id,
            "expires_at": self.expires_at,
        }

    def audit(self) -> dict[str, Any]:
        """What the audit event records: enough to re-verify the ticket later."""
        return {
            "ticket_id": self.ticket_id,
            "payload": self.payload,
            "signature": self.signature,
            "key_id": self.key_id,
        }


def issue(
    key: Ed25519PrivateKey,
    *,
    proposal_id: str,
    action_digest: str,
    outcome: str,
    approvals: list[dict[str, Any]],
    policy_version: str,
    issued_at: datetime,
    ttl: timedelta = DEFAULT_TTL,
) -> SignedTicket:
    ticket_id = str(uuid.uuid4())
    expires_at = issued_at + ttl
    payload = canonical_json(
        {
            "ticket_id": ticket_id,
            "proposal_id": proposal_id,
            "action_digest": action_digest,
            "outcome": outcome,
            "approvals": approvals,
            "policy_version": policy_version,
            "issued_at": timestamp(issued_at),
            "expires_at": timestamp(expires_at),
        }
    )
    signature = key.sign(DOMAIN_TAG + payload).hex()
    return SignedTicket(
        proposal_id, ticket_id, payload.decode("utf-8"), signature, key_id(key.public_key()), expires_at
    )


class TicketRefused(Exception):
    """The ticket does not permit execution. ``reason`` is a stable code for audit and metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class VerifiedTicket:
    ticket_id: str
    outcome: str
    policy_version: str
    expires_at: str


def verify(
    public_key: Ed25519PublicKey,
    *,
    payload: str,
    signature: str,
    proposal_id: str,
    action_json: bytes,
    now: datetime,
) -> VerifiedTicket:
    """Check a stored ticket against the stored proposal's canonical action bytes; raise :class:`TicketRefused`
    on any doubt. Expiry holds for every attempt: a retry after the ticket expired is refused, not run late."""
    try:
        public_key.verify(bytes.fromhex(signature), DOMAIN_TAG + payload.encode("utf-8"))
    except (InvalidSignature, ValueError) as exc:
        raise TicketRefused(
            "ticket.bad_signature", "the ticket's signature does not verify with the PDP's key"
        ) from exc
    try:
        fields = json.loads(payload)
        ticket_id, ticket_proposal = str(fields["ticket_id"]), str(fields["proposal_id"])
        ticket_digest, outcome = str(fields["action_digest"]), str(fields["outcome"])
        policy_version, expires_at = str(fields["policy_version"]), str(fields["expires_at"])
    except (ValueError, KeyError, TypeError) as exc:
        raise TicketRefused("ticket.malformed", "the signed ticket lacks a required field") from exc
    if ticket_proposal != proposal_id:
        raise TicketRefused("ticket.wrong_proposal", f"the ticket was issued for proposal {ticket_proposal}")
    if digest_of(action_json) != ticket_digest:
        raise TicketRefused("ticket.action_mismatch", "the stored action differs from the action the ticket permits")
    if outcome not in ("allow", "approved"):
        raise TicketRefused("ticket.malformed", f"the ticket's outcome {outcome!r} does not permit execution")
    # Fixed-width UTC timestamps (pdp.canonical.timestamp) compare correctly as strings.
    if expires_at <= timestamp(now):
        raise TicketRefused("ticket.expired", f"the ticket expired at {expires_at}")
    return VerifiedTicket(ticket_id, outcome, policy_version, expires_at)
