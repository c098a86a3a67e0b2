"""A client floods the gRPC API and the admin API with bad bearer tokens to slow every other agent down.

Before the fix each bad token cost a database lookup on the worker pool (gRPC) or the thread pool (admin), as
fast as the client could send them: ≈470 bad tokens/s took another agent's p50 from 9 to 145 ms. The mechanism
that holds now (pdp/identity/throttle.py): a token that failed before is answered from memory, and a peer gets
a small budget of failed lookups, then one at a time, paced; beyond that it waits and is refused without a
lookup. These tests count the token lookups that reach the database (every statement any engine in this
process runs: the server is in-process), not time. bench/auth_flood.py measures the latency effect.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
from conftest import TICKETS, Server
from sqlalchemy import Engine, event

from pdp.client import PdpClient, PdpClientError
from pdp.identity.approvers import add_approver
from pdp.v1 import pdp_pb2, pdp_pb2_grpc

FLOOD = 300  # distinct bad tokens, all at once
REPEATS = 40  # one bad token, again and again


class Lookups:
    """Token lookups the database runs: the agents' and the approvers' ``... WHERE token_hash = ?`` queries."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        text = " ".join(statement.split())
        for table in ("agents", "approvers"):
            # The identity lookup by token (not the per-request "still active?" check, which also names the id).
            if f"FROM {table} WHERE {table}.token_hash =" in text and f"{table}.id =" not in text:
                with self._lock:
                    self.counts[table] += 1


@pytest.fixture
def lookups() -> Iterator[Lookups]:
    counter = Lookups()
    event.listen(Engine, "before_cursor_execute", counter)
    try:
        yield counter
    finally:
        event.remove(Engine, "before_cursor_execute", counter)


def bad_token(i: int) -> str:
    return f"pdp_flood-{i:06d}-{'x' * 32}"


def budget(started: float) -> float:
    """The most failed lookups one peer may cause from ``started`` until now: its burst, then RATE per second,
    and the lookups already under way when the budget ran out."""
    from pdp.identity.throttle import BURST, LOOKUPS, RATE  # here, so the module still runs (and fails) without it

    return BURST + RATE * (time.monotonic() - started) + LOOKUPS


async def grpc_flood(target: str, tokens: list[str]) -> Counter[str]:
    answers: Counter[str] = Counter()
    request = PdpClient.request("tickets", "GET", TICKETS + "/1", "flood")
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pdp_pb2_grpc.PolicyDecisionPointStub(channel)

        async def one(token: str) -> None:
            try:
                await stub.Propose(request, metadata=(("authorization", f"Bearer {token}"),), timeout=60)
                answers["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                answers[exc.code().name] += 1

        await asyncio.gather(*(one(token) for token in tokens))
    return answers


def test_bad_tokens_on_the_grpc_api_do_not_each_cost_a_database_lookup(server: Server, lookups: Lookups) -> None:
    _, good = server.agent_client()
    assert good.propose("tickets", "GET", TICKETS + "/1", "before the flood").decision.outcome == pdp_pb2.ALLOW

    # The same bad token again and again: one lookup, then memory.
    before = lookups.counts["agents"]
    bad = server.client(bad_token(0))
    for _ in range(REPEATS):
        with pytest.raises(PdpClientError) as raised:
            bad.propose("tickets", "GET", TICKETS + "/1", "again")
        assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert lookups.counts["agents"] - before == 1

    # Many different bad tokens at once: the peer's budget is spent, the rest wait and are refused unlooked-up.
    before, started = lookups.counts["agents"], time.monotonic()
    answers = asyncio.run(grpc_flood(server.target, [bad_token(i) for i in range(1, FLOOD + 1)]))
    looked_up = lookups.counts["agents"] - before
    assert answers["OK"] == 0 and answers["UNAUTHENTICATED"] + answers["RESOURCE_EXHAUSTED"] == FLOOD, answers
    assert looked_up == answers["UNAUTHENTICATED"]
    assert looked_up <= budget(started), answers
    assert answers["RESOURCE_EXHAUSTED"] > 0, answers

    # An agent already authenticated is not held up by any of it.
    assert good.propose("tickets", "GET", TICKETS + "/2", "after the flood").decision.outcome == pdp_pb2.ALLOW


def test_bad_tokens_on_the_admin_api_do_not_each_cost_a_database_lookup(server: Server, lookups: Lookups) -> None:
    assert server.running is not None
    token = add_approver(server.engine, "flood-lead", ["support-leads"])
    with httpx.Client(base_url=server.admin_url, timeout=60) as client:
        assert client.get("/api/v1/proposals", headers={"Authorization": f"Bearer {token}"}).status_code == 200

        before = lookups.counts["approvers"]
        for _ in range(REPEATS):
            response = client.get("/api/v1/proposals", headers={"Authorization": f"Bearer {bad_token(0)}"})
            assert response.status_code == 401
        assert lookups.counts["approvers"] - before == 1

    async def flood() -> Counter[int]:
        limits = httpx.Limits(max_connections=FLOOD)
        async with httpx.AsyncClient(base_url=server.admin_url, timeout=60, limits=limits) as client:

            async def one(i: int) -> int:
                # Each claims another client address: the budget must follow the connection's, not a header.
                forwarded = f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"
                headers = {"Authorization": f"Bearer {bad_token(i)}", "X-Forwarded-For": forwarded}
                return (await client.get("/api/v1/proposals", headers=headers)).status_code

            async def approver() -> list[int]:
                # The real approver, on the same address, keeps working all through the flood.
                good = {"Authorization": f"Bearer {token}"}
                answers = []
                for _ in range(5):
                    answers.append((await client.get("/api/v1/proposals", headers=good)).status_code)
                    await asyncio.sleep(0.05)
                return answers

            flooding = asyncio.gather(*(one(i) for i in range(1, FLOOD + 1)))
            assert await approver() == [200] * 5
            return Counter(await flooding)

    before, started = lookups.counts["approvers"], time.monotonic()
    statuses = asyncio.run(flood())
    looked_up = lookups.counts["approvers"] - before - 5  # the approver's own five, looked up every time
    assert statuses[401] + statuses[429] == FLOOD, statuses
    assert looked_up == statuses[401]
    assert looked_up <= budget(started), statuses
    assert statuses[429] > 0, statuses
