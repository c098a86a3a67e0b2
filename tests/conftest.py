"""Real parts for integration tests: SQLite files, fresh PostgreSQL databases, an in-process gRPC server.

Databases:
    ``empty_database_url``  a fresh, un-migrated database, once per backend (sqlite, postgres)
    ``database_url``        the same, upgraded to the newest schema with Alembic (never ``create_all``)
    ``server``              a running server on a free port over a migrated database (one per module and
                            backend), with an engine to inspect rows and helpers to create agents

PostgreSQL comes from ``PDP_TEST_POSTGRES_URL`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``);
each test database has a random name and is dropped afterwards. Unreachable PostgreSQL skips its tests, except in
CI (``CI`` set and not ``false``/``0``), where a missing dependency is a failure.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from psycopg import sql
from sqlalchemy import Engine, func, select
from sqlalchemy.engine import make_url

from pdp.audit.keys import init_key
from pdp.client import PdpClient
from pdp.config import Config
from pdp.identity.agents import add_agent
from pdp.server.app import RunningServer, start
from pdp.store.database import create_db_engine
from pdp.store.migrate import upgrade
from pdp.store.models import proposals

REPO = Path(__file__).resolve().parents[1]
POLICIES = REPO / "policies"
# The `pdp` console script of the interpreter running the tests (the project's venv).
PDP = str(Path(sys.executable).parent / "pdp")

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
BACKENDS = [pytest.param("sqlite", id="sqlite"), pytest.param("postgres", id="postgres", marks=pytest.mark.postgres)]

# The three calls of the README demo, as the development agent (roles [support]) makes them.
TICKETS = "http://127.0.0.1:8282/api/tickets"
BULK_CLOSE = "http://127.0.0.1:8282/api/tickets/bulk-close"
ADMIN_MEMBERS = "iam://roles/admin/members"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`@pytest.mark.backend("postgres")`: collect the test for that database only (deselected, not skipped,
    elsewhere), so a CI log's skips can only mean a missing dependency."""
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        marker = item.get_closest_marker("backend")
        callspec = getattr(item, "callspec", None)
        backends = {v for v in callspec.params.values() if v in ("sqlite", "postgres")} if callspec else set()
        (dropped if marker and backends and marker.args[0] not in backends else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "false", "0")


def postgres_url() -> str:
    return os.environ.get("PDP_TEST_POSTGRES_URL") or DEFAULT_POSTGRES_URL


def _libpq(url: str) -> str:
    """A SQLAlchemy URL as a libpq connection string psycopg accepts."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


_postgres_problem: list[str] = []  # memo: reachability is probed once per session


def _require_postgres() -> None:
    if not _postgres_problem:
        try:
            with psycopg.connect(_libpq(postgres_url()), autocommit=True, connect_timeout=5) as conn:
                conn.execute("SELECT 1")
            _postgres_problem.append("")
        except psycopg.Error as exc:
            _postgres_problem.append(f"PostgreSQL at {make_url(postgres_url())!r} is unreachable: {exc}".strip())
    problem = _postgres_problem[0]
    if problem:
        if in_ci():
            pytest.fail(f"{problem} (CI is set: a missing dependency is a failure)")
        pytest.skip(f"{problem} (set PDP_TEST_POSTGRES_URL, or CI=1 to make this a failure)")


@contextmanager
def fresh_database(backend: str, directory: Path) -> Iterator[str]:
    """A new, empty database for ``backend``; PostgreSQL ones are dropped afterwards."""
    if backend == "sqlite":
        yield f"sqlite:///{directory / 'pdp.db'}"
        return
    _require_postgres()
    admin = _libpq(postgres_url())
    name = f"pdp_test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_url(postgres_url()).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(params=BACKENDS)
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database with no schema at all."""
    with fresh_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def database_url(empty_database_url: str) -> str:
    """A fresh database at the newest schema."""
    upgrade(empty_database_url)
    return empty_database_url


def count_proposals(engine: Engine, agent_id: str | None = None) -> int:
    query = select(func.count()).select_from(proposals)
    if agent_id is not None:
        query = query.where(proposals.c.agent_id == agent_id)
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def proposal_row(engine: Engine, proposal_id: str) -> dict[str, Any] | None:
    with engine.connect() as conn:
        row = conn.execute(select(proposals).where(proposals.c.id == proposal_id)).mappings().first()
    return dict(row) if row is not None else None


