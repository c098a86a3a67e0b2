"""`pdp keys init`, `pdp audit checkpoint|verify|export` and `pdp db roles`, run as operators run them: the
installed console script in a subprocess."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import BULK_CLOSE, PDP, TICKETS, running_server
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine, text
from test_audit_chain import chain_rows, public_key

from pdp.audit import chain
from pdp.audit.chain import Event, append
from pdp.audit.checkpoints import read_file, stored
from pdp.audit.keys import key_id, load_private, load_public, public_path
from pdp.cli.main import main
from pdp.store.database import create_db_engine
from pdp.store.migrate import upgrade


def pdp(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PDP, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=60, check=False)


def _populate(database_url: str) -> int:
    """A few real decisions and a cancel through a running server; returns the chain's length."""
    with running_server(database_url) as server:
        _, client = server.agent_client()
        client.propose("tickets", "POST", TICKETS, "open", params={"title": "Printer on fire"})
        pending = client.propose("tickets", "POST", BULK_CLOSE, "close", params={"count": 40})
        client.cancel(pending.proposal_id)
        client.propose("shell", "exec", "shell://prod-web-1", "fix", params={"cmd": "reboot"})
    engine = create_db_engine(database_url)
    try:
        return len(chain_rows(engine))
    finally:
        engine.dispose()


def _tamper_body(engine: Engine, seq: int) -> None:
    """Drop the triggers as a superuser would, then edit one event's body."""
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            for name in conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'trigger'")).scalars():
                conn.execute(text(f"DROP TRIGGER {name}"))
        else:
            conn.execute(text("ALTER TABLE audit_events DISABLE TRIGGER ALL"))
        conn.execute(
            text("UPDATE audit_events SET body = replace(body, '\"close\"', '\"innocent\"') WHERE seq = :seq"),
            {"seq": seq},
        )


def _append_one(database_url: str) -> int:
    """One more event after the server stopped (and signed its head at shutdown): an unsigned head."""
    engine = create_db_engine(database_url, writer=True, pool_size=1)
    try:
        with engine.begin() as conn:
            event = Event(type="operator.note", actor="operator:test", occurred_at=datetime.now(UTC), data={"n": 1})
            return append(conn, event).seq
    finally:
        engine.dispose()


