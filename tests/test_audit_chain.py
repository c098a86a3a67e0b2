"""The audit chain as a running server writes it (DESIGN §9): one event per transition, in the same
transaction, hash-linked, canonical, and cross-checkable against its indexed columns. SQLite and PostgreSQL.

The helpers at the top are shared with the other audit test modules.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import ADMIN_MEMBERS, BULK_CLOSE, TICKETS, BackgroundServer, Server, server_config, signing_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Engine, func, select, text

from pdp.audit.chain import GENESIS, MAIN_CHAIN, event_hash
from pdp.audit.checkpoints import Checkpoint, read_file, stored
from pdp.audit.keys import load_public
from pdp.audit.verify import verify
from pdp.canonical import canonical_json, digest
from pdp.client import PdpClient, PdpClientError
from pdp.identity.agents import add_agent
from pdp.server.app import StartupError, start
from pdp.store.database import create_db_engine
from pdp.store.models import audit_events, proposals
from pdp.v1 import pdp_pb2

WHY = "audit test"
DECIDED = "proposal.decided"
CANCELLED = "proposal.cancelled"
INDEXED = ("type", "proposal_id", "agent_id", "actor", "policy_version")


# --- helpers shared by the audit tests ------------------------------------------------------------------


def public_key() -> Ed25519PublicKey:
    return load_public(Path(str(signing_key()) + ".pub"))


def spec_hash(seq: int, prev_hash: str, body: bytes) -> str:
    """The hash as docs/audit-format.md freezes it, written out independently of pdp.audit.chain."""
    return hashlib.sha256(
        b"agent-pdp/audit/v1\n" + seq.to_bytes(8, "big") + bytes.fromhex(prev_hash) + body
    ).hexdigest()


def chain_rows(engine: Engine, **where: Any) -> list[dict[str, Any]]:
    """The main chain's rows in seq order (optionally only those whose columns equal ``where``)."""
    query = select(audit_events).where(audit_events.c.chain == MAIN_CHAIN).order_by(audit_events.c.seq)
    for column, value in where.items():
        query = query.where(audit_events.c[column] == value)
    with engine.connect() as conn:
        return [dict(row) for row in conn.execute(query).mappings()]


def event_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(audit_events)).scalar_one())


def assert_chain_intact(engine: Engine) -> list[dict[str, Any]]:
    """Check every row the way a third party would: seq 1..N, links, hashes, canonical bodies, columns."""
    rows = chain_rows(engine)
    prev = GENESIS
    for expected_seq, row in enumerate(rows, 1):
        seq = int(row["seq"])
        assert seq == expected_seq, f"seq {seq} where {expected_seq} was expected"
        assert row["prev_hash"] == prev, f"seq {seq}: prev_hash is not the hash of seq {seq - 1}"
        body = str(row["body"]).encode("utf-8")
        assert row["hash"] == event_hash(seq, prev, body) == spec_hash(seq, prev, body), f"seq {seq}: bad hash"
        parsed = json.loads(body)
        assert canonical_json(parsed) == body, f"seq {seq}: body is not canonical JSON"
        for column in INDEXED:  # the core columns must be in the body ...
            assert column in parsed, f"seq {seq}: body lacks {column}"
        for column in parsed.keys() & row.keys():  # ... and every body member that names a column equals it
            assert parsed[column] == row[column], f"seq {seq}: column {column} differs from the body"
        prev = str(row["hash"])
    assert len({row["event_id"] for row in rows}) == len(rows)
    return rows


def body(row: dict[str, Any]) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(row["body"])
    return parsed


def decided_events(engine: Engine, proposal_id: str) -> list[dict[str, Any]]:
    return chain_rows(engine, proposal_id=proposal_id, type=DECIDED)


def agent_proposal_ids(engine: Engine, agent_id: str) -> list[str]:
    with engine.connect() as conn:
        return [
            str(pid) for pid in conn.execute(select(proposals.c.id).where(proposals.c.agent_id == agent_id)).scalars()
        ]


# --- transitions ------------------------------------------------------------------------------------------


