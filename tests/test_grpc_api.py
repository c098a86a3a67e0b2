"""The agent contract over a real gRPC server, on SQLite and PostgreSQL (DESIGN §3, §5)."""

from __future__ import annotations

import queue
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from conftest import ADMIN_MEMBERS, BULK_CLOSE, TICKETS, Server
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sqlalchemy import select

from pdp.client import PdpClient, PdpClientError
from pdp.store.models import proposals
from pdp.v1 import pdp_pb2

WHY = "integration test"


def create_ticket(client: PdpClient, **kw: Any) -> pdp_pb2.ProposeResponse:
    return client.propose("tickets", "POST", TICKETS, WHY, params={"title": "Printer on fire"}, **kw)


def make_admin(client: PdpClient, **kw: Any) -> pdp_pb2.ProposeResponse:
    return client.propose("iam", "POST", ADMIN_MEMBERS, WHY, params={"user": "me"}, **kw)


def bulk_close(client: PdpClient, **kw: Any) -> pdp_pb2.ProposeResponse:
    return client.propose("tickets", "POST", BULK_CLOSE, WHY, params={"count": 40}, **kw)


def rule_ids(decision: pdp_pb2.Decision) -> list[str]:
    return [reason.rule_id for reason in decision.reasons]


def expect_error(code: grpc.StatusCode) -> Any:
    return pytest.raises(PdpClientError, match=f"^{code.name}: ")


# --- Propose: the three outcomes ---------------------------------------------------------------------


def test_propose_allow(server: Server) -> None:
    agent, client = server.agent_client()
    response = create_ticket(client, session_id="s-1")

    decision = response.decision
    assert decision.outcome == pdp_pb2.ALLOW
    assert response.state == pdp_pb2.APPROVED
    assert rule_ids(decision) == ["rule:tickets-create"]
    assert decision.reasons[0].effect == "allow"
    assert (decision.boundary, decision.tier) == ("support-tickets", "ai_writable")
    assert decision.policy_version.startswith("sha256:")
    assert not decision.approval_requirements
    assert not decision.HasField("approval_expires_at")
    uuid.UUID(response.proposal_id)

    row = server.row(response.proposal_id)
    assert row is not None
    assert row["agent_id"] == agent.id
    assert (row["tool"], row["operation"], row["resource"]) == ("tickets", "POST", TICKETS)
    assert row["action"]["params"] == {"title": "Printer on fire"}
    assert row["justification"] == WHY
    assert row["session_id"] == "s-1"
    assert (row["state"], row["outcome"]) == ("APPROVED", "allow")
    assert row["policy_version"] == decision.policy_version
    assert row["decision"]["outcome"] == "allow"
    assert [r["rule_id"] for r in row["decision"]["reasons"]] == ["rule:tickets-create"]
    assert row["decision_input"]["agent"]["id"] == agent.id
    assert row["decision_input"]["agent"]["roles"] == ["support"]
    assert row["approval_expires_at"] is None


def test_propose_deny(server: Server) -> None:
    _, client = server.agent_client()
    response = make_admin(client)

    decision = response.decision
    assert decision.outcome == pdp_pb2.DENY
    assert response.state == pdp_pb2.DENIED
    assert "boundary:access-control" in rule_ids(decision)
    assert all(reason.effect == "deny" for reason in decision.reasons)
    assert (decision.boundary, decision.tier) == ("access-control", "human_only")
    assert not decision.approval_requirements
    assert not decision.HasField("approval_expires_at")

    row = server.row(response.proposal_id)
    assert row is not None
    assert (row["state"], row["outcome"]) == ("DENIED", "deny")
    assert row["decision"]["boundary"] == "access-control"
    assert row["policy_version"] == decision.policy_version


def test_propose_needs_approval(server: Server) -> None:
    _, client = server.agent_client()
    before = datetime.now(UTC)
    response = bulk_close(client)

    decision = response.decision
    assert decision.outcome == pdp_pb2.NEEDS_APPROVAL
    assert response.state == pdp_pb2.PENDING_APPROVAL
    assert rule_ids(decision)[0] == "rule:tickets-bulk"
    assert "40 tickets" in decision.reasons[0].message
    assert (decision.boundary, decision.tier) == ("support-tickets", "ai_writable")
    assert [(r.source, list(r.groups), r.min_approvals) for r in decision.approval_requirements] == [
        ("rule:tickets-bulk", ["support-leads"], 2)
    ]
    # tickets-bulk approvals expire in 2h.
    assert decision.HasField("approval_expires_at")
    expires = decision.approval_expires_at.ToDatetime(tzinfo=UTC)
    assert before + timedelta(hours=2) <= expires <= datetime.now(UTC) + timedelta(hours=2)

    row = server.row(response.proposal_id)
    assert row is not None
    assert (row["state"], row["outcome"]) == ("PENDING_APPROVAL", "needs_approval")
    assert row["approval_expires_at"] == expires
    assert row["decision"]["approval_requirements"] == [
        {"source": "rule:tickets-bulk", "groups": ["support-leads"], "min_approvals": 2}
    ]