def test_checkpoint_verify_and_a_tampered_log(database_url: str, tmp_path: Path, cli_env: dict[str, str]) -> None:
    _populate(database_url)
    head = _append_one(database_url)
    url = ["--database-url", database_url]
    file = Path(cli_env["PDP_CHECKPOINT_FILE"])

    signed = pdp("audit", "checkpoint", *url, env=cli_env, cwd=tmp_path)
    assert signed.returncode == 0, signed.stderr
    assert f"checkpoint at seq {head} " in signed.stdout
    engine = create_db_engine(database_url)
    try:
        with engine.connect() as conn:
            in_db = stored(conn)
        in_file = [cp for _, cp in read_file(file)]
        assert in_file == in_db[-1:]
        assert in_db[-1].seq == head
        checkpoint = in_db[-1]
        assert checkpoint.head_hash == chain_rows(engine)[-1]["hash"]
        assert checkpoint.key_id == key_id(public_key())
        assert checkpoint.valid(public_key())
        assert not checkpoint.valid(Ed25519PrivateKey.generate().public_key())

        again = pdp("audit", "checkpoint", *url, env=cli_env, cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        assert "nothing to sign" in again.stdout
        assert len(file.read_text().splitlines()) == 1

        ok = pdp("audit", "verify", *url, env=cli_env, cwd=tmp_path)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert f"events:      {head} verified" in ok.stdout
        assert "triggers:    in place" in ok.stdout
        assert "ok: the audit log is intact" in ok.stdout

        _tamper_body(engine, 2)
        failed = pdp("audit", "verify", *url, env=cli_env, cwd=tmp_path)
        assert failed.returncode == 1, failed.stdout + failed.stderr
        assert "FAIL at seq 2: hash does not match the body" in failed.stdout
        assert "triggers:    MISSING" in failed.stdout
    finally:
        engine.dispose()


# --- the rest in-process (the same parser and handlers, without a second of interpreter start-up each) -----


@dataclass
class Cli:
    monkeypatch: pytest.MonkeyPatch
    capsys: pytest.CaptureFixture[str]
    database_url: str

    def __call__(self, *args: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = main(list(args))
        out, err = self.capsys.readouterr()
        return code, out, err


@pytest.fixture
def cli(
    tmp_path: Path, cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Cli:
    for name in [name for name in os.environ if name.startswith("PDP_")]:
        monkeypatch.delenv(name)
    for name, value in cli_env.items():
        if name.startswith("PDP_"):
            monkeypatch.setenv(name, value)
    database_url = f"sqlite:///{tmp_path / 'pdp.db'}"
    monkeypatch.setenv("PDP_DATABASE_URL", database_url)
    upgrade(database_url)
    return Cli(monkeypatch, capsys, database_url)


def test_verify_fails_when_only_the_triggers_are_gone(cli: Cli) -> None:
    _populate(cli.database_url)
    assert cli("audit", "verify", "--no-checkpoint-file")[0] == 0
    engine = create_db_engine(cli.database_url)
    with engine.begin() as conn:
        conn.execute(text("DROP TRIGGER audit_events_no_delete"))
    engine.dispose()
    code, out, _ = cli("audit", "verify", "--no-checkpoint-file")
    assert code == 1, out
    assert "triggers:    MISSING audit_events_no_delete" in out
    assert "FAIL: the database no longer refuses changes" in out


def test_verify_cannot_start_without_its_inputs(cli: Cli, tmp_path: Path) -> None:
    code, _, err = cli("audit", "verify", "--checkpoints", str(tmp_path / "nowhere.jsonl"))
    assert code == 2
    assert "no checkpoint file" in err
    code, _, err = cli("audit", "verify", "--no-checkpoint-file", "--signing-key", str(tmp_path / "nowhere.key"))
    assert code == 2
    assert "cannot read the key" in err


def test_verify_before_the_first_checkpoint_passes_and_says_so(cli: Cli) -> None:
    """Right after `make run` no checkpoint exists yet: that is not tampering, but verify says what it cannot see."""
    engine = create_db_engine(cli.database_url)
    with engine.begin() as conn:  # events, but no checkpoint anywhere yet
        for i in range(3):
            chain.append(conn, chain.Event(type="proposal.decided", actor=f"agent:a{i}", occurred_at=datetime.now(UTC)))
        assert conn.execute(text("SELECT count(*) FROM audit_checkpoints")).scalar() == 0
    engine.dispose()
    assert not Path(os.environ["PDP_CHECKPOINT_FILE"]).exists()
    code, out, _ = cli("audit", "verify")
    assert code == 0, out
    assert "no checkpoint yet" in out


def test_verify_fails_when_the_checkpoint_file_is_gone_but_the_database_has_checkpoints(cli: Cli) -> None:
    _populate(cli.database_url)  # the server signs its head at shutdown, into the database (and its own file)
    assert not Path(os.environ["PDP_CHECKPOINT_FILE"]).exists()  # ...not this one: as if it were deleted
    code, out, _ = cli("audit", "verify")
    assert code == 1, out
    assert "is gone" in out


def test_verify_from_a_trusted_seq(cli: Cli) -> None:
    head = _populate(cli.database_url)
    engine = create_db_engine(cli.database_url)
    _tamper_body(engine, 2)
    engine.dispose()
    code, out, _ = cli("audit", "verify", "--no-checkpoint-file")
    assert (code, "FAIL at seq 2" in out) == (1, True)
    code, out, _ = cli("audit", "verify", "--no-checkpoint-file", "--from", "3")
    assert "FAIL at seq" not in out  # seq 2 is trusted, only its hash is used
    assert f"events:      {head - 2} verified" in out
    assert code == 1  # the triggers are still gone


def test_checkpoint_of_an_empty_chain_signs_nothing(cli: Cli) -> None:
    code, out, _ = cli("audit", "checkpoint")
    assert code == 0
    assert "nothing to sign" in out
    assert not Path(os.environ["PDP_CHECKPOINT_FILE"]).exists()


def test_keys_init_creates_a_private_key_once(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "keys" / "signing.key"
    code, out, _ = cli("keys", "init", "--signing-key", str(path))
    assert code == 0, out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    private = load_private(path)
    assert key_id(load_public(public_path(path))) == key_id(private.public_key()) == key_id(load_public(path))
    before = path.read_bytes()
    code, out, _ = cli("keys", "init", "--signing-key", str(path))
    assert code == 0
    assert "kept" in out
    assert path.read_bytes() == before


def test_export_writes_every_event_as_a_json_line(cli: Cli) -> None:
    head = _populate(cli.database_url)
    engine = create_db_engine(cli.database_url)
    rows = chain_rows(engine)
    engine.dispose()
    code, out, _ = cli("audit", "export")
    assert code == 0
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["seq"] for e in events] == list(range(1, head + 1))
    for event, row in zip(events, rows, strict=True):
        assert (event["hash"], event["prev_hash"], event["type"]) == (row["hash"], row["prev_hash"], row["type"])
        assert event["body"] == json.loads(row["body"])
    assert [json.loads(line)["seq"] for line in cli("audit", "export", "--since", "3")[1].splitlines()] == list(
        range(3, head + 1)
    )
    assert len(cli("audit", "export", "--since", "2000-01-01T00:00:00Z")[1].splitlines()) == head
    assert cli("audit", "export", "--since", "2999-01-01T00:00:00Z")[1] == ""


def test_db_roles_is_for_postgres_only(cli: Cli) -> None:
    code, _, err = cli("db", "roles")
    assert code == 2
    assert "PostgreSQL only" in err


def test_export_since_is_inclusive(cli: Cli) -> None:
    _populate(cli.database_url)
    engine = create_db_engine(cli.database_url)
    second = chain_rows(engine)[1]
    engine.dispose()
    since = second["recorded_at"].isoformat()
    exported = [json.loads(line)["seq"] for line in cli("audit", "export", "--since", since)[1].splitlines()]
    assert exported[:1] == [2], f"--since {since}"


def test_verify_reports_rows_that_disagree_with_the_chain_apart(cli: Cli) -> None:
    """A row changed outside the PDP is not a chain break: its own lines, and exit status 3."""
    _populate(cli.database_url)
    code, out, _ = cli("audit", "verify", "--no-checkpoint-file")
    assert code == 0, out
    assert "rows:        3 proposals compared with the chain, 0 disagreement(s)" in out
    assert "ok: the audit log is intact and the rows agree with it" in out
    engine = create_db_engine(cli.database_url)
    with engine.begin() as conn:
        cancelled = conn.execute(text("SELECT id FROM proposals WHERE state = 'CANCELLED'")).scalar_one()
        conn.execute(text("UPDATE proposals SET state = 'PENDING_APPROVAL' WHERE id = :id"), {"id": cancelled})
    engine.dispose()
    code, out, _ = cli("audit", "verify", "--no-checkpoint-file")
    assert code == 3, out
    assert "1 disagreement(s)" in out
    assert f"DISAGREE proposal {cancelled}: the stored state PENDING_APPROVAL differs from CANCELLED" in out
    assert "FAIL: the audit log is intact, but the rows above disagree with it" in out
    code, out, _ = cli("audit", "verify", "--no-checkpoint-file", "--no-rows")
    assert code == 0 and "not compared with the chain (--no-rows)" in out, out
