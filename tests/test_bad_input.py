"""Malformed input and bad credentials are refused, naming the problem, and nothing is recorded."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import PDP, POLICIES, TICKETS, Server, broken_bundle, running_server
from google.protobuf import struct_pb2
from google.protobuf.message import Message

from pdp.client import PdpClient, PdpClientError
from pdp.identity.agents import revoke_agent
from pdp.proposals.validation import (
    MAX_JUSTIFICATION,
    MAX_LABELS,
    MAX_PARAMS_BYTES,
    MAX_PARAMS_DEPTH,
    MAX_RESOURCE,
    MAX_TOOL,
)
from pdp.store.migrate import upgrade
from pdp.v1 import pdp_pb2

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PROPOSE = "/pdp.v1.PolicyDecisionPoint/Propose"
GET = "/pdp.v1.PolicyDecisionPoint/GetProposal"
EVALUATE = "/pdp.v1.PolicyDecisionPoint/Evaluate"
CANCEL = "/pdp.v1.PolicyDecisionPoint/CancelProposal"
WATCH = "/pdp.v1.PolicyDecisionPoint/WatchProposal"


def valid_request(**changes: Any) -> pdp_pb2.ProposeRequest:
    """A request that is accepted; ``changes`` are keyword arguments of PdpClient.request."""
    kw: dict[str, Any] = {
        "tool": "tickets",
        "operation": "POST",
        "resource": TICKETS,
        "justification": "the customer asked for it",
        "params": {"title": "Printer on fire"},
    }
    kw.update(changes)
    return PdpClient.request(kw.pop("tool"), kw.pop("operation"), kw.pop("resource"), kw.pop("justification"), **kw)


def nested(levels: int) -> dict[str, Any]:
    """``levels`` nested objects, counting params itself: nested(1) == {"leaf": 1}."""
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(levels - 1):
        value = {"deeper": value}
    return value


def without_action() -> pdp_pb2.ProposeRequest:
    return pdp_pb2.ProposeRequest(justification="why")


def without_justification() -> pdp_pb2.ProposeRequest:
    request = valid_request()
    request.ClearField("justification")
    return request


def with_cost(cost: float) -> Callable[[], pdp_pb2.ProposeRequest]:
    return lambda: valid_request(estimated_cost_usd=cost)


def with_null_in_params() -> pdp_pb2.ProposeRequest:
    request = valid_request()
    request.action.params.update({"title": "a\x00b"})
    return request


def with_deep_list() -> pdp_pb2.ProposeRequest:
    request = valid_request()
    value = struct_pb2.Value(number_value=1)
    for _ in range(MAX_PARAMS_DEPTH):
        outer = struct_pb2.Value()
        outer.list_value.values.append(value)
        value = outer
    request.action.params.fields["list"].CopyFrom(value)
    return request


def call(
    target: str,
    method: str,
    request: bytes | Message,
    metadata: tuple[tuple[str, str], ...],
    response: type[Message] = pdp_pb2.ProposeResponse,
) -> Any:
    """One unary call with exactly these bytes and metadata; errors raise PdpClientError like the client's."""
    data = request if isinstance(request, bytes) else request.SerializeToString()
    with grpc.insecure_channel(target) as channel:
        rpc = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=response.FromString)
        try:
            return rpc(data, metadata=metadata, timeout=10)
        except grpc.RpcError as exc:
            status: Any = exc
            raise PdpClientError(status.code(), status.details()) from None


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], pdp_pb2.ProposeRequest]
    field: str