def test_get_proposal_returns_what_propose_returned(server: Server) -> None:
    agent, client = server.agent_client()
    response = bulk_close(client, session_id="sess", idempotency_key="get-1")

    proposal = client.get(response.proposal_id)
    assert proposal.proposal_id == response.proposal_id
    assert proposal.agent_id == agent.id
    assert proposal.state == response.state
    assert proposal.decision == response.decision
    action = proposal.action
    assert (action.tool, action.operation, action.resource) == ("tickets", "POST", BULK_CLOSE)
    assert dict(proposal.action.params) == {"count": 40}
    assert proposal.justification == WHY
    assert (proposal.session_id, proposal.idempotency_key) == ("sess", "get-1")
    assert proposal.created_at == proposal.updated_at
    assert proposal.created_at.ToDatetime(tzinfo=UTC) <= datetime.now(UTC)


# --- Visibility ------------------------------------------------------------------------------------


def test_agent_sees_only_its_own_proposals(server: Server) -> None:
    _, owner = server.agent_client()
    _, other = server.agent_client()
    proposal_id = bulk_close(owner).proposal_id

    for call in (other.get, other.cancel):
        with expect_error(grpc.StatusCode.NOT_FOUND):
            call(proposal_id)
    with expect_error(grpc.StatusCode.NOT_FOUND):
        list(other.watch(proposal_id, timeout=10))
    # The other agent's cancel changed nothing.
    assert owner.get(proposal_id).state == pdp_pb2.PENDING_APPROVAL


def test_unknown_proposal_id_is_not_found(server: Server) -> None:
    _, client = server.agent_client()
    with expect_error(grpc.StatusCode.NOT_FOUND):
        client.get(str(uuid.uuid4()))
    with expect_error(grpc.StatusCode.NOT_FOUND):
        client.cancel(str(uuid.uuid4()))


# --- Evaluate --------------------------------------------------------------------------------------


CREATE = ("tickets", "POST", TICKETS, {"title": "x"})
ADMIN = ("iam", "POST", ADMIN_MEMBERS, {"user": "me"})
BULK = ("tickets", "POST", BULK_CLOSE, {"count": 40})
DEMO = [
    pytest.param(CREATE, pdp_pb2.ALLOW, "rule:tickets-create", id="allow"),
    pytest.param(ADMIN, pdp_pb2.DENY, "boundary:access-control", id="deny"),
    pytest.param(BULK, pdp_pb2.NEEDS_APPROVAL, "rule:tickets-bulk", id="needs_approval"),
]


@pytest.mark.parametrize(("action", "outcome", "first_rule"), DEMO)
def test_evaluate_decides_like_propose_and_records_nothing(
    server: Server, action: tuple[str, str, str, dict[str, Any]], outcome: int, first_rule: str
) -> None:
    agent, client = server.agent_client()
    tool, operation, resource, params = action
    total = server.count()

    decision = client.evaluate(tool, operation, resource, WHY, params=params, idempotency_key="dry")

    assert decision.outcome == outcome
    assert rule_ids(decision)[0] == first_rule
    assert decision.policy_version.startswith("sha256:")
    assert server.count() == total
    assert server.count(agent.id) == 0
    # The same request proposed for real decides the same way (expiry aside, which follows the clock),
    # and the dry run did not use up the idempotency key.
    proposed = client.propose(tool, operation, resource, WHY, params=params, idempotency_key="dry").decision
    assert proposed.HasField("approval_expires_at") == decision.HasField("approval_expires_at")
    decision.ClearField("approval_expires_at")
    proposed.ClearField("approval_expires_at")
    assert proposed == decision
    assert server.count(agent.id) == 1


# --- Idempotency -----------------------------------------------------------------------------------


def test_same_key_same_action_returns_the_same_proposal(server: Server) -> None:
    agent, client = server.agent_client()
    first = create_ticket(client, idempotency_key="k-1")
    again = create_ticket(client, idempotency_key="k-1")

    assert again.proposal_id == first.proposal_id
    assert again.decision == first.decision
    assert again.state == first.state
    assert server.count(agent.id) == 1


def test_same_key_same_action_after_cancel_returns_the_cancelled_proposal(server: Server) -> None:
    agent, client = server.agent_client()
    first = bulk_close(client, idempotency_key="k-cancel")
    client.cancel(first.proposal_id)

    again = bulk_close(client, idempotency_key="k-cancel")
    assert again.proposal_id == first.proposal_id
    assert again.state == pdp_pb2.CANCELLED
    assert server.count(agent.id) == 1