def _check_decided(server: Server, agent_id: str, response: pdp_pb2.ProposeResponse, justification: str) -> None:
    """The proposal's one decided event holds the action, justification, full decision and its input."""
    events = decided_events(server.engine, response.proposal_id)
    assert len(events) == 1
    event = events[0]
    row = server.row(response.proposal_id)
    assert row is not None
    data = body(event)["data"]
    assert data["action"] == row["action"]
    assert data["action"]["tool"] == row["tool"]
    assert data["action"]["resource"] == row["resource"]
    assert data["action_digest"] == row["action_digest"] == digest(data["action"])
    assert data["justification"] == justification
    decision = data["decision"]
    assert decision["outcome"] == row["outcome"]
    assert decision == row["decision"]
    assert [r["rule_id"] for r in decision["reasons"]] == [r.rule_id for r in response.decision.reasons]
    assert [r["message"] for r in decision["reasons"]] == [r.message for r in response.decision.reasons]
    assert (decision["boundary"], decision["tier"]) == (response.decision.boundary, response.decision.tier)
    assert data["decision_input"] == row["decision_input"]
    assert data["decision_input"]["agent"]["id"] == agent_id
    assert data["decision_input"]["context"]["environment"] == "dev"
    assert data["state"] == pdp_pb2.ProposalState.Name(response.state)  # the state it was decided into
    assert datetime.fromisoformat(body(event)["occurred_at"].replace("Z", "+00:00")) == row["created_at"]
    assert (event["type"], event["proposal_id"], event["agent_id"], event["actor"], event["policy_version"]) == (
        DECIDED,
        response.proposal_id,
        agent_id,
        f"agent:{agent_id}",
        response.decision.policy_version,
    )


def test_every_transition_appends_one_event_to_a_valid_chain(server: Server) -> None:
    agent, client = server.agent_client()
    allowed = client.propose("tickets", "POST", TICKETS, "open a ticket", params={"title": "Printer on fire"})
    denied = client.propose("iam", "POST", ADMIN_MEMBERS, "make me admin", params={"user": "me"})
    pending = client.propose("tickets", "POST", BULK_CLOSE, "close duplicates", params={"count": 40})
    catalog = client.propose("shell", "exec", "shell://prod-web-1", "just a quick fix", params={"cmd": "rm -rf /"})
    assert [r.decision.outcome for r in (allowed, denied, pending, catalog)] == [
        pdp_pb2.ALLOW,
        pdp_pb2.DENY,
        pdp_pb2.NEEDS_APPROVAL,
        pdp_pb2.DENY,
    ]
    assert client.cancel(pending.proposal_id).state == pdp_pb2.CANCELLED
    with pytest.raises(PdpClientError) as again:  # a refused cancel changes nothing and records nothing
        client.cancel(pending.proposal_id)
    assert again.value.code == grpc.StatusCode.FAILED_PRECONDITION

    mine = chain_rows(server.engine, agent_id=agent.id)
    assert [(e["type"], e["proposal_id"]) for e in mine] == [
        (DECIDED, allowed.proposal_id),
        (DECIDED, denied.proposal_id),
        (DECIDED, pending.proposal_id),
        (DECIDED, catalog.proposal_id),
        (CANCELLED, pending.proposal_id),
    ]
    assert sorted(agent_proposal_ids(server.engine, agent.id)) == sorted(
        r.proposal_id for r in (allowed, denied, pending, catalog)
    )
    _check_decided(server, agent.id, allowed, "open a ticket")
    _check_decided(server, agent.id, denied, "make me admin")
    _check_decided(server, agent.id, pending, "close duplicates")
    _check_decided(server, agent.id, catalog, "just a quick fix")
    assert body(decided_events(server.engine, allowed.proposal_id)[0])["data"]["decision"]["tier"] == "ai_writable"
    assert [
        r["rule_id"] for r in body(decided_events(server.engine, catalog.proposal_id)[0])["data"]["decision"]["reasons"]
    ] == ["catalog.unknown_tool"]
    assert body(decided_events(server.engine, pending.proposal_id)[0])["data"]["decision"]["approval_requirements"]

    cancelled = mine[-1]
    assert body(cancelled)["data"] == {"from_state": "PENDING_APPROVAL", "to_state": "CANCELLED"}
    assert (cancelled["actor"], cancelled["policy_version"]) == (f"agent:{agent.id}", pending.decision.policy_version)

    rows = assert_chain_intact(server.engine)
    seqs = [int(e["seq"]) for e in mine]
    assert seqs == sorted(seqs)
    assert rows[seqs[-1] - 1]["hash"] == mine[-1]["hash"]
    report = verify(server.engine, public_key=public_key())
    assert report.intact, report
    assert report.events == len(rows)
    assert report.triggers_missing == []


