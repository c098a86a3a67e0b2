"""Migration 0008 fills ``proposals.action_json`` for proposals recorded before it, without doubt or not at all.

The text must be the exact canonical bytes the action digest was taken over: from the proposal's own
``proposal.decided`` audit event (hash-chained), else from the stored action, and only when its SHA-256 is the
row's ``action_digest``. A row where neither fits stays NULL (the executor refuses it).
"""

from __future__ import annotations

from typing import Any

from alembic import command
from conftest import TICKETS, running_server
from sqlalchemy import select, update

from pdp.canonical import digest_of
from pdp.store.migrate import alembic_config, upgrade
from pdp.store.models import proposals

PARAMS: list[dict[str, Any]] = [{"n": 1e16}, {"n": 1e300, "l": [0.1, -0.0]}, {"n": 5e-324}, {"s": "é\u2028"}, {}]


def test_existing_proposals_get_the_bytes_their_digest_was_taken_over(database_url: str) -> None:
    with running_server(database_url) as server:
        _agent, client = server.agent_client()
        ids = [client.propose("tickets", "POST", TICKETS, "before 0008", params=p).proposal_id for p in PARAMS]
        engine = server.engine
        with engine.connect() as conn:
            before = dict(conn.execute(select(proposals.c.id, proposals.c.action_json)).all())
        edited_copy, bad_digest = ids[0], ids[1]
        with engine.begin() as conn:  # one row's JSONB copy was edited; another's digest does not fit anything
            row = conn.execute(select(proposals.c.action).where(proposals.c.id == edited_copy)).scalar_one()
            conn.execute(update(proposals).where(proposals.c.id == edited_copy).values(action={**row, "params": {}}))
            conn.execute(update(proposals).where(proposals.c.id == bad_digest).values(action_digest="0" * 64))
        command.downgrade(alembic_config(database_url), "0007")
        upgrade(database_url)
        with engine.connect() as conn:
            after = {
                r.id: r
                for r in conn.execute(select(proposals.c.id, proposals.c.action_json, proposals.c.action_digest))
            }
    assert all(text is not None for text in before.values())
    for pid in ids:
        if pid == bad_digest:
            assert after[pid].action_json is None
            continue
        assert after[pid].action_json == before[pid]  # byte for byte, the edited JSONB copy notwithstanding
        assert digest_of(after[pid].action_json.encode()) == after[pid].action_digest