CASES = [
    Case("no action", without_action, "action"),
    Case("empty tool", lambda: valid_request(tool=""), "action.tool"),
    Case("whitespace tool", lambda: valid_request(tool="  \t"), "action.tool"),
    Case("empty operation", lambda: valid_request(operation=""), "action.operation"),
    Case("empty resource", lambda: valid_request(resource=""), "action.resource"),
    Case("whitespace-only justification", lambda: valid_request(justification=" \n\t "), "justification"),
    Case("missing justification", without_justification, "justification"),
    Case(
        "justification too long",
        lambda: valid_request(justification="j" * (MAX_JUSTIFICATION + 1)),
        "justification",
    ),
    Case("tool too long", lambda: valid_request(tool="t" * (MAX_TOOL + 1)), "action.tool"),
    Case(
        "resource too long",
        lambda: valid_request(resource=TICKETS + "r" * (MAX_RESOURCE + 1 - len(TICKETS))),
        "action.resource",
    ),
    Case(
        "params too large",
        lambda: valid_request(params={"blob": "x" * MAX_PARAMS_BYTES}),
        "action.params",
    ),
    Case(
        "params too large in many small values",
        lambda: valid_request(params={f"k{i}": "x" * 1000 for i in range(70)}),
        "action.params",
    ),
    Case(
        "params nested too deep",
        lambda: valid_request(params=nested(MAX_PARAMS_DEPTH + 1)),
        "action.params",
    ),
    Case("params lists nested too deep", with_deep_list, "action.params.list"),
    Case("NUL in tool", lambda: valid_request(tool="tick\x00ets"), "action.tool"),
    Case("NUL in justification", lambda: valid_request(justification="why\x00"), "justification"),
    Case("NUL in a params value", with_null_in_params, "action.params.title"),
    Case("NUL in a params key", lambda: valid_request(params={"a\x00": 1}), "action.params"),
    Case("NUL in a label", lambda: valid_request(labels={"team": "a\x00"}), "action.labels"),
    Case("negative cost", with_cost(-0.01), "action.estimated_cost_usd"),
    Case("NaN cost", with_cost(float("nan")), "action.estimated_cost_usd"),
    Case("infinite cost", with_cost(float("inf")), "action.estimated_cost_usd"),
    Case("NaN in params", lambda: valid_request(params={"count": float("nan")}), "action.params.count"),
    Case(
        "too many labels",
        lambda: valid_request(labels={f"l{i}": "v" for i in range(MAX_LABELS + 1)}),
        "action.labels",
    ),
    Case("empty label key", lambda: valid_request(labels={"": "v"}), "action.labels"),
    Case("idempotency key too long", lambda: valid_request(idempotency_key="k" * 201), "idempotency_key"),
    Case("session id too long", lambda: valid_request(session_id="s" * 201), "session_id"),
]


@pytest.fixture
def agent_client(server: Server) -> PdpClient:
    return server.agent_client()[1]


def assert_refused(server: Server, send: Callable[[], object], code: grpc.StatusCode, field: str) -> str:
    """``send`` fails with ``code`` naming ``field``, and the proposals table did not change."""
    before = server.count()
    with pytest.raises(PdpClientError) as error:
        send()
    assert error.value.code == code, error.value
    assert field in error.value.details, error.value.details
    assert server.count() == before
    return error.value.details


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_malformed_proposal_is_refused_naming_the_field(server: Server, agent_client: PdpClient, case: Case) -> None:
    details = assert_refused(server, lambda: agent_client.send(case.build()), INVALID, case.field)
    assert details.startswith(case.field), details


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_evaluate_refuses_the_same_input(server: Server, case: Case) -> None:
    agent = server.add_agent()
    assert_refused(
        server,
        lambda: call(server.target, EVALUATE, case.build(), bearer(agent.token), pdp_pb2.Decision),
        INVALID,
        case.field,
    )


ACCEPTED = [
    pytest.param({"justification": "j" * MAX_JUSTIFICATION}, id="justification at the limit"),
    pytest.param({"tool": "t" * MAX_TOOL}, id="tool at the limit"),
    pytest.param({"resource": TICKETS + "r" * (MAX_RESOURCE - len(TICKETS))}, id="resource at the limit"),
    pytest.param({"params": nested(MAX_PARAMS_DEPTH)}, id="params nested at the limit"),
    pytest.param({"params": {f"k{i}": "x" * 1000 for i in range(60)}}, id="params just under 64 KiB"),
    pytest.param({"labels": {f"l{i}": "v" for i in range(MAX_LABELS)}}, id="labels at the limit"),
    pytest.param({"estimated_cost_usd": 0.0}, id="zero cost"),
    pytest.param({"justification": "naïve café 🚀"}, id="non-ASCII justification"),
]


@pytest.mark.parametrize("changes", ACCEPTED)
def test_input_at_the_limits_is_accepted_and_recorded(
    server: Server, agent_client: PdpClient, changes: dict[str, Any]
) -> None:
    before = server.count()
    response = agent_client.send(valid_request(**changes))
    assert response.proposal_id
    assert server.count() == before + 1
    row = server.row(response.proposal_id)
    assert row is not None
    if "justification" in changes:
        assert row["justification"] == changes["justification"]
    if "params" in changes:
        assert row["action"]["params"] == changes["params"]


