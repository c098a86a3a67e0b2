"""Helpers for execution tests: a real target HTTP server, a bundle pointing at it, and executors.

The target records every request it receives, so tests count exactly what reached it. Paths choose
its behaviour: ``/api/items`` answers 201 with JSON, ``/api/echo`` echoes the request headers back,
``/api/fail`` fails with a 500 that quotes the Authorization header, ``/api/status/<code>`` answers ``<code>``
with the request body and headers (as httpbin's ``/anything`` does, body first), ``/api/slow`` and
``/api/kv/…`` wait ``slow_seconds`` first (``/api/kv/`` is the idempotent tool). Every reply's body is kept
in ``Seen.reply``, so a test knows exactly where the target put what.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml
from conftest import Server, fresh_database, running_server, signing_key
from sqlalchemy import Engine, select

from executor.config import load
from executor.main import build
from executor.worker import Executor
from pdp.audit.keys import public_path
from pdp.client import PdpClient
from pdp.store.migrate import upgrade
from pdp.store.models import audit_events

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    reply: bytes = b""


@dataclass
class Target:
    """A real HTTP API on a free port; ``token`` is what it expects as a bearer token."""

    token: str = field(default_factory=lambda: "tok-" + secrets.token_urlsafe(24))
    slow_seconds: float = 0.0
    fail_status: int = 500
    seen: list[Seen] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        target = self

        class Handler(BaseHTTPRequestHandler):
            seen: Seen  # this request, so its reply can be kept with it

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                self.seen = Seen(self.command, self.path, dict(self.headers.items()), body)
                with target._lock:
                    target.seen.append(self.seen)
                if self.path.startswith(("/api/slow", "/api/kv/")):
                    time.sleep(target.slow_seconds)
                if self.headers.get("authorization") != f"Bearer {target.token}":
                    return self._send(401, {"error": "bad token"})
                if self.path.startswith("/api/fail"):
                    auth = self.headers.get("authorization")
                    return self._send(target.fail_status, {"error": f"upstream broke while handling {auth}"})
                if self.path.startswith("/api/echo"):
                    return self._send(200, {"headers": dict(self.headers.items())})
                if self.path.startswith("/api/status/"):
                    status = int(self.path.removeprefix("/api/status/"))
                    return self._send(status, {"data": body.decode(), "headers": dict(self.headers.items())})
                return self._send(201, {"id": len(target.seen), "path": self.path, "received": body.decode()})

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.seen.reply = data
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("x-upstream-token", target.token)  # must never be returned
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the caller timed out
                    self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle  # noqa: N815 — http.server names them

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/api/"

    def request_for(self, proposal_id: str) -> Seen:
        """The one request the executor sent for ``proposal_id`` (its ``Idempotency-Key``)."""
        with self._lock:
            found = [s for s in self.seen if s.headers.get("Idempotency-Key") == proposal_id]
        assert len(found) == 1, f"{len(found)} requests for {proposal_id}"
        return found[0]

    def count(self, path_prefix: str = "/api/") -> int:
        with self._lock:
            return sum(1 for s in self.seen if s.path.startswith(path_prefix))

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def target_server() -> Iterator[Target]:
    target = Target()
    target.start()
    try:
        yield target
    finally:
        target.stop()


def write_bundle(directory: Path, target_url: str, rules: Sequence[dict[str, Any]] = ()) -> Path:
    """Tools `web` (http), `kv` (idempotent http) and `crm` (sql); support agents may do anything ``rules``
    (extra rules, e.g. a deny) do not forbid."""
    directory.mkdir(parents=True, exist_ok=True)
    documents = [
        {
            "apiVersion": "pdp/v1",
            "kind": "Bundle",
            "name": "execution-tests",
            "default_tier": "ai_writable",
            "default_effect": "deny",
            "default_approval": {"groups": ["ops"], "min_approvals": 1, "expires_in": "1h"},
        },
        {
            "apiVersion": "pdp/v1",
            "kind": "Tools",
            "tools": [
                {
                    "name": "web",
                    "type": "http",
                    "resource_prefix": target_url,
                    "operations": {"GET": "read", "POST": "write", "PATCH": "write"},
                },
                {
                    "name": "kv",
                    "type": "http",
                    "resource_prefix": target_url + "kv/",
                    "operations": {"GET": "read", "PUT": "write"},
                    "idempotent": True,
                },
                {
                    "name": "crm",
                    "type": "sql",
                    "resource_prefix": "sql://crm/",
                    "operations": {"select": "read", "insert": "write", "update": "write", "delete": "write"},
                },
            ],
        },
        {
            "apiVersion": "pdp/v1",
            "kind": "Rules",
            "rules": [
                *rules,
                {"id": "support-may", "effect": "allow", "when": '"support" in agent.roles'},
                {
                    "id": "big-needs-approval",
                    "effect": "needs_approval",
                    "when": "has(action.params.big) && action.params.big == true",
                },
            ],
        },
    ]
    (directory / "bundle.yaml").write_text(yaml.safe_dump_all(documents, sort_keys=False))
    return directory


def crm_database(directory: Path) -> Path:
    """A real SQLite CRM with a contacts table; returns the file holding its URL (a credential)."""
    db = directory / "crm.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS contacts (id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT)")
        conn.execute("INSERT INTO contacts (name, email) VALUES ('Ada', 'ada@example.com'), ('Bob', 'bob@example.com')")
    url_file = directory / "crm.url"
    url_file.write_text(f"sqlite:///{db}\n")
    return url_file


def executor_config(
    directory: Path,
    *,
    database_url: str,
    policy_dir: Path,
    signing_key: Path,
    token_file: Path,
    crm_url_file: Path | None = None,
    timeout: str = "5s",
    http: Mapping[str, Any] | None = None,
    **settings: Any,
) -> Path:
    """An executor config file; credentials are file references, as in production. ``http``: more keys for
    the sections of both http tools (``max_response_bytes``, ...)."""
    authorization = {"Authorization": {"file": str(token_file), "template": "Bearer {}"}}
    tools: dict[str, Any] = {
        name: {"timeout": timeout, "headers": authorization, **(http or {})} for name in ("web", "kv")
    }
    if crm_url_file is not None:
        tools["crm"] = {"databases": {"crm": {"file": str(crm_url_file)}}}
    config = {
        "database_url": database_url,
        "public_key": str(public_path(signing_key)),
        "policy_dir": str(policy_dir),
        "poll_interval": "20ms",
        "metrics_addr": "127.0.0.1:0",  # several executors run at once
        "tools": tools,
        **settings,
    }
    path = directory / "executor.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass
class Stack:
    """A recording target, a fresh database, the test bundle, an in-process PDP and one support agent."""

    server: Server
    target: Target
    client: PdpClient
    tmp: Path
    bundle: Path
    token_file: Path
    crm_url_file: Path | None = None

    @property
    def engine(self) -> Engine:
        return self.server.engine

    def config(self, *, key: Path | None = None, **settings: Any) -> Path:
        """An executor config for this stack (trusting ``key``'s public half, by default the PDP's)."""
        return executor_config(
            self.tmp,
            database_url=self.server.database_url,
            policy_dir=self.bundle,
            signing_key=key or signing_key(),
            token_file=self.token_file,
            crm_url_file=self.crm_url_file,
            **settings,
        )

    def audit(self, pid: str) -> list[tuple[str, dict[str, Any]]]:
        """(type, data) of the proposal's audit events, in order."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(audit_events.c.type, audit_events.c.body)
                .where(audit_events.c.proposal_id == pid)
                .order_by(audit_events.c.seq)
            ).all()
        return [(row.type, json.loads(row.body)["data"]) for row in rows]

    def audit_types(self, pid: str) -> list[str]:
        return [kind for kind, _ in self.audit(pid)]