def test_same_key_different_action_is_already_exists(server: Server) -> None:
    agent, client = server.agent_client()
    first = create_ticket(client, idempotency_key="k-2")
    total = server.count()

    with expect_error(grpc.StatusCode.ALREADY_EXISTS) as error:
        bulk_close(client, idempotency_key="k-2")
    assert "idempotency_key" in error.value.details
    assert first.proposal_id in error.value.details
    # Only the params differ: still a different action.
    with expect_error(grpc.StatusCode.ALREADY_EXISTS):
        client.propose("tickets", "POST", TICKETS, WHY, params={"title": "other"}, idempotency_key="k-2")

    assert server.count() == total
    assert server.count(agent.id) == 1
    assert client.get(first.proposal_id).state == pdp_pb2.APPROVED


def test_different_agents_may_use_the_same_key(server: Server) -> None:
    one, first_client = server.agent_client()
    two, second_client = server.agent_client()
    first = create_ticket(first_client, idempotency_key="shared")
    second = bulk_close(second_client, idempotency_key="shared")

    assert first.proposal_id != second.proposal_id
    assert (first.state, second.state) == (pdp_pb2.APPROVED, pdp_pb2.PENDING_APPROVAL)
    assert (server.count(one.id), server.count(two.id)) == (1, 1)


def test_concurrent_proposals_with_one_key_make_one_proposal(server: Server) -> None:
    agent = server.add_agent()
    clients = [server.client(agent.token) for _ in range(8)]
    barrier = threading.Barrier(len(clients))

    def send(client: PdpClient) -> str:
        barrier.wait(timeout=30)
        return bulk_close(client, idempotency_key="racing").proposal_id

    with ThreadPoolExecutor(len(clients)) as pool:
        ids = set(pool.map(send, clients))

    assert len(ids) == 1
    assert server.count(agent.id) == 1


def test_proposals_without_a_key_are_never_merged(server: Server) -> None:
    agent, client = server.agent_client()
    ids = {create_ticket(client).proposal_id for _ in range(3)}
    assert len(ids) == 3
    assert server.count(agent.id) == 3


# --- Cancel ----------------------------------------------------------------------------------------


def test_cancel_pending_proposal(server: Server) -> None:
    _, client = server.agent_client()
    response = bulk_close(client)

    cancelled = client.cancel(response.proposal_id)
    assert cancelled.proposal_id == response.proposal_id
    assert cancelled.state == pdp_pb2.CANCELLED
    assert cancelled.updated_at.ToDatetime() >= cancelled.created_at.ToDatetime()
    assert client.get(response.proposal_id).state == pdp_pb2.CANCELLED
    row = server.row(response.proposal_id)
    assert row is not None
    assert row["state"] == "CANCELLED"
    # Terminal states never change: a second cancel is refused.
    with expect_error(grpc.StatusCode.FAILED_PRECONDITION):
        client.cancel(response.proposal_id)


@pytest.mark.parametrize(
    ("call", "state"),
    [(create_ticket, "APPROVED"), (make_admin, "DENIED")],
    ids=["approved", "denied"],
)
def test_cancel_outside_pending_is_failed_precondition(server: Server, call: Any, state: str) -> None:
    _, client = server.agent_client()
    response = call(client)
    row_before = server.row(response.proposal_id)

    with expect_error(grpc.StatusCode.FAILED_PRECONDITION) as error:
        client.cancel(response.proposal_id)
    assert state in error.value.details

    assert client.get(response.proposal_id).state == pdp_pb2.ProposalState.Value(state)
    assert server.row(response.proposal_id) == row_before


# --- Watch -----------------------------------------------------------------------------------------

_END = object()


def _watch_in_thread(client: PdpClient, proposal_id: str) -> tuple[queue.Queue[Any], threading.Thread]:
    """Collect the stream's messages (then _END, or the error) on a queue."""
    messages: queue.Queue[Any] = queue.Queue()

    def run() -> None:
        try:
            for message in client.watch(proposal_id, timeout=30):
                messages.put(message)
        except PdpClientError as exc:
            messages.put(exc)
        messages.put(_END)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return messages, thread


def test_watch_follows_a_pending_proposal_until_cancelled(server: Server) -> None:
    agent, client = server.agent_client()
    response = bulk_close(client)
    messages, thread = _watch_in_thread(client, response.proposal_id)

    first = messages.get(timeout=15)
    assert isinstance(first, pdp_pb2.Proposal)
    assert (first.proposal_id, first.state) == (response.proposal_id, pdp_pb2.PENDING_APPROVAL)

    server.client(agent.token).cancel(response.proposal_id)

    second = messages.get(timeout=15)
    assert isinstance(second, pdp_pb2.Proposal)
    assert second.state == pdp_pb2.CANCELLED
    assert messages.get(timeout=15) is _END
    thread.join(timeout=15)
    assert not thread.is_alive()


