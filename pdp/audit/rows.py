"""The second half of ``pdp audit verify``: do the mutable rows tell the story the chain recorded?

Proposals and votes are rows anyone with the service's grants can UPDATE or INSERT; the chain cannot be
changed without verify noticing, and it holds the PDP's signatures over every approval request and vote.
For every proposal this compares its row (state, action and digest, decision and the columns repeating it)
and its vote rows with its events and signatures (:mod:`pdp.approvals.consistency`), and reports events
that count for nothing (a vote without a valid signature, a second ``proposal.decided``) and events of
proposals that have no row.

It walks the proposals in id order, a batch at a time, with each batch's events and votes read by the same
id range: memory stays flat. On PostgreSQL it reads in one REPEATABLE READ snapshot, so a live service's
transitions (a row and its event commit together) never look like a disagreement.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Connection, Engine, Select, Text, cast, select
from sqlalchemy.exc import DBAPIError

from pdp.approvals import history
from pdp.approvals.consistency import StoredProposal, StoredVote, disagreements, stored_action_digest
from pdp.approvals.history import RecordedEvent
from pdp.audit.chain import MAIN_CHAIN
from pdp.audit.events import body_needed
from pdp.store.models import approvals, audit_events, proposals

BATCH = 1_000
LISTED = 1_000  # disagreements kept for the report; all are counted

# JSON columns are read as text and parsed here: the JSON result processing costs several times the parse.
_PROPOSAL_COLUMNS = (
    proposals.c.id,
    proposals.c.agent_id,
    proposals.c.state,
    cast(proposals.c.action, Text).label("action"),
    proposals.c.action_json,
    proposals.c.action_digest,
    cast(proposals.c.decision, Text).label("decision"),
    cast(proposals.c.decision_input, Text).label("decision_input"),
    proposals.c.outcome,
    proposals.c.policy_version,
    proposals.c.approval_expires_at,
)
_VOTE_COLUMNS = (
    approvals.c.proposal_id,
    approvals.c.approver_id,
    approvals.c.verdict,
    cast(approvals.c.groups, Text).label("groups"),
    approvals.c.action_digest,
)


@dataclass(frozen=True, slots=True)
class Disagreement:
    proposal_id: str
    problem: str


@dataclass
class RowsReport:
    proposals: int = 0
    # Needs-approval decisions recorded before approval requests were signed: they can no longer be approved.
    unsigned_requests: int = 0
    disagreements: list[Disagreement] = field(default_factory=list)  # the first LISTED
    disagreeing: int = 0  # all of them
    error: str = ""  # the check could not run (e.g. the role may not read proposals)

    @property
    def agree(self) -> bool:
        return not self.disagreeing and not self.error

    def add(self, proposal_id: str, problem: str) -> None:
        self.disagreeing += 1
        if len(self.disagreements) < LISTED:
            self.disagreements.append(Disagreement(proposal_id, problem))


def check(engine: Engine, public_key: Ed25519PublicKey, chain: str = MAIN_CHAIN) -> RowsReport:
    report = RowsReport()
    try:
        # One snapshot for every batch (SQLite's read transaction is one anyway).
        snapshot = {"isolation_level": "REPEATABLE READ"} if engine.dialect.name == "postgresql" else {}
        with engine.connect().execution_options(**snapshot) as conn, conn.begin():
            for batch in _batches(conn, chain):
                _check_batch(batch, public_key, report)
    except DBAPIError as exc:
        report.error = f"cannot read the rows to compare: {str(exc.orig).strip().splitlines()[0]}"
    return report


@dataclass
class _Batch:
    rows: list[Any]
    events: dict[str, list[RecordedEvent]]
    votes: dict[str, list[StoredVote]]


def _in_range(query: Select[Any], column: Any, low: str | None, high: str | None) -> Select[Any]:
    if low is not None:
        query = query.where(column > low)
    if high is not None:
        query = query.where(column <= high)
    return query


def _batches(conn: Connection, chain: str) -> Iterator[_Batch]:
    """Proposals in id order, BATCH at a time, each with the events and votes of its id range (low, high]."""
    low: str | None = None
    while True:
        rows = conn.execute(
            _in_range(select(*_PROPOSAL_COLUMNS), proposals.c.id, low, None).order_by(proposals.c.id).limit(BATCH)
        ).all()
        high = str(rows[-1].id) if len(rows) == BATCH else None  # the last batch reaches to the end
        events: dict[str, list[RecordedEvent]] = {}
        # The chain is compared in Python: as a condition, it steers SQLite to the primary key, a full scan.
        query = select(
            audit_events.c.chain,
            audit_events.c.proposal_id,
            audit_events.c.seq,
            audit_events.c.type,
            audit_events.c.actor,
            audit_events.c.body,
        ).where(audit_events.c.proposal_id.is_not(None))
        query = _in_range(query, audit_events.c.proposal_id, low, high).order_by(
            audit_events.c.proposal_id, audit_events.c.seq
        )
        for event in conn.execute(query):
            if event.chain != chain:
                continue
            data: dict[str, Any] = {}
            if body_needed(event.type):
                parsed = history.parse_body(event.body)
                inner = parsed.get("data") if isinstance(parsed, dict) else None
                data = inner if isinstance(inner, dict) else {}
            record = RecordedEvent(int(event.seq), str(event.type), str(event.actor), data)
            events.setdefault(str(event.proposal_id), []).append(record)
        votes: dict[str, list[StoredVote]] = {}
        vote_query = _in_range(select(*_VOTE_COLUMNS), approvals.c.proposal_id, low, high)
        for vote in conn.execute(vote_query):
            groups = _json(vote.groups)
            stored = StoredVote(
                vote.approver_id, vote.verdict, tuple(groups) if isinstance(groups, list) else (), vote.action_digest
            )
            votes.setdefault(str(vote.proposal_id), []).append(stored)
        yield _Batch(list(rows), events, votes)
        if high is None:
            return
        low = high


def _json(text: str | None) -> Any:
    try:
        return json.loads(text) if text is not None else None
    except ValueError:
        return text  # not JSON at all: it disagrees with whatever the log holds


def _check_batch(batch: _Batch, public_key: Ed25519PublicKey, report: RowsReport) -> None:
    for row in batch.rows:
        pid = str(row.id)
        found = history.read(pid, batch.events.pop(pid, ()), public_key)
        stored = StoredProposal(
            pid,
            row.agent_id,
            row.state,
            stored_action_digest(row.action_json, _json(row.action)),
            row.action_digest,
            _json(row.decision),
            _json(row.decision_input),
            row.outcome,
            row.policy_version,
            row.approval_expires_at,
            check_columns=True,
        )
        report.proposals += 1
        if found.needs_approval and found.decided is not None and "approval_request" not in found.decided:
            report.unsigned_requests += 1
        for problem in (*found.problems, *disagreements(stored, batch.votes.pop(pid, ()), found)):
            report.add(pid, problem)
    for pid in sorted(batch.events):
        report.add(pid, "the audit log has events of this proposal but it has no row")
    for pid in sorted(batch.votes):
        report.add(pid, "vote rows of a proposal that has no row")
