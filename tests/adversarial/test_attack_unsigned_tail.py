"""Issue 10, finding 11 (last item): an event appended with a correct chain by someone holding the
database's grants, but not the signing key, passed `pdp audit verify` as intact, with nothing saying that
no signature covered it, and the PDP signed its head only every 60 seconds.

Now verify reports the unsigned tail (how many events follow the newest valid checkpoint, and how old the
oldest of them is by its hashed occurred_at) and fails when it is older than --max-unsigned-age, whichever
way the appender dated it; and a running PDP signs the head within about a second of it moving.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import PDP, TICKETS, BackgroundServer, server_config
from sqlalchemy import Engine, func, select, text
from test_audit_chain import spec_hash

from pdp.cli.main import main
from pdp.client import PdpClient
from pdp.identity.agents import add_agent
from pdp.store.database import create_db_engine
from pdp.store.models import audit_checkpoints, audit_events

WAIT = 60.0  # seconds: a bound for polls and subprocesses, never an expectation about speed


@dataclass
class Verify:
    """`pdp audit verify` in-process: the same parser and handler as the console script, with the test's
    PDP_* environment, without a second of interpreter start-up per call."""

    database_url: str
    capsys: pytest.CaptureFixture[str]

    def text(self, *args: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = main(["audit", "verify", "--database-url", self.database_url, *args])
        out, err = self.capsys.readouterr()
        return code, out, err

    def json(self, *args: str) -> tuple[int, dict[str, Any]]:
        code, out, err = self.text("--json", *args)
        assert code in (0, 1), out + err
        report: dict[str, Any] = json.loads(out)
        return code, report


@pytest.fixture
def verify(
    database_url: str, cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Verify:
    for name in [name for name in os.environ if name.startswith("PDP_")]:
        monkeypatch.delenv(name)
    for name, value in cli_env.items():
        if name.startswith("PDP_"):
            monkeypatch.setenv(name, value)
    return Verify(database_url, capsys)


def canonical(value: Any) -> bytes:
    """RFC 8785 for the ASCII strings and small integers of the forged body (docs/audit-format.md §2)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def append_behind_the_pdp(engine: Engine, occurred_at: str | None) -> int:
    """What a holder of the writer's grants can do without the key: read the head and insert the next event
    with a hash computed as docs/audit-format.md says; the database's insert trigger accepts it."""
    with engine.begin() as conn:
        head = conn.execute(
            select(audit_events.c.seq, audit_events.c.hash).order_by(audit_events.c.seq.desc()).limit(1)
        ).one()
        seq, prev = int(head.seq) + 1, str(head.hash)
        event_id = str(uuid.uuid4())
        body: dict[str, Any] = {
            "event_id": event_id,
            "type": "proposal.cancelled",
            "actor": "agent:someone",
            "proposal_id": None,
            "agent_id": None,
            "policy_version": "",
            "data": {"note": "nobody signed this"},
        }
        if occurred_at is not None:
            body["occurred_at"] = occurred_at
        raw = canonical(body)
        conn.execute(
            text(
                "INSERT INTO audit_events (chain, seq, event_id, type, proposal_id, agent_id, actor, "
                "policy_version, body, prev_hash, hash) VALUES ('main', :seq, :event_id, :type, NULL, NULL, "
                ":actor, '', :body, :prev, :hash)"
            ),
            {
                "seq": seq,
                "event_id": event_id,
                "type": body["type"],
                "actor": body["actor"],
                "body": raw.decode(),
                "prev": prev,
                "hash": spec_hash(seq, prev, raw),
            },
        )
    return seq


def stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def signed_head(engine: Engine) -> tuple[int, int]:
    """(newest checkpointed seq, head seq)."""
    with engine.connect() as conn:
        signed = conn.execute(select(func.max(audit_checkpoints.c.seq))).scalar() or 0
        head = conn.execute(select(func.max(audit_events.c.seq))).scalar() or 0
    return int(signed), int(head)


@contextmanager
def pdp(database_url: str, env: dict[str, str]) -> Iterator[tuple[Engine, PdpClient]]:
    """A running PDP whose checkpoint file is the one `pdp audit verify` reads (PDP_CHECKPOINT_FILE)."""
    config = replace(server_config(database_url), checkpoint_file=env["PDP_CHECKPOINT_FILE"])
    background = BackgroundServer(config)
    engine = create_db_engine(database_url)
    client = PdpClient(f"127.0.0.1:{background.running.port}", add_agent(engine, "agent-1", "alice", ("support",)))
    try:
        yield engine, client
    finally:
        client.close()
        background.stop()  # signs the head at shutdown
        engine.dispose()