# --- Invalid UTF-8 on the wire ---------------------------------------------------------------------


def raw_bytes(request: pdp_pb2.ProposeRequest | pdp_pb2.GetProposalRequest, placeholder: str) -> bytes:
    """``request`` serialised, with the 2-byte ``placeholder`` string replaced by invalid UTF-8."""
    assert len(placeholder.encode()) == 2
    data = request.SerializeToString()
    assert data.count(placeholder.encode()) == 1
    return data.replace(placeholder.encode(), b"\xff\xfe")


UTF8_CASES = [
    pytest.param(lambda p: valid_request(tool=p), "action.tool", id="tool"),
    pytest.param(lambda p: valid_request(operation=p), "action.operation", id="operation"),
    pytest.param(lambda p: valid_request(resource=TICKETS + p), "action.resource", id="resource"),
    pytest.param(lambda p: valid_request(justification=p), "justification", id="justification"),
    pytest.param(lambda p: valid_request(idempotency_key=p), "idempotency_key", id="idempotency_key"),
    pytest.param(lambda p: valid_request(params={"title": p}), "action.params", id="params value"),
    pytest.param(lambda p: valid_request(params={p: 1}), "action.params", id="params key"),
    pytest.param(lambda p: valid_request(labels={"team": p}), "action.labels", id="label value"),
]


@pytest.mark.parametrize(("build", "field"), UTF8_CASES)
def test_invalid_utf8_is_refused_naming_the_field(
    server: Server, build: Callable[[str], pdp_pb2.ProposeRequest], field: str
) -> None:
    agent = server.add_agent()
    data = raw_bytes(build("@@"), "@@")
    for method in (PROPOSE, EVALUATE):
        assert_refused(server, partial(call, server.target, method, data, bearer(agent.token)), INVALID, field)


def test_raw_request_with_valid_bytes_is_accepted(server: Server) -> None:
    """The raw path itself works: only the bad bytes made the cases above fail."""
    agent = server.add_agent()
    data = valid_request(justification="@@").SerializeToString()
    response = call(server.target, PROPOSE, data, bearer(agent.token))
    assert response.decision.outcome == pdp_pb2.ALLOW
    assert server.count(agent.id) == 1


def test_invalid_utf8_in_proposal_id_is_refused(server: Server) -> None:
    agent = server.add_agent()
    data = raw_bytes(pdp_pb2.GetProposalRequest(proposal_id="@@"), "@@")
    for method in (GET, CANCEL):
        assert_refused(
            server, partial(call, server.target, method, data, bearer(agent.token), pdp_pb2.Proposal), INVALID, "id"
        )

    def watch() -> object:
        with grpc.insecure_channel(server.target) as channel:
            rpc = channel.unary_stream(
                WATCH, request_serializer=lambda b: b, response_deserializer=pdp_pb2.Proposal.FromString
            )
            try:
                return list(rpc(data, metadata=bearer(agent.token), timeout=10))
            except grpc.RpcError as exc:
                status: Any = exc
                raise PdpClientError(status.code(), status.details()) from None

    assert_refused(server, watch, INVALID, "proposal_id")


@pytest.mark.parametrize("proposal_id", ["", "   ", "x" * 65], ids=["empty", "blank", "too long"])
def test_get_proposal_with_a_bad_id_is_invalid_argument(
    server: Server, agent_client: PdpClient, proposal_id: str
) -> None:
    assert_refused(server, partial(agent_client.get, proposal_id), INVALID, "proposal_id")
    assert_refused(server, partial(agent_client.cancel, proposal_id), INVALID, "proposal_id")
    with pytest.raises(PdpClientError) as error:
        list(agent_client.watch(proposal_id, timeout=10))
    assert error.value.code == INVALID
    assert "proposal_id" in error.value.details


@pytest.mark.parametrize("proposal_id", ["\x00", "abc\x00def"], ids=["NUL", "embedded NUL"])
def test_proposal_id_with_a_nul_is_invalid_argument(server: Server, agent_client: PdpClient, proposal_id: str) -> None:
    assert_refused(server, partial(agent_client.get, proposal_id), INVALID, "proposal_id")
    assert_refused(server, partial(agent_client.cancel, proposal_id), INVALID, "proposal_id")


