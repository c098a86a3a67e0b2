"""Server lifecycle and configuration: graceful shutdown, bounded watch streams, settings precedence."""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

import grpc
import pytest
from conftest import BULK_CLOSE, BackgroundServer, Server, proposal_row, running_server, server_config

from pdp.client import PdpClient, PdpClientError
from pdp.config import Config, add_arguments, from_args
from pdp.identity.agents import add_agent
from pdp.server.grpc_api import MAX_WATCHES_PER_AGENT
from pdp.store.database import create_db_engine
from pdp.store.migrate import upgrade
from pdp.v1 import pdp_pb2, pdp_pb2_grpc

WAIT = 30.0


def _pending(client: PdpClient) -> str:
    response = client.propose("tickets", "POST", BULK_CLOSE, "close duplicates", params={"count": 40})
    assert response.state == pdp_pb2.PENDING_APPROVAL
    return response.proposal_id


def test_watch_streams_per_agent_are_bounded(server: Server) -> None:
    agent, client = server.agent_client()
    proposal_id = _pending(client)
    channel = grpc.insecure_channel(server.target)
    stub = pdp_pb2_grpc.PolicyDecisionPointStub(channel)
    metadata = (("authorization", f"Bearer {agent.token}"),)
    streams = []
    try:
        for _ in range(MAX_WATCHES_PER_AGENT):
            stream = stub.WatchProposal(pdp_pb2.GetProposalRequest(proposal_id=proposal_id), metadata=metadata)
            assert next(stream).state == pdp_pb2.PENDING_APPROVAL  # the server now holds this stream open
            streams.append(stream)
        one_too_many = stub.WatchProposal(pdp_pb2.GetProposalRequest(proposal_id=proposal_id), metadata=metadata)
        with pytest.raises(grpc.RpcError) as refused:
            next(one_too_many)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        # Another agent is not affected by this agent's streams.
        _, other = server.agent_client()
        other_id = _pending(other)
        other_stream = other.watch(other_id, timeout=WAIT)
        assert next(other_stream).state == pdp_pb2.PENDING_APPROVAL
    finally:
        for stream in streams:
            stream.cancel()
        channel.close()


def _config(database_url: str, environment: str = "dev") -> Config:
    return server_config(database_url, environment=environment)


def test_shutdown_ends_open_watch_streams_with_a_clear_status(tmp_path: Path) -> None:
    """A watch stream must not hold shutdown for the whole grace period, and must say why it ended."""
    url = f"sqlite:///{tmp_path / 'pdp.db'}"
    upgrade(url)
    token = add_agent(create_db_engine(url), "watcher", "o", ("support",))
    background = BackgroundServer(_config(url))
    client = PdpClient(f"127.0.0.1:{background.running.port}", token)
    try:
        proposal_id = _pending(client)
        stream = client.watch(proposal_id, timeout=WAIT)
        assert next(stream).state == pdp_pb2.PENDING_APPROVAL
        ended: list[BaseException] = []

        def drain() -> None:
            try:
                for _ in stream:
                    pass
            except PdpClientError as exc:
                ended.append(exc)

        reader = threading.Thread(target=drain)
        reader.start()
        background.stop()
        reader.join(WAIT)
        assert not reader.is_alive()
        assert len(ended) == 1
        error = ended[0]
        assert isinstance(error, PdpClientError)
        assert error.code == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in error.details
    finally:
        client.close()


def test_queued_writes_are_committed_at_shutdown(tmp_path: Path) -> None:
    """Every proposal acknowledged before shutdown is in the database afterwards."""
    url = f"sqlite:///{tmp_path / 'pdp.db'}"
    upgrade(url)
    engine = create_db_engine(url)
    token = add_agent(engine, "writer", "o", ("support",))
    background = BackgroundServer(_config(url))
    client = PdpClient(f"127.0.0.1:{background.running.port}", token)
    acknowledged: list[str] = []
    try:
        for i in range(20):
            acknowledged.append(
                client.propose("tickets", "POST", BULK_CLOSE, f"batch {i}", params={"count": 40}).proposal_id
            )
    finally:
        client.close()
        background.stop()
    assert all(proposal_row(engine, pid) is not None for pid in acknowledged)


@pytest.mark.parametrize(("environment", "outcome"), [("dev", pdp_pb2.ALLOW), ("prod", pdp_pb2.DENY)])
def test_environment_setting_reaches_policy(database_url: str, environment: str, outcome: int) -> None:
    """PDP_ENVIRONMENT is `context.environment` in CEL: the example bundle forbids deletes in prod."""
    with running_server(database_url, environment=environment) as server:
        _, client = server.agent_client()
        decision = client.propose(
            "scratch", "DELETE", "https://scratch.internal/notes/old", "clean up my scratch notes"
        ).decision
        assert decision.outcome == outcome
        if environment == "prod":
            assert "rule:prod-no-deletes" in [r.rule_id for r in decision.reasons]


def test_flags_win_over_variables_which_win_over_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    monkeypatch.setenv("PDP_GRPC_ADDR", "127.0.0.1:6000")
    monkeypatch.setenv("PDP_ENVIRONMENT", "staging")
    monkeypatch.delenv("PDP_POLICY_DIR", raising=False)
    config = from_args(parser.parse_args(["--environment", "prod"]))
    assert config.environment == "prod"  # flag over variable
    assert config.grpc_addr == "127.0.0.1:6000"  # variable over default
    assert config.policy_dir == "policies"  # default
