"""The `pdp` command line, run as operators run it: the installed console script in a subprocess, on SQLite."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from conftest import (
    ADMIN_MEMBERS,
    BULK_CLOSE,
    PDP,
    POLICIES,
    TICKETS,
    ServeProcess,
    broken_bundle,
    count_proposals,
    proposal_row,
    start_serve,
)
from sqlalchemy import Engine, select

from pdp.store.database import create_db_engine
from pdp.store.migrate import is_current
from pdp.store.models import agents


def pdp(
    *args: str, env: dict[str, str], cwd: Path, check: bool = False, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [PDP, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        pytest.fail(
            f"pdp {' '.join(args)} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


@dataclass
class Database:
    url: str
    path: Path

    def engine(self) -> Engine:
        return create_db_engine(self.url)

    def file_bytes(self) -> bytes:
        """The database file and its WAL and shared-memory files, wherever SQLite put the data."""
        return b"".join(p.read_bytes() for p in sorted(self.path.parent.glob(self.path.name + "*")))


@pytest.fixture
def db(tmp_path: Path, cli_env: dict[str, str]) -> Database:
    path = tmp_path / "pdp.db"
    url = f"sqlite:///{path}"
    pdp("db", "upgrade", "--database-url", url, env=cli_env, cwd=tmp_path, check=True)
    return Database(url, path)


def add_agent_cli(db: Database, env: dict[str, str], cwd: Path, agent_id: str, *extra: str) -> str:
    result = pdp("agents", "add", agent_id, "--database-url", db.url, *extra, env=env, cwd=cwd, check=True)
    return result.stdout.splitlines()[-1]


# --- db ----------------------------------------------------------------------------------------------


def test_db_upgrade_twice_is_fine(tmp_path: Path, cli_env: dict[str, str]) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    for _ in range(2):
        result = pdp("db", "upgrade", "--database-url", url, env=cli_env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "newest schema" in result.stdout
    engine = create_db_engine(url)
    try:
        assert is_current(engine)
    finally:
        engine.dispose()


def test_database_url_comes_from_the_environment(tmp_path: Path, cli_env: dict[str, str]) -> None:
    path = tmp_path / "from-env.db"
    env = {**cli_env, "PDP_DATABASE_URL": f"sqlite:///{path}"}
    assert pdp("db", "upgrade", env=env, cwd=tmp_path).returncode == 0
    assert path.exists()
    assert not (tmp_path / "pdp.db").exists()


# --- agents ------------------------------------------------------------------------------------------


def test_agents_add_prints_the_token_alone_on_the_last_line(
    db: Database, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    result = pdp(
        "agents",
        "add",
        "bot-1",
        "--owner",
        "alice",
        "--roles",
        "a,b",
        "--database-url",
        db.url,
        env=cli_env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.splitlines()[-1]
    assert token == token.strip()
    assert token.startswith("pdp_")
    assert len(token) >= 40
    assert token not in "\n".join(result.stdout.splitlines()[:-1])

    # Only the SHA-256 of the token is stored; the token itself is nowhere in the database files.
    engine = db.engine()
    try:
        with engine.connect() as conn:
            row = conn.execute(select(agents).where(agents.c.id == "bot-1")).mappings().one()
    finally:
        engine.dispose()
    assert row["token_hash"] == hashlib.sha256(token.encode()).hexdigest()
    assert (row["owner"], row["roles"], row["revoked_at"]) == ("alice", ["a", "b"], None)
    stored = db.file_bytes()
    assert b"bot-1" in stored  # the check below looks at the right files
    assert token.encode() not in stored
    assert token.removeprefix("pdp_").encode() not in stored


def test_agents_list_and_revoke(db: Database, tmp_path: Path, cli_env: dict[str, str]) -> None:
    token = add_agent_cli(db, cli_env, tmp_path, "bot-2", "--owner", "bob", "--roles", "support,ops")
    add_agent_cli(db, cli_env, tmp_path, "bot-3", "--owner", "carol")

    listed = pdp("agents", "list", "--database-url", db.url, env=cli_env, cwd=tmp_path, check=True).stdout
    line = next(line for line in listed.splitlines() if line.startswith("bot-2 "))
    assert line.split()[1:3] == ["bob", "support,ops"]
    assert line.endswith("active")
    assert token not in listed

    revoked = pdp("agents", "revoke", "bot-2", "--database-url", db.url, env=cli_env, cwd=tmp_path)
    assert revoked.returncode == 0, revoked.stderr

    listed = pdp("agents", "list", "--database-url", db.url, env=cli_env, cwd=tmp_path, check=True).stdout
    rows = {line.split()[0]: line for line in listed.splitlines()[1:]}
    assert "revoked" in rows["bot-2"]
    assert rows["bot-3"].endswith("active")
    engine = db.engine()
    try:
        with engine.connect() as conn:
            revoked_at = conn.execute(select(agents.c.revoked_at).where(agents.c.id == "bot-2")).scalar_one()
    finally:
        engine.dispose()
    assert revoked_at is not None


def test_agents_add_duplicate_id_fails(db: Database, tmp_path: Path, cli_env: dict[str, str]) -> None:
    first = add_agent_cli(db, cli_env, tmp_path, "bot-4", "--owner", "dave")
    again = pdp("agents", "add", "bot-4", "--owner", "eve", "--database-url", db.url, env=cli_env, cwd=tmp_path)
    assert again.returncode != 0
    assert "already exists" in again.stderr
    assert first not in again.stdout
    listed = pdp("agents", "list", "--database-url", db.url, env=cli_env, cwd=tmp_path, check=True).stdout
    assert [line.split()[1] for line in listed.splitlines() if line.startswith("bot-4 ")] == ["dave"]


def test_agents_revoke_unknown_id_fails(db: Database, tmp_path: Path, cli_env: dict[str, str]) -> None:
    result = pdp("agents", "revoke", "nobody", "--database-url", db.url, env=cli_env, cwd=tmp_path)
    assert result.returncode != 0
    assert "nobody" in result.stderr


# --- policy ------------------------------------------------------------------------------------------


def test_policy_check_example_bundle(tmp_path: Path, cli_env: dict[str, str]) -> None:
    result = pdp("policy", "check", str(POLICIES), env=cli_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ok: bundle 'acme-ops'" in result.stdout


def test_policy_check_broken_bundle_lists_file_and_line(tmp_path: Path, cli_env: dict[str, str]) -> None:
    bundle, line = broken_bundle(tmp_path)
    result = pdp("policy", "check", str(bundle), env=cli_env, cwd=tmp_path)
    assert result.returncode == 1
    assert f"rules/support.yaml:{line}:" in result.stderr, result.stderr
    assert "resourse" in result.stderr


def test_policy_test_example_bundle_passes(tmp_path: Path, cli_env: dict[str, str]) -> None:
    result = pdp("policy", "test", str(POLICIES), env=cli_env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed" in result.stdout
    assert " 0 failed" in result.stdout
    assert "FAIL" not in result.stdout


def test_policy_test_with_a_failing_case_exits_1(tmp_path: Path, cli_env: dict[str, str]) -> None:
    bundle = tmp_path / "policies"
    shutil.copytree(POLICIES, bundle)
    demo = bundle / "tests" / "demo.yaml"
    text = demo.read_text()
    expectation = "expect: {outcome: allow, rules: [tickets-create]"
    assert text.count(expectation) == 1
    demo.write_text(text.replace(expectation, "expect: {outcome: deny, rules: [tickets-create]"))

    result = pdp("policy", "test", str(bundle), env=cli_env, cwd=tmp_path)
    assert result.returncode == 1
    failing = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failing) == 1
    assert "demo - support agent opens a ticket" in failing[0]
    assert "tests/demo.yaml" in failing[0]
    assert " 1 failed" in result.stdout


EVAL_INPUT = {
    "agent": {"id": "dev-agent", "owner": "dev", "roles": ["support"]},
    "action": {"tool": "tickets", "operation": "POST", "resource": BULK_CLOSE, "params": {"count": 40}},
    "context": {"now": "2026-01-05T10:00:00Z", "environment": "dev"},
}


def test_policy_eval_prints_the_decision(tmp_path: Path, cli_env: dict[str, str]) -> None:
    path = tmp_path / "input.json"
    path.write_text(json.dumps(EVAL_INPUT))

    result = pdp("policy", "eval", str(POLICIES), "--input", str(path), env=cli_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "outcome:        NEEDS_APPROVAL" in result.stdout
    assert "rule:tickets-bulk" in result.stdout
    assert "support-leads" in result.stdout
    # `now` is an input: the expiry follows it (tickets-bulk approvals expire in 2h).
    assert "expires_at:     2026-01-05T12:00:00Z" in result.stdout

    as_json = pdp("policy", "eval", str(POLICIES), "--input", str(path), "--json", env=cli_env, cwd=tmp_path)
    decision = json.loads(as_json.stdout)
    assert decision["outcome"] == "needs_approval"
    assert decision["approval_expires_at"] == "2026-01-05T12:00:00.000000Z"


def test_policy_eval_rejects_a_bad_input_file(tmp_path: Path, cli_env: dict[str, str]) -> None:
    path = tmp_path / "input.json"
    path.write_text(json.dumps({**EVAL_INPUT, "surprise": 1}))
    result = pdp("policy", "eval", str(POLICIES), "--input", str(path), env=cli_env, cwd=tmp_path)
    assert result.returncode != 0
    assert "surprise" in result.stderr


# --- serve and propose -------------------------------------------------------------------------------


@dataclass
class Demo:
    """`pdp serve` on a migrated SQLite file, and the development agent's environment for `pdp propose`."""

    serve: ServeProcess
    db: Database
    env: dict[str, str]
    cwd: Path


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    cwd = tmp_path_factory.mktemp("demo")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}
    db = Database(f"sqlite:///{cwd / 'pdp.db'}", cwd / "pdp.db")
    pdp("db", "upgrade", "--database-url", db.url, env=env, cwd=cwd, check=True)
    pdp("keys", "init", env=env, cwd=cwd, check=True)  # as `make run` does
    token = add_agent_cli(db, env, cwd, "dev-agent", "--owner", "dev", "--roles", "support")
    serve = start_serve(db.url, cwd, env)
    try:
        yield Demo(serve, db, {**env, "PDP_AGENT_TOKEN": token, "PDP_GRPC_ADDR": serve.address}, cwd)
    finally:
        serve.stop()