def test_idempotent_replay_appends_nothing(server: Server) -> None:
    agent, client = server.agent_client()
    key = f"key-{uuid.uuid4().hex}"
    first = client.propose("tickets", "POST", TICKETS, WHY, params={"title": "once"}, idempotency_key=key)
    assert len(decided_events(server.engine, first.proposal_id)) == 1
    assert body(decided_events(server.engine, first.proposal_id)[0])["data"]["idempotency_key"] == key
    before = event_count(server.engine)
    replay = client.propose("tickets", "POST", TICKETS, WHY, params={"title": "once"}, idempotency_key=key)
    assert replay.proposal_id == first.proposal_id
    assert event_count(server.engine) == before
    assert len(decided_events(server.engine, first.proposal_id)) == 1
    # Reusing the key for a different action is refused and records nothing either.
    with pytest.raises(PdpClientError) as refused:
        client.propose("tickets", "POST", TICKETS, WHY, params={"title": "twice"}, idempotency_key=key)
    assert refused.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert event_count(server.engine) == before
    assert agent_proposal_ids(server.engine, agent.id) == [first.proposal_id]


def test_replays_append_nothing(server: Server) -> None:
    """The half of the idempotency contract that holds on both databases: a replay adds no event."""
    agent, client = server.agent_client()
    key = f"key-{uuid.uuid4().hex}"
    first = client.propose("tickets", "POST", TICKETS, WHY, params={"title": "once"}, idempotency_key=key)
    before = event_count(server.engine)
    for _ in range(3):
        replay = client.propose("tickets", "POST", TICKETS, WHY, params={"title": "once"}, idempotency_key=key)
        assert replay.proposal_id == first.proposal_id
    assert event_count(server.engine) == before
    assert agent_proposal_ids(server.engine, agent.id) == [first.proposal_id]


def test_evaluate_appends_nothing(server: Server) -> None:
    agent, client = server.agent_client()
    before = event_count(server.engine)
    outcomes = [
        client.evaluate("tickets", "POST", TICKETS, WHY, params={"title": "dry"}).outcome,
        client.evaluate("iam", "POST", ADMIN_MEMBERS, WHY, params={"user": "me"}).outcome,
        client.evaluate("tickets", "POST", BULK_CLOSE, WHY, params={"count": 40}).outcome,
        client.evaluate("shell", "exec", "shell://prod-web-1", WHY).outcome,
    ]
    assert outcomes == [pdp_pb2.ALLOW, pdp_pb2.DENY, pdp_pb2.NEEDS_APPROVAL, pdp_pb2.DENY]
    assert event_count(server.engine) == before
    assert chain_rows(server.engine, agent_id=agent.id) == []


def _refuse_appends_for(engine: Engine, agent_id: str) -> str:
    """A throwaway trigger (the test's own, not the product's) making every append for ``agent_id`` fail."""
    name = f"test_refuse_{uuid.uuid4().hex[:12]}"
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.execute(
                text(
                    f"CREATE TRIGGER {name} BEFORE INSERT ON audit_events WHEN NEW.agent_id = '{agent_id}' "
                    "BEGIN SELECT RAISE(ABORT, 'test: audit append refused'); END"
                )
            )
        else:
            conn.execute(
                text(
                    f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ "
                    "BEGIN RAISE EXCEPTION 'test: audit append refused'; END $$"
                )
            )
            conn.execute(
                text(
                    f"CREATE TRIGGER {name} BEFORE INSERT ON audit_events FOR EACH ROW "
                    f"WHEN (NEW.agent_id = '{agent_id}') EXECUTE FUNCTION {name}()"
                )
            )
    return name