@pytest.mark.parametrize(
    ("dated", "why"),
    [
        (timedelta(hours=-2), "ago"),  # the event claims to be two hours old
        (timedelta(days=30), "in the future"),  # dated ahead, to stay young for ever
        (None, "without a readable occurred_at"),  # undated, so that no age can be computed
    ],
    ids=["backdated", "future", "undated"],
)
def test_an_event_appended_behind_the_pdp_is_reported_unsigned_and_fails_when_old(
    database_url: str, tmp_path: Path, cli_env: dict[str, str], verify: Verify, dated: timedelta | None, why: str
) -> None:
    with pdp(database_url, cli_env) as (_, client):
        client.propose("tickets", "POST", TICKETS, "open", params={"title": "Printer on fire"})
    engine = create_db_engine(database_url)
    try:
        signed, head = signed_head(engine)
        assert signed == head > 0  # the PDP signed everything it wrote
        occurred_at = stamp(datetime.now(UTC) + dated) if dated is not None else None
        forged = append_behind_the_pdp(engine, occurred_at)
        assert forged == head + 1
    finally:
        engine.dispose()

    # Reported, however it is dated: intact as a chain, but nothing signed vouches for it.
    code, report = verify.json("--max-unsigned-age", "off")
    assert code == 0, report
    assert (report["events"], report["head_seq"]) == (forged, forged)
    tail = report["unsigned"]
    assert (tail["after_seq"], tail["events"]) == (head, 1)
    assert tail["oldest_occurred_at"] == occurred_at
    if dated is None:
        assert tail["undated"] and tail["age_seconds"] is None
    else:
        assert not tail["undated"]
        assert abs(tail["age_seconds"] + dated.total_seconds()) < WAIT  # generous: it is hours or days
    code, out, _ = verify.text("--max-unsigned-age", "off")
    assert code == 0, out
    assert f"unsigned:    1 event(s) after seq {head}" in out and why in out

    # The default (1h), as an operator runs it, fails it; so does an explicit bound; one beyond its age not.
    failed = subprocess.run(
        [PDP, "audit", "verify", "--database-url", database_url],
        capture_output=True,
        text=True,
        env=cli_env,
        cwd=tmp_path,
        timeout=WAIT,
        check=False,
    )
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert f"FAIL: nothing signed vouches for 1 unsigned event(s) after seq {head}" in failed.stdout
    assert why.rsplit(maxsplit=1)[-1] in failed.stdout.split("FAIL:")[1]
    code, out, _ = verify.text("--max-unsigned-age", "10m")
    assert code == 1 and "FAIL: nothing signed vouches for" in out, out
    code, report = verify.json("--max-unsigned-age", "10m")
    assert code == 1 and not report["ok"] and report["unsigned"]["max_age_seconds"] == 600
    assert [f for f in report["failures"] if "nothing signed vouches" in f], report
    if dated is not None:
        assert verify.text("--max-unsigned-age", "60d")[0] == 0


def test_bad_max_unsigned_age_is_refused(verify: Verify) -> None:
    code, _, err = verify.text("--max-unsigned-age", "soon")
    assert code == 2
    assert "--max-unsigned-age" in err and "soon" in err


def test_a_running_pdp_signs_the_head_soon_after_it_moves(
    database_url: str, cli_env: dict[str, str], verify: Verify
) -> None:
    """With the default settings the head is signed while the PDP keeps running (not only at shutdown), so
    the unsigned tail stays short: the bound below is generous, the default cadence is about a second."""
    with pdp(database_url, cli_env) as (engine, client):
        for n in range(3):
            client.propose("tickets", "POST", TICKETS, f"open {n}", params={"title": f"t{n}"})
            deadline = time.monotonic() + 20.0
            while True:
                signed, head = signed_head(engine)
                if signed == head > 0:
                    break
                assert time.monotonic() < deadline, f"head {head} still unsigned (newest checkpoint {signed})"
                time.sleep(0.05)
            # Signed in the database and in the file outside it, while the PDP runs.
            code, report = verify.json()
            assert code == 0, report
            assert report["unsigned"]["events"] == 0 and report["unsigned"]["after_seq"] == head
            assert report["checkpoint_file"] == cli_env["PDP_CHECKPOINT_FILE"]