README_COMMANDS = [
    pytest.param(
        ["--tool", "tickets", "--operation", "POST", "--resource", TICKETS, "--params", '{"title": "Printer on fire"}'],
        "ALLOW",
        "APPROVED",
        "rule:tickets-create",
        id="allow",
    ),
    pytest.param(
        ["--tool", "iam", "--operation", "POST", "--resource", ADMIN_MEMBERS, "--params", '{"user": "dev-agent"}'],
        "DENY",
        "DENIED",
        "boundary:access-control",
        id="deny",
    ),
    pytest.param(
        ["--tool", "tickets", "--operation", "POST", "--resource", BULK_CLOSE, "--params", '{"count": 40}'],
        "NEEDS_APPROVAL",
        "PENDING_APPROVAL",
        "rule:tickets-bulk",
        id="needs_approval",
    ),
]


def _field(output: str, name: str) -> str:
    return next(line.split(":", 1)[1].strip() for line in output.splitlines() if line.startswith(f"{name}:"))


@pytest.mark.parametrize(("args", "outcome", "state", "rule"), README_COMMANDS)
def test_propose_against_a_running_server(demo: Demo, args: list[str], outcome: str, state: str, rule: str) -> None:
    env, cwd = demo.env, demo.cwd
    propose = [*args, "--justification", "README demo"]
    engine = demo.db.engine()
    try:
        before = count_proposals(engine)
        dry = pdp("propose", *propose, "--dry-run", env=env, cwd=cwd)
        assert dry.returncode == 0, dry.stderr
        assert _field(dry.stdout, "outcome") == outcome
        assert count_proposals(engine) == before

        result = pdp("propose", *propose, env=env, cwd=cwd)
        assert result.returncode == 0, result.stderr
        assert _field(result.stdout, "outcome") == outcome
        assert _field(result.stdout, "state") == state
        assert f"- {rule} (" in result.stdout
        proposal_id = _field(result.stdout, "proposal")
        row = proposal_row(engine, proposal_id)
        assert row is not None
        assert (row["agent_id"], row["state"], row["justification"]) == ("dev-agent", state, "README demo")
    finally:
        engine.dispose()

    shown = pdp("proposals", "get", proposal_id, env=env, cwd=cwd)
    assert shown.returncode == 0, shown.stderr
    assert _field(shown.stdout, "state") == state