# --- Nesting beyond what protobuf itself parses ---------------------------------------------------------


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def deep_params_request(levels: int) -> bytes:
    """A ProposeRequest whose params nest ``levels`` objects deep, encoded by hand.

    protobuf's own parser gives up near 50 levels (Struct and Value count separately), so the Python
    client cannot even build such a request; an attacker's client can.
    """
    value = struct_pb2.Value(number_value=1).SerializeToString()
    struct = _length_delimited(1, _length_delimited(1, b"leaf") + _length_delimited(2, value))
    for _ in range(levels - 1):
        value = _length_delimited(5, struct)  # Value.struct_value
        struct = _length_delimited(1, _length_delimited(1, b"d") + _length_delimited(2, value))  # Struct.fields
    action = valid_request(params={}).action.SerializeToString() + _length_delimited(4, struct)
    return _length_delimited(1, action) + _length_delimited(2, b"why")


@pytest.mark.parametrize("levels", [MAX_PARAMS_DEPTH + 1, 60, 500])
def test_params_nested_beyond_the_parser_are_refused_naming_params(server: Server, levels: int) -> None:
    agent = server.add_agent()
    for method in (PROPOSE, EVALUATE):
        assert_refused(
            server,
            partial(call, server.target, method, deep_params_request(levels), bearer(agent.token)),
            INVALID,
            "action.params",
        )


def test_hand_encoded_params_at_the_depth_limit_are_accepted(server: Server) -> None:
    agent = server.add_agent()
    response = call(server.target, PROPOSE, deep_params_request(MAX_PARAMS_DEPTH), bearer(agent.token))
    assert response.decision.outcome == pdp_pb2.ALLOW
    assert server.count(agent.id) == 1


# --- Authentication --------------------------------------------------------------------------------


AUTH_CASES = [
    pytest.param(lambda token: (), id="no metadata"),
    pytest.param(lambda token: (("authorization", "Bearer pdp_not-a-real-token"),), id="wrong token"),
    pytest.param(lambda token: (("authorization", "Bearer "),), id="empty bearer"),
    pytest.param(lambda token: (("authorization", "Basic xyz"),), id="basic scheme"),
    pytest.param(lambda token: (("authorization", f"Basic {token}"),), id="valid token, basic scheme"),
    pytest.param(lambda token: (("authorization", token),), id="valid token, no scheme"),
    pytest.param(lambda token: (("x-api-key", token),), id="valid token, wrong header"),
]


@pytest.mark.parametrize("metadata", AUTH_CASES)
def test_bad_credentials_are_unauthenticated(
    server: Server, metadata: Callable[[str], tuple[tuple[str, str], ...]]
) -> None:
    agent = server.add_agent()
    assert_refused(
        server,
        lambda: call(server.target, PROPOSE, valid_request(), metadata(agent.token)),
        grpc.StatusCode.UNAUTHENTICATED,
        "token",
    )
    assert server.count(agent.id) == 0


def test_bearer_scheme_is_case_insensitive(server: Server) -> None:
    agent = server.add_agent()
    response = call(server.target, PROPOSE, valid_request(), (("authorization", f"bearer {agent.token}"),))
    assert response.proposal_id
    assert server.count(agent.id) == 1


def test_every_rpc_requires_a_token(server: Server) -> None:
    owner = server.client(server.add_agent().token)
    proposal_id = owner.send(valid_request(params={"count": 40})).proposal_id
    anonymous = server.client("pdp_wrong")
    calls: list[Callable[[], object]] = [
        lambda: anonymous.send(valid_request()),
        lambda: anonymous.evaluate("tickets", "POST", TICKETS, "why"),
        lambda: anonymous.get(proposal_id),
        lambda: anonymous.cancel(proposal_id),
        lambda: list(anonymous.watch(proposal_id, timeout=10)),
    ]
    for send in calls:
        assert_refused(server, send, grpc.StatusCode.UNAUTHENTICATED, "token")
    assert owner.get(proposal_id).state == pdp_pb2.PENDING_APPROVAL


def test_revoked_token_is_refused_on_the_very_next_request(server: Server) -> None:
    agent = server.add_agent()
    client = server.client(agent.token)
    first = client.send(valid_request())
    assert first.decision.outcome == pdp_pb2.ALLOW

    revoke_agent(server.engine, agent.id)

    assert_refused(server, lambda: client.send(valid_request()), grpc.StatusCode.UNAUTHENTICATED, "revoked")
    assert_refused(server, lambda: client.get(first.proposal_id), grpc.StatusCode.UNAUTHENTICATED, "revoked")
    assert server.count(agent.id) == 1