@contextmanager
def execution_stack(
    backend: str, tmp_path: Path, *, crm: bool = False, rules: Sequence[dict[str, Any]] = ()
) -> Iterator[Stack]:
    with target_server() as target, fresh_database(backend, tmp_path) as url:
        upgrade(url)
        bundle = write_bundle(tmp_path / "bundle", target.url, rules)
        token_file = tmp_path / "target.token"
        token_file.write_text(target.token)
        crm_url_file = crm_database(tmp_path) if crm else None
        with running_server(url, policy_dir=bundle) as server:
            _agent, client = server.agent_client()
            yield Stack(server, target, client, tmp_path, bundle, token_file, crm_url_file)


@contextmanager
def running_executor(config: Path) -> Iterator[Executor]:
    executor = build(load(config, env={}))
    executor.start()
    try:
        yield executor
    finally:
        executor.stop()


class ExecutorProcess:
    """`pdp-executor` as its own process, its output captured to a file."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log
        self._log = log.open("ab")
        environ = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}
        environ.update(env or {})
        environ["PYTHONUNBUFFERED"] = "1"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "executor.main", "--config", str(config)],
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=environ,
        )

    def wait_started(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "executing tools" in self.output():
                return
            if self.process.poll() is not None:
                raise AssertionError(f"pdp-executor exited {self.process.returncode}:\n{self.output()}")
            time.sleep(0.05)
        raise AssertionError(f"pdp-executor did not start:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)
        self._log.close()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(2)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()
        return self.process.returncode