def test_proposals_cancel_and_watch(demo: Demo) -> None:
    env, tmp_path = demo.env, demo.cwd
    bulk = ["--tool", "tickets", "--operation", "POST", "--resource", BULK_CLOSE, "--params", '{"count": 40}']
    proposed = pdp("propose", *bulk, "--justification", "x", env=env, cwd=tmp_path, check=True)
    proposal_id = _field(proposed.stdout, "proposal")

    cancelled = pdp("proposals", "cancel", proposal_id, env=env, cwd=tmp_path)
    assert cancelled.returncode == 0, cancelled.stderr
    assert _field(cancelled.stdout, "state") == "CANCELLED"
    again = pdp("proposals", "cancel", proposal_id, env=env, cwd=tmp_path)
    assert again.returncode == 1
    assert "FAILED_PRECONDITION" in again.stderr
    # Watching a terminal proposal prints it once and returns.
    watched = pdp("proposals", "watch", proposal_id, env=env, cwd=tmp_path, timeout=30)
    assert watched.returncode == 0, watched.stderr
    assert [line for line in watched.stdout.splitlines() if line.startswith("state:")] == ["state:          CANCELLED"]


def test_propose_with_a_bad_token_fails(demo: Demo) -> None:
    env = {**demo.env, "PDP_AGENT_TOKEN": "pdp_not-a-token"}
    args = ["--tool", "tickets", "--operation", "POST", "--resource", TICKETS, "--justification", "x"]
    result = pdp("propose", *args, env=env, cwd=demo.cwd)
    assert result.returncode == 1
    assert "UNAUTHENTICATED" in result.stderr


