"""The action the executor runs: parsed from the bytes the PDP digested, never from the JSONB copy.

``proposals.action_json`` holds the canonical JSON (RFC 8785) the action digest, and so the ticket, was
taken over. The executor hashes exactly those bytes and runs exactly what they say. The JSONB ``action``
column is a queryable copy (what the approval page, the agent and auditors' SQL read) that the database
may re-serialise: PostgreSQL gives ``1e16`` back as an integer and ``1e300`` as 301 digits. So it is never
digested or run, only required to say the same thing, number for number as doubles; a row where it does
not was edited, and is refused.
"""

from __future__ import annotations

from typing import Any

from pdp.canonical import loads, same_values
from pdp.execution.tickets import TicketRefused

UNREADABLE = "action.unreadable"
MISMATCH = "ticket.action_mismatch"


def signed_action(text: object) -> tuple[bytes, dict[str, Any]]:
    """(the bytes to check against the ticket, the action to run) from a row's ``action_json``.

    Raises :class:`TicketRefused` (``action.unreadable``) when there is no such text, or it is not JSON
    naming a tool, an operation, a resource and (if any) object params.
    """
    if not isinstance(text, str):
        raise TicketRefused(UNREADABLE, "the proposal has no canonical action text (action_json)")
    try:
        raw = text.encode("utf-8")
        action = loads(raw)
    except (UnicodeError, ValueError) as exc:
        raise TicketRefused(UNREADABLE, f"the proposal's action_json is not canonical JSON: {exc}") from None
    if (
        not isinstance(action, dict)
        or not all(isinstance(action.get(key), str) for key in ("tool", "operation", "resource"))
        or not isinstance(action.get("params", {}), dict)
    ):
        raise TicketRefused(UNREADABLE, "the proposal's action_json is not an action")
    return raw, action


def require_agreement(stored: Any, action: dict[str, Any]) -> None:
    """TicketRefused unless the JSONB copy ``stored`` says what the digested ``action`` says."""
    if not same_values(stored, action):
        raise TicketRefused(MISMATCH, "the stored action differs from the action the PDP digested and signed")