_agent_numbers = itertools.count(1)


@dataclass
class Agent:
    id: str
    token: str


@dataclass
class Server:
    """A running server and what a test needs to talk to it and to look at its database."""

    target: str
    database_url: str
    engine: Engine
    running: RunningServer | None = None  # the in-process server's parts (admin port, approvals, bundles)
    _clients: list[PdpClient] = field(default_factory=list)

    @property
    def admin_url(self) -> str:
        assert self.running is not None
        return f"http://127.0.0.1:{self.running.admin.port}"

    def add_agent(self, roles: tuple[str, ...] = ("support",), owner: str = "tester", prefix: str = "agent") -> Agent:
        """A new agent with a unique id; returns its id and token."""
        agent_id = f"{prefix}-{next(_agent_numbers)}-{uuid.uuid4().hex[:6]}"
        return Agent(agent_id, add_agent(self.engine, agent_id, owner, roles))

    def client(self, token: str) -> PdpClient:
        client = PdpClient(self.target, token)
        self._clients.append(client)
        return client

    def agent_client(self, roles: tuple[str, ...] = ("support",)) -> tuple[Agent, PdpClient]:
        agent = self.add_agent(roles)
        return agent, self.client(agent.token)

    def count(self, agent_id: str | None = None) -> int:
        """Rows in the proposals table (of one agent, when given)."""
        return count_proposals(self.engine, agent_id)

    def row(self, proposal_id: str) -> dict[str, Any] | None:
        return proposal_row(self.engine, proposal_id)

    def close_clients(self) -> None:
        for client in self._clients:
            client.close()
        self._clients.clear()


class BackgroundServer:
    """``pdp.server.app.start`` on an asyncio loop of its own thread, as ``pdp serve`` runs it."""

    def __init__(self, config: Config) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-grpc-server", daemon=True)
        self._thread.start()
        try:
            self.running: RunningServer = self._call(lambda: start(config))
        except BaseException:
            self._shutdown_loop()
            raise

    def _call(self, make: Callable[[], Any]) -> Any:
        async def run() -> Any:
            return await make()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=60)

    def _shutdown_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()

    def stop(self) -> None:
        try:
            self._call(lambda: self.running.stop(grace=1.0))
        finally:
            self._shutdown_loop()


_KEY_DIR: list[Path] = []


def signing_key() -> Path:
    """One Ed25519 signing key for the whole test session (`pdp keys init` does the same)."""
    if not _KEY_DIR:
        _KEY_DIR.append(Path(tempfile.mkdtemp(prefix="pdp-test-key-")))
        init_key(_KEY_DIR[0] / "signing.key")
    return _KEY_DIR[0] / "signing.key"


def server_config(database_url: str, *, policy_dir: Path = POLICIES, environment: str = "dev") -> Config:
    """Settings for an in-process server on a free port, with its own checkpoint file."""
    return Config(
        database_url=database_url,
        policy_dir=str(policy_dir),
        grpc_addr="127.0.0.1:0",
        admin_addr="127.0.0.1:0",
        signing_key=str(signing_key()),
        environment=environment,
        checkpoint_file=str(Path(tempfile.mkdtemp(prefix="pdp-test-checkpoints-")) / "checkpoints.jsonl"),
    )


@contextmanager
def running_server(database_url: str, policy_dir: Path = POLICIES, environment: str = "dev") -> Iterator[Server]:
    background = BackgroundServer(server_config(database_url, policy_dir=policy_dir, environment=environment))
    engine = create_db_engine(database_url)
    server = Server(f"127.0.0.1:{background.running.port}", database_url, engine, background.running)
    try:
        yield server
    finally:
        server.close_clients()
        background.stop()
        engine.dispose()