def test_propose_without_a_token_explains_how_to_get_one(tmp_path: Path, cli_env: dict[str, str]) -> None:
    args = ["--tool", "tickets", "--operation", "POST", "--resource", TICKETS, "--justification", "x"]
    result = pdp("propose", *args, env=cli_env, cwd=tmp_path)
    assert result.returncode != 0
    assert "PDP_AGENT_TOKEN" in result.stderr


def test_serve_stops_cleanly_on_sigterm(db: Database, tmp_path: Path, cli_env: dict[str, str]) -> None:
    serve = start_serve(db.url, tmp_path, cli_env)
    token = add_agent_cli(db, cli_env, tmp_path, "dev-agent", "--owner", "dev", "--roles", "support")
    env = {**cli_env, "PDP_AGENT_TOKEN": token, "PDP_GRPC_ADDR": serve.address}
    args = ["--tool", "tickets", "--operation", "POST", "--resource", TICKETS, "--justification", "x"]
    pdp("propose", *args, env=env, cwd=tmp_path, check=True)

    assert serve.stop() == 0, serve.output()
    assert "pdp: shutting down" in serve.stdout.read_text()
    # What it answered before stopping is durable.
    engine = db.engine()
    try:
        assert count_proposals(engine) == 1
    finally:
        engine.dispose()
    # And it no longer listens.
    with pytest.raises(grpc.RpcError) as error:
        serve.health(timeout=2.0)
    assert error.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
