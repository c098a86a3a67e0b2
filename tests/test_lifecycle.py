"""Server lifecycle and configuration: graceful shutdown, bounded watch streams, settings precedence."""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
from conftest import BULK_CLOSE, PDP, POLICIES, BackgroundServer, Server, proposal_row, running_server, server_config
from grpc_health.v1 import health_pb2, health_pb2_grpc

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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _serving(address: str) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="pdp.v1.PolicyDecisionPoint"), timeout=1.0
            )
    except grpc.RpcError:
        return False
    return bool(status.status == health_pb2.HealthCheckResponse.SERVING)


def test_workers_share_one_port_and_stop_together(database_url: str, tmp_path: Path, cli_env: dict[str, str]) -> None:
    token = add_agent(create_db_engine(database_url), "fleet", "o", ("support",))
    address = f"127.0.0.1:{_free_port()}"
    command = [PDP, "serve", "--database-url", database_url, "--policy-dir", str(POLICIES), "--grpc-addr", address]
    if database_url.startswith("sqlite"):
        refused = subprocess.run(
            [*command, "--workers", "2"],
            env=cli_env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert refused.returncode == 2
        assert "--workers > 1 needs PostgreSQL" in refused.stderr
        return
    server = subprocess.Popen([*command, "--workers", "2"], env=cli_env, cwd=tmp_path, text=True)
    ids: set[str] = set()
    try:
        deadline = time.monotonic() + WAIT
        while not _serving(address):
            assert server.poll() is None, "pdp serve --workers 2 exited while starting"
            assert time.monotonic() < deadline, "pdp serve --workers 2 did not become healthy"
            time.sleep(0.2)
        # Separate connections: the kernel spreads them over the workers; every one must be answered.
        for i in range(8):
            with PdpClient(address, token) as client:
                ids.add(client.propose("tickets", "POST", BULK_CLOSE, f"close {i}", params={"count": 40}).proposal_id)
        assert len(ids) == 8

        # A second server must not join the workers on their port.
        second = subprocess.run(
            [*command, "--workers", "2"],
            env=cli_env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert second.returncode == 2
        assert f"cannot listen on {address}" in second.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
    engine = create_db_engine(database_url)
    try:
        assert all(proposal_row(engine, pid) is not None for pid in ids)
    finally:
        engine.dispose()