@pytest.mark.parametrize(
    ("call", "state"), [(make_admin, pdp_pb2.DENIED), (bulk_close, pdp_pb2.CANCELLED)], ids=["denied", "cancelled"]
)
def test_watch_on_a_terminal_proposal_yields_once_and_ends(server: Server, call: Any, state: int) -> None:
    _, client = server.agent_client()
    response = call(client)
    if state == pdp_pb2.CANCELLED:
        client.cancel(response.proposal_id)

    messages = list(client.watch(response.proposal_id, timeout=15))
    assert [(m.proposal_id, m.state) for m in messages] == [(response.proposal_id, state)]


# --- Catalog violations are recorded and denied ----------------------------------------------------


@pytest.mark.parametrize(
    ("tool", "operation", "resource", "rule_id"),
    [
        ("shell", "exec", "shell://prod-web-1", "catalog.unknown_tool"),
        ("tickets", "PUT", "http://127.0.0.1:8282/api/tickets/4711", "catalog.unknown_operation"),
        ("tickets", "POST", "https://evil.example/api/tickets", "catalog.resource_outside_prefix"),
    ],
    ids=["unknown-tool", "unknown-operation", "outside-prefix"],
)
def test_catalog_violation_is_recorded_and_denied(
    server: Server, tool: str, operation: str, resource: str, rule_id: str
) -> None:
    agent, client = server.agent_client(roles=("support", "ops"))
    response = client.propose(tool, operation, resource, WHY, params={"cmd": "rm -rf /"})

    assert response.decision.outcome == pdp_pb2.DENY
    assert response.state == pdp_pb2.DENIED
    assert rule_ids(response.decision) == [rule_id]
    assert response.decision.boundary == ""
    assert server.count(agent.id) == 1
    row = server.row(response.proposal_id)
    assert row is not None
    assert (row["tool"], row["operation"], row["resource"]) == (tool, operation, resource)
    assert (row["state"], row["outcome"]) == ("DENIED", "deny")
    assert [r["rule_id"] for r in row["decision"]["reasons"]] == [rule_id]


# --- Health and reflection -------------------------------------------------------------------------


@pytest.fixture
def channel(server: Server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as channel:
        yield channel


@pytest.mark.parametrize("service", ["", "pdp.v1.PolicyDecisionPoint"])
def test_health_check_is_serving(channel: grpc.Channel, service: str) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_health_check_of_an_unknown_service_is_not_found(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    with pytest.raises(grpc.RpcError) as error:
        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_service(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    responses = list(stub.ServerReflectionInfo(requests, timeout=10))
    names = {service.name for service in responses[0].list_services_response.service}
    assert {"pdp.v1.PolicyDecisionPoint", "grpc.health.v1.Health"} <= names


def test_reflection_describes_the_contract(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="pdp.v1.PolicyDecisionPoint")])
    responses = list(stub.ServerReflectionInfo(requests, timeout=10))
    files = responses[0].file_descriptor_response.file_descriptor_proto
    assert files, responses[0]
    from google.protobuf import descriptor_pb2

    described = descriptor_pb2.FileDescriptorProto.FromString(files[0])
    assert described.package == "pdp.v1"
    service = next(s for s in described.service if s.name == "PolicyDecisionPoint")
    assert {m.name for m in service.method} == {
        "Propose",
        "Evaluate",
        "GetProposal",
        "WatchProposal",
        "CancelProposal",
    }


# --- Concurrency -----------------------------------------------------------------------------------

THREADS = 8
PER_THREAD = 25


def test_concurrent_proposals_each_get_their_own_row(server: Server) -> None:
    agent = server.add_agent()
    clients = [server.client(agent.token) for _ in range(THREADS)]

    def burst(n: int) -> list[str]:
        client = clients[n]
        ids: list[str] = []
        for i in range(PER_THREAD):
            # Mix outcomes and keys so both insert paths of the writer are exercised.
            call = (create_ticket, bulk_close, make_admin)[i % 3]
            key = f"t{n}-{i}" if i % 2 else ""
            ids.append(call(client, idempotency_key=key).proposal_id)
        return ids

    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(burst, range(THREADS)))

    ids = [proposal_id for batch in results for proposal_id in batch]
    assert len(ids) == THREADS * PER_THREAD
    assert len(set(ids)) == THREADS * PER_THREAD
    assert server.count(agent.id) == THREADS * PER_THREAD
    # Exactly the ids the server handed out are in the table: each answer was durable when it arrived.
    with server.engine.connect() as conn:
        stored = set(conn.execute(select(proposals.c.id).where(proposals.c.agent_id == agent.id)).scalars())
    assert stored == set(ids)