def _drop_refusal(engine: Engine, name: str) -> None:
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.execute(text(f"DROP TRIGGER {name}"))
        else:
            conn.execute(text(f"DROP TRIGGER {name} ON audit_events"))
            conn.execute(text(f"DROP FUNCTION {name}()"))


def _bulk_close(client: PdpClient, **kw: Any) -> pdp_pb2.ProposeResponse:
    return client.propose("tickets", "POST", BULK_CLOSE, WHY, params={"count": 40}, **kw)


def test_a_failed_append_rolls_back_the_decision(server: Server) -> None:
    """No decision without its audit event: the agent gets an error and no proposal row exists."""
    agent, client = server.agent_client()
    _, bystander = server.agent_client()
    pending = _bulk_close(client)
    before = event_count(server.engine)
    trigger = _refuse_appends_for(server.engine, agent.id)
    try:
        with pytest.raises(PdpClientError) as failed:
            _bulk_close(client)
        assert failed.value.code == grpc.StatusCode.UNAVAILABLE
        assert "retry with the same idempotency_key" in failed.value.details
        with pytest.raises(PdpClientError) as cancel_failed:
            client.cancel(pending.proposal_id)
        assert cancel_failed.value.code == grpc.StatusCode.UNAVAILABLE
        # Another agent's appends in the meantime are unaffected.
        other = bystander.propose("tickets", "POST", TICKETS, WHY, params={"title": "meanwhile"})
    finally:
        _drop_refusal(server.engine, trigger)

    assert agent_proposal_ids(server.engine, agent.id) == [pending.proposal_id]  # no row for the failed one
    pending_row = server.row(pending.proposal_id)
    assert pending_row is not None
    assert pending_row["state"] == "PENDING_APPROVAL"  # the cancel rolled back too
    assert event_count(server.engine) == before + 1
    assert len(decided_events(server.engine, other.proposal_id)) == 1
    assert chain_rows(server.engine, agent_id=agent.id) == decided_events(server.engine, pending.proposal_id)

    # Once appends work again, so does everything else.
    again = _bulk_close(client)
    assert len(decided_events(server.engine, again.proposal_id)) == 1
    assert client.cancel(pending.proposal_id).state == pdp_pb2.CANCELLED
    assert len(chain_rows(server.engine, proposal_id=pending.proposal_id, type=CANCELLED)) == 1
    assert_chain_intact(server.engine)


def test_a_retry_after_a_failed_append_is_recorded_once(server: Server) -> None:
    """What the error message tells the agent to do (retry with the same idempotency_key) records the
    proposal and its event exactly once."""
    agent, client = server.agent_client()
    key = f"key-{uuid.uuid4().hex}"
    trigger = _refuse_appends_for(server.engine, agent.id)
    try:
        with pytest.raises(PdpClientError) as failed:
            _bulk_close(client, idempotency_key=key)
        assert failed.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        _drop_refusal(server.engine, trigger)
    assert agent_proposal_ids(server.engine, agent.id) == []
    retried = _bulk_close(client, idempotency_key=key)
    assert _bulk_close(client, idempotency_key=key).proposal_id == retried.proposal_id
    assert agent_proposal_ids(server.engine, agent.id) == [retried.proposal_id]
    assert len(chain_rows(server.engine, agent_id=agent.id)) == 1
    assert len(decided_events(server.engine, retried.proposal_id)) == 1


# --- views for auditors -------------------------------------------------------------------------------