@pytest.fixture(scope="module", params=BACKENDS)
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One running server per module and backend; tests isolate themselves with agents of their own."""
    with fresh_database(request.param, tmp_path_factory.mktemp(f"server-{request.param}")) as url:
        upgrade(url)
        with running_server(url) as running:
            yield running


def pdp_env(directory: Path) -> dict[str, str]:
    """The environment for `pdp` subprocesses: no PDP_* settings leaking in from the developer's shell,
    and a signing key and checkpoint file of the test's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PDP_SIGNING_KEY"] = str(signing_key())
    env["PDP_CHECKPOINT_FILE"] = str(directory / "checkpoints.jsonl")
    env["PDP_ADMIN_ADDR"] = "127.0.0.1:0"  # several servers may run at once
    return env


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    return pdp_env(tmp_path)


def broken_bundle(tmp_path: Path) -> tuple[Path, int]:
    """A copy of policies/ with a type error in one rule's `when`; returns the directory and the broken line."""
    bundle = tmp_path / "broken-policies"
    shutil.copytree(POLICIES, bundle)
    return bundle, break_type(bundle)


def break_type(bundle: Path) -> int:
    """Put a type error (`action.resourse`) in one rule of a copy of policies/; returns its line."""
    path = bundle / "rules" / "support.yaml"
    lines = path.read_text().splitlines(keepends=True)
    target = next(i for i, line in enumerate(lines) if 'action.operation == "POST"\'' in line)
    indent = lines[target][: len(lines[target]) - len(lines[target].lstrip())]
    lines[target] = f"{indent}when: 'action.resourse == \"x\"'\n"
    path.write_text("".join(lines))
    return target + 1


# --- `pdp serve` as a subprocess ----------------------------------------------------------------------

STARTUP_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ServeProcess:
    process: subprocess.Popen[str]
    address: str
    stdout: Path
    stderr: Path

    def output(self) -> str:
        return f"stdout:\n{self.stdout.read_text()}\nstderr:\n{self.stderr.read_text()}"

    def health(self, timeout: float = 5.0) -> int:
        with grpc.insecure_channel(self.address) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="pdp.v1.PolicyDecisionPoint"), timeout=timeout
            )
        status: int = response.status
        return status

    def wait_until_serving(self) -> None:
        """Poll the health check until SERVING and the startup line is out (signal handlers follow it)."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"pdp serve exited {self.process.returncode} while starting\n{self.output()}")
            try:
                if (
                    self.health(timeout=1.0) == health_pb2.HealthCheckResponse.SERVING
                    and "agent gRPC API on" in self.stdout.read_text()
                ):
                    break
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"pdp serve did not become healthy\n{self.output()}")
            time.sleep(0.1)
        # One more call: its handler runs on the event loop after `serve` installed its signal handlers.
        assert self.health() == health_pb2.HealthCheckResponse.SERVING

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            raise


def start_serve(
    database_url: str, directory: Path, env: dict[str, str], name: str = "serve", policy_dir: Path = POLICIES
) -> ServeProcess:
    """`pdp serve` as a subprocess on a free port, once it answers SERVING and has its signal handlers."""
    address = f"127.0.0.1:{free_port()}"
    stdout, stderr = directory / f"{name}.out", directory / f"{name}.err"
    with stdout.open("w") as out, stderr.open("w") as err:
        process = subprocess.Popen(
            [PDP, "serve", "--policy-dir", str(policy_dir), "--database-url", database_url, "--grpc-addr", address],
            stdout=out,
            stderr=err,
            text=True,
            env=env,
            cwd=directory,
        )
    serve = ServeProcess(process, address, stdout, stderr)
    try:
        serve.wait_until_serving()
    except BaseException:
        serve.stop()
        raise
    return serve


# --- a real browser: headless Chromium driven by Selenium ---------------------------------------------

from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402  (this section was appended)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def _require_browser() -> None:
    """Skip without Chromium and its driver (Debian packages chromium, chromium-driver); in CI, fail."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    if missing:
        problem = f"{' and '.join(missing)} missing: install the Debian packages chromium and chromium-driver"
        if in_ci():
            pytest.fail(f"{problem} (CI is set: a missing dependency is a failure)")
        pytest.skip(f"{problem} (or set CI=1 to make this a failure)")


@pytest.fixture(scope="session")
def browser() -> Iterator[WebDriver]:
    """One headless Chromium for the session. Selenium Manager is never asked to download anything: the
    driver's path is given, and SE_OFFLINE is set while the driver starts. Tests share it, so each one
    clears cookies and sets the window size it needs."""
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SE_OFFLINE", "true")
        driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()
