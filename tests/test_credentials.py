"""Credential isolation, end to end: only `pdp-executor` ever holds the target's token.

`pdp serve` and `pdp-executor` run as separate processes with their output captured. The executor gets
the token only by reference (a file, or an environment variable set in its own environment alone). After
a scenario that succeeds, echoes the request headers back, fails with the header quoted, reads a SQL
table and is denied, the token — raw, URL-quoted or base64 — must appear nowhere the PDP side can see:
any table of the PDP database, `pdp audit export`, either process's output, any response the agent got,
the checkpoint file, or the PDP process's environment.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
import yaml
from conftest import PDP, ServeProcess, fresh_database, pdp_env, signing_key, start_serve
from execution import ExecutorProcess, Target, crm_database, executor_config, target_server, write_bundle
from google.protobuf.json_format import MessageToDict, MessageToJson
from google.protobuf.message import Message
from sqlalchemy import MetaData, Table, inspect, select

from pdp.client import PdpClient
from pdp.identity.agents import add_agent
from pdp.store.database import create_db_engine
from pdp.store.migrate import upgrade
from pdp.v1 import pdp_pb2

TOKEN_VARIABLE = "TARGET_API_TOKEN"


def leaked_forms(token: str) -> dict[str, str]:
    """Every way the credential could show up: the token and the header value, raw, URL-quoted and base64."""
    forms: dict[str, str] = {}
    for label, value in (("token", token), ("header", f"Bearer {token}")):
        raw = value.encode()
        forms[f"{label}"] = value
        forms[f"{label} url-quoted"] = quote(value, safe="")
        forms[f"{label} url-quoted-plus"] = quote_plus(value, safe="")
        forms[f"{label} base64"] = base64.b64encode(raw).decode().rstrip("=")
        forms[f"{label} base64url"] = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    return forms


def assert_no_credential(where: str, text: str, token: str) -> None:
    for form, value in leaked_forms(token).items():
        assert value not in text, f"the credential ({form}) leaked into {where}"


def executor_yaml(
    directory: Path, *, source: str, database_url: str, bundle: Path, token: str
) -> tuple[Path, dict[str, str]]:
    """The executor's config, with the token referenced by file or by variable; and the executor's extra env."""
    token_file = directory / "target.token"
    config = executor_config(
        directory,
        database_url=database_url,
        policy_dir=bundle,
        signing_key=signing_key(),
        token_file=token_file,
        crm_url_file=crm_database(directory),
        timeout="5s",
    )
    if source == "file":
        token_file.write_text(token + "\n")
        return config, {}
    settings: dict[str, Any] = yaml.safe_load(config.read_text())
    for tool in ("web", "kv"):
        settings["tools"][tool]["headers"] = {"Authorization": {"env": TOKEN_VARIABLE, "template": "Bearer {}"}}
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    assert not token_file.exists()
    return config, {TOKEN_VARIABLE: token}


@dataclass
class Stack:
    tmp: Path
    source: str
    database_url: str
    target: Target
    serve: ServeProcess
    executor: ExecutorProcess
    config: Path
    checkpoint_file: Path
    cli_env: dict[str, str]
    clients: list[PdpClient] = field(default_factory=list)

    def client(self, roles: tuple[str, ...]) -> PdpClient:
        engine = create_db_engine(self.database_url)
        try:
            token = add_agent(engine, f"agent-{'-'.join(roles)}-{len(self.clients)}", "tester", roles)
        finally:
            engine.dispose()
        client = PdpClient(self.serve.address, token)
        self.clients.append(client)
        return client

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        self.clients.clear()
        executor_code = self.executor.stop()
        serve_code = self.serve.stop()
        assert executor_code == 0, self.executor.output()
        assert serve_code == 0, self.serve.output()


@pytest.fixture(
    params=[
        pytest.param(("sqlite", "file"), id="sqlite-file"),
        pytest.param(("sqlite", "env"), id="sqlite-env"),
        pytest.param(("postgres", "file"), id="postgres-file", marks=pytest.mark.postgres),
        pytest.param(("postgres", "env"), id="postgres-env", marks=pytest.mark.postgres),
    ]
)
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    backend, source = request.param
    cli_env = pdp_env(tmp_path)
    with target_server() as target, fresh_database(backend, tmp_path) as url:
        upgrade(url)
        bundle = write_bundle(tmp_path / "bundle", target.url)
        config, executor_env = executor_yaml(
            tmp_path, source=source, database_url=url, bundle=bundle, token=target.token
        )
        assert_no_credential("the executor's config file", config.read_text(), target.token)
        assert target.token not in json.dumps(cli_env)
        serve = start_serve(url, tmp_path, cli_env, policy_dir=bundle)
        try:
            executor = ExecutorProcess(config, tmp_path / "executor.log", env=executor_env)
            try:
                executor.wait_started()
            except BaseException:
                executor.stop()
                raise
        except BaseException:
            serve.stop()
            raise
        stack = Stack(
            tmp_path, source, url, target, serve, executor, config, Path(cli_env["PDP_CHECKPOINT_FILE"]), cli_env
        )
        try:
            yield stack
        finally:
            stack.stop()


def dump_database(database_url: str) -> tuple[str, int]:
    """Every row of every table of the PDP database as text, and how many rows there were."""
    engine = create_db_engine(database_url)
    lines: list[str] = []
    try:
        names = inspect(engine).get_table_names()
        assert {"proposals", "audit_events", "executions", "execution_tickets"} <= set(names), names
        with engine.connect() as conn:
            for name in names:
                table = Table(name, MetaData(), autoload_with=conn)
                for row in conn.execute(select(table)).mappings():
                    lines.append(f"{name}: " + " | ".join(f"{key}={_as_text(value)}" for key, value in row.items()))
    finally:
        engine.dispose()
    return "\n".join(lines), len(lines)


def _as_text(value: Any) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        return raw.decode("utf-8", errors="replace") + " " + raw.hex()
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def proc_file(pid: int, name: str) -> bytes:
    path = Path(f"/proc/{pid}/{name}")
    if not path.exists():
        pytest.skip("needs Linux /proc")
    return path.read_bytes()


def test_the_credential_reaches_the_target_and_nothing_the_pdp_side_sees(stack: Stack) -> None:
    token, target = stack.target.token, stack.target
    support, sales = stack.client(("support",)), stack.client(("sales",))
    responses: list[Message] = []

    proposals: dict[str, str] = {}
    for name, (tool, operation, resource, params) in {
        "items": ("web", "POST", target.url + "items", {"title": "printer on fire"}),
        "echo": ("web", "GET", target.url + "echo", {}),
        "fail": ("web", "POST", target.url + "fail", {"n": 1}),
        "sql": ("crm", "select", "sql://crm/contacts", {"where": {"name": "Ada"}}),
    }.items():
        response = support.propose(tool, operation, resource, "credential isolation test", params=params or None)
        responses.append(response)
        assert response.decision.outcome == pdp_pb2.ALLOW, response
        proposals[name] = response.proposal_id
    denied = sales.propose("web", "POST", target.url + "items", "not allowed to", params={"title": "x"})
    responses.append(denied)
    assert denied.decision.outcome == pdp_pb2.DENY, denied

    final = {name: support.wait(pid, timeout=60) for name, pid in proposals.items()}
    responses.extend(final.values())
    for pid in proposals.values():
        responses.append(support.get(pid))
    responses.append(sales.get(denied.proposal_id))

    # The positive half: each call really carried the right token, and the results are the real ones.
    states = {name: pdp_pb2.ProposalState.Name(p.state) for name, p in final.items()}
    errors = {name: p.execution.error for name, p in final.items()}
    assert states == {"items": "SUCCEEDED", "echo": "SUCCEEDED", "fail": "FAILED", "sql": "SUCCEEDED"}, errors
    assert sorted(s.path for s in target.seen) == ["/api/echo", "/api/fail", "/api/items"]
    for seen in target.seen:
        assert seen.headers["Authorization"] == f"Bearer {token}", seen

    items = MessageToDict(final["items"].execution.result)
    assert items["status"] == 201
    # Only the selected response headers come back: the target's x-upstream-token (which it does send) not.
    with urllib.request.urlopen(
        urllib.request.Request(target.url + "items", headers={"Authorization": f"Bearer {token}"})
    ) as direct:
        assert direct.headers["x-upstream-token"] == token
    assert "content-type" in items["headers"]
    assert not any(name.lower() == "x-upstream-token" for name in items["headers"]), items["headers"]

    echoed = MessageToDict(final["echo"].execution.result)
    auth = [value for name, value in echoed["body"]["headers"].items() if name.lower() == "authorization"]
    assert auth == ["[REDACTED]"], echoed
    assert "HTTP 500" in final["fail"].execution.error
    assert "[REDACTED]" in final["fail"].execution.error, final["fail"].execution.error
    assert MessageToDict(final["sql"].execution.result)["rows"][0]["name"] == "Ada"

    # Everything the agent received.
    for message in responses:
        assert_no_credential("a response to the agent", MessageToJson(message), token)

    stack.stop()  # outputs complete, the final checkpoint written

    dump, rows = dump_database(stack.database_url)
    assert rows > 10 and "[REDACTED]" in dump and proposals["echo"] in dump
    assert_no_credential("the PDP database", dump, token)

    export = subprocess.run(
        [PDP, "audit", "export", "--database-url", stack.database_url],
        check=False,
        env=stack.cli_env,
        cwd=stack.tmp,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert export.returncode == 0, export.stderr
    events = [json.loads(line) for line in export.stdout.splitlines()]
    types = {event["type"] for event in events}
    assert {"proposal.decided", "execution.started", "execution.succeeded", "execution.failed"} <= types, types
    assert "[REDACTED]" in export.stdout
    assert_no_credential("`pdp audit export`", export.stdout + export.stderr, token)

    assert "executing tools" in stack.executor.output() and "agent gRPC API on" in stack.serve.output()
    assert_no_credential("pdp-executor's output", stack.executor.output(), token)
    assert_no_credential("pdp serve's output", stack.serve.output(), token)

    checkpoints = stack.checkpoint_file.read_text()
    assert checkpoints.strip(), "pdp serve wrote no checkpoint on shutdown"
    assert_no_credential("the checkpoint file", checkpoints, token)


def test_the_pdp_process_never_holds_the_credential(stack: Stack) -> None:
    token = stack.target.token.encode()
    pdp_pid, executor_pid = stack.serve.process.pid, stack.executor.process.pid
    # The PDP serves and decides, so it is the right process (not a wrapper) and alive.
    assert stack.serve.process.poll() is None and stack.executor.process.poll() is None
    assert b"serve" in proc_file(pdp_pid, "cmdline")

    for name in ("environ", "cmdline"):
        assert token not in proc_file(pdp_pid, name), f"/proc/<pdp serve>/{name} holds the credential"
        assert token not in proc_file(executor_pid, "cmdline")
    pdp_environ = proc_file(pdp_pid, "environ").split(b"\0")
    assert not any(entry.startswith(TOKEN_VARIABLE.encode() + b"=") for entry in pdp_environ)
    # No open file of the PDP is the token file either.
    fds = Path(f"/proc/{pdp_pid}/fd")
    for fd in fds.iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile
            assert os.readlink(fd) != str(stack.tmp / "target.token")

    executor_environ = proc_file(executor_pid, "environ")
    if stack.source == "env":
        # The check above could not pass vacuously: /proc shows the variable where it was given.
        assert TOKEN_VARIABLE.encode() + b"=" + token in executor_environ.split(b"\0")
    else:
        assert token not in executor_environ
        assert (stack.tmp / "target.token").read_text().strip() == stack.target.token