REVOKED_CALLS: dict[str, Callable[[PdpClient, str], object]] = {
    "Propose": lambda c, _id: c.send(valid_request()),
    "Evaluate": lambda c, _id: c.evaluate("tickets", "POST", TICKETS, "why"),
    "GetProposal": lambda c, pid: c.get(pid),
    "CancelProposal": lambda c, pid: c.cancel(pid),
    "WatchProposal": lambda c, pid: list(c.watch(pid, timeout=10)),
}


@pytest.mark.parametrize("rpc", list(REVOKED_CALLS))
def test_revocation_beats_the_identity_cache_on_every_rpc(server: Server, rpc: str) -> None:
    """The server caches verified identities; each RPC must still see a revocation at once."""
    agent = server.add_agent()
    client = server.client(agent.token)
    pending = client.send(valid_request(params={"count": 40}))  # warms the cache for this token
    assert pending.state == pdp_pb2.PENDING_APPROVAL

    revoke_agent(server.engine, agent.id)

    assert_refused(
        server, lambda: REVOKED_CALLS[rpc](client, pending.proposal_id), grpc.StatusCode.UNAUTHENTICATED, "revoked"
    )
    assert server.count(agent.id) == 1
    row = server.row(pending.proposal_id)
    # Revocation itself cancelled the pending proposal; the revoked agent's own calls changed nothing.
    assert row is not None and row["state"] == "CANCELLED"


# --- The server refuses to start on a broken bundle or an old schema --------------------------------


def _serve(database_url: str, policy_dir: Path, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PDP, "serve", "--policy-dir", str(policy_dir), "--database-url", database_url, "--grpc-addr", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
        check=False,
    )


def test_serve_refuses_a_bundle_with_a_type_error(tmp_path: Path, cli_env: dict[str, str]) -> None:
    bundle, line = broken_bundle(tmp_path)
    database = f"sqlite:///{tmp_path / 'pdp.db'}"
    upgrade(database)

    result = _serve(database, bundle, cli_env, tmp_path)

    assert result.returncode != 0
    assert f"support.yaml:{line}" in result.stderr, result.stderr
    assert "resourse" in result.stderr


def test_serve_refuses_a_bundle_that_fails_its_own_tests(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """The bar hot reload sets, at startup too: a restart must not activate what a reload would refuse."""
    bundle = tmp_path / "policies"
    shutil.copytree(POLICIES, bundle)
    tests = bundle / "tests" / "support.yaml"
    tests.write_text(
        tests.read_text().replace("expect: {outcome: allow, rules: [tickets-read]}", "expect: {outcome: deny}", 1)
    )
    database = f"sqlite:///{tmp_path / 'pdp.db'}"
    upgrade(database)

    result = _serve(database, bundle, cli_env, tmp_path)

    assert result.returncode != 0
    assert "fails its own tests" in result.stderr and "tests/support.yaml:" in result.stderr, result.stderr


def test_serve_refuses_an_unmigrated_database(empty_database_url: str, tmp_path: Path, cli_env: dict[str, str]) -> None:
    result = _serve(empty_database_url, POLICIES, cli_env, tmp_path)

    assert result.returncode != 0
    assert "pdp db upgrade" in result.stderr, result.stderr


def test_serve_refuses_an_address_another_server_holds(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """A second `pdp serve` on a port a running server holds must fail, not silently share its traffic."""
    database = f"sqlite:///{tmp_path / 'pdp.db'}"
    upgrade(database)
    with running_server(database) as first:
        address = first.target
        result = subprocess.run(
            [PDP, "serve", "--policy-dir", str(POLICIES), "--database-url", database, "--grpc-addr", address],
            capture_output=True,
            text=True,
            env=cli_env,
            cwd=tmp_path,
            timeout=60,
            check=False,
        )
    assert result.returncode == 2
    assert f"cannot listen on {address}" in result.stderr
    assert "Traceback" not in result.stderr


def test_server_starts_once_the_database_is_upgraded(empty_database_url: str) -> None:
    """The refusal above is about the schema, not the database: after an upgrade the same URL serves."""
    upgrade(empty_database_url)
    with running_server(empty_database_url) as server:
        client = server.client(server.add_agent().token)
        assert client.send(valid_request()).decision.outcome == pdp_pb2.ALLOW
