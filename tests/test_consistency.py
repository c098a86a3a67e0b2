"""Rows against the chain (pdp/approvals/consistency.py): what the database gives back differently is no tampering.

PostgreSQL's JSONB keeps the decimal digits a double was written with and hands large ones back as integers
(1e23 comes back as 100000000000000000000000, which is not the float 1e23 in Python). An agent that can put
such a number into its decision input (a cost, a usage counter) must not make every later vote refuse and
`pdp audit verify` report tampering; a number that really differs still does.
"""

from __future__ import annotations

from typing import Any

from pdp.approvals.consistency import StoredProposal, disagreements
from pdp.approvals.history import History

DIGEST = "a" * 64
INPUT = {"agent": {"id": "a1", "owner": "o"}, "usage": {"agent": {"spend_today_usd": 1e23}}}
DECISION = {"outcome": "allow", "reasons": [], "policy_version": "v", "estimated": 1e16}


def history() -> History:
    decided = {"action_digest": DIGEST, "decision_input": INPUT, "decision": DECISION, "state": "APPROVED"}
    return History("p1", decided, 1, DECISION, None, "", (), {}, (), "APPROVED", False)


def stored(decision_input: Any, decision: Any) -> StoredProposal:
    return StoredProposal("p1", "a1", "APPROVED", DIGEST, DIGEST, decision, decision_input)


def test_numbers_jsonb_rewrote_are_the_same_values() -> None:
    as_jsonb = {"agent": {"id": "a1", "owner": "o"}, "usage": {"agent": {"spend_today_usd": 10**23}}}
    assert 10**23 != 1e23  # what a plain comparison got wrong
    assert disagreements(stored(as_jsonb, {**DECISION, "estimated": 10**16}), (), history()) == []


def test_a_number_that_differs_still_disagrees() -> None:
    edited = {"agent": {"id": "a1", "owner": "o"}, "usage": {"agent": {"spend_today_usd": 0}}}
    problems = disagreements(stored(edited, {**DECISION, "estimated": 1}), (), history())
    assert any("decision input" in p for p in problems) and any("stored decision" in p for p in problems)