def test_views_answer_auditors_questions(server: Server) -> None:
    agent, client = server.agent_client()
    denied = client.propose("iam", "POST", ADMIN_MEMBERS, "make me admin", params={"user": "me"})
    pending = client.propose("tickets", "POST", BULK_CLOSE, "close duplicates", params={"count": 40})
    client.cancel(pending.proposal_id)
    with server.engine.connect() as conn:
        decisions = (
            conn.execute(
                text(
                    "SELECT proposal_id, outcome, tool, operation, resource, justification, boundary, agent_owner, "
                    "reasons FROM audit_decisions WHERE agent_id = :agent ORDER BY seq"
                ),
                {"agent": agent.id},
            )
            .mappings()
            .all()
        )
        timeline = conn.execute(
            text("SELECT type, actor FROM audit_timeline WHERE proposal_id = :p ORDER BY seq"),
            {"p": pending.proposal_id},
        ).all()
    assert [(d["proposal_id"], d["outcome"], d["tool"], d["resource"]) for d in decisions] == [
        (denied.proposal_id, "deny", "iam", ADMIN_MEMBERS),
        (pending.proposal_id, "needs_approval", "tickets", BULK_CLOSE),
    ]
    assert (decisions[0]["justification"], decisions[0]["agent_owner"]) == ("make me admin", "tester")
    assert decisions[0]["boundary"] == denied.decision.boundary
    assert [r["rule_id"] for r in json.loads(decisions[0]["reasons"])] == [r.rule_id for r in denied.decision.reasons]
    assert [tuple(t) for t in timeline] == [(DECIDED, f"agent:{agent.id}"), (CANCELLED, f"agent:{agent.id}")]


# --- checkpoints the server writes ----------------------------------------------------------------------


def test_the_server_signs_every_n_events_and_at_shutdown(database_url: str) -> None:
    config = replace(server_config(database_url), checkpoint_every="5", checkpoint_interval="3600")
    file = Path(config.checkpoint_file)
    engine = create_db_engine(database_url)
    background = BackgroundServer(config)
    try:
        token = add_agent(engine, "checkpointed", "tester", ("support",))
        with PdpClient(f"127.0.0.1:{background.running.port}", token) as client:
            for i in range(6):
                client.propose("tickets", "POST", TICKETS, f"event {i}", params={"title": str(i)})
            deadline = time.monotonic() + 30  # the checkpointer looks about once a second
            while not (signed := _stored(engine)):
                assert time.monotonic() < deadline, "no checkpoint after 6 events with checkpoint_every=5"
                time.sleep(0.05)
            assert len(signed) == 1
            assert 5 <= signed[0].seq <= 6
            for i in range(2):  # fewer than 5 more: nothing until shutdown
                client.propose("tickets", "POST", TICKETS, f"more {i}", params={"title": str(i)})
    finally:
        background.stop()
    rows = assert_chain_intact(engine)
    signed = _stored(engine)
    try:
        assert [cp.seq for cp in signed][1:] == [len(rows)] == [8]  # the head at shutdown
        assert [cp for _, cp in read_file(file)] == signed
        for checkpoint in signed:
            assert checkpoint.valid(public_key())
            assert checkpoint.head_hash == rows[checkpoint.seq - 1]["hash"]
        report = verify(engine, public_key=public_key(), checkpoint_file=file)
        assert report.intact, report
        assert report.checkpoints == 2 * len(signed)
    finally:
        engine.dispose()


@pytest.mark.backend("sqlite")
@pytest.mark.parametrize(
    ("every", "interval"), [("0", "1"), ("x", "1"), ("5", "0"), ("5", "-1"), ("5", "nan"), ("5", "90000")]
)
def test_checkpoint_settings_out_of_range_refuse_to_start(database_url: str, every: str, interval: str) -> None:
    """A zero or negative interval would spin the checkpointer; a huge one would leave the tail unsigned."""
    config = replace(server_config(database_url), checkpoint_every=every, checkpoint_interval=interval)
    with pytest.raises(StartupError, match="checkpoint"):
        asyncio.run(start(config))


def _stored(engine: Engine) -> list[Checkpoint]:
    with engine.connect() as conn:
        return stored(conn)
