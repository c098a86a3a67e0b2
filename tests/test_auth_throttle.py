"""The failed-authentication throttle (pdp/identity/throttle.py) on its own: budgets, the negative cache, peers.

A fake clock drives the bookkeeping; the async entry point runs for real on asyncio with a lookup that stands in
for the database. The doors (gRPC, admin) are tested through real servers in tests/adversarial/.
"""

from __future__ import annotations

import asyncio

import pytest

from pdp.errors import ResourceExhausted, Unauthenticated
from pdp.identity.throttle import AuthThrottle, peer_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("ipv4:10.1.2.3:5555", "10.1.2.3"),
        ("ipv4:10.1.2.3:6666", "10.1.2.3"),  # a new connection is the same peer
        ("ipv6:[2001:db8:1:2:3:4:5:6]:443", "2001:db8:1:2::/64"),
        ("ipv6:[2001:db8:1:2:ffff::1]:80", "2001:db8:1:2::/64"),  # the same /64
        ("ipv6:[::ffff:10.1.2.3]:80", "10.1.2.3"),
        ("10.1.2.3", "10.1.2.3"),  # the admin door gives the host alone
        ("::1", "::/64"),
        ("unix:/run/pdp.sock", "unix:/run/pdp.sock"),
        ("", ""),
    ],
)
def test_peer_key(address: str, key: str) -> None:
    assert peer_key(address) == key


def test_the_budget_is_filled_by_failures_only_and_drains_at_the_rate() -> None:
    clock = Clock()
    throttle = AuthThrottle("grpc", "bad", burst=3, rate=2.0, clock=clock)
    for _ in range(3):
        assert throttle.wait("p") == 0
        throttle.failed("p")
    assert throttle.wait("p") == pytest.approx(0.5)
    assert throttle.wait("other") == 0  # budgets are per peer
    clock.now += 0.5
    assert throttle.wait("p") == 0
    throttle.failed("p")
    assert throttle.wait("p") == pytest.approx(0.5)


def test_remembered_bad_tokens_expire() -> None:
    clock = Clock()
    throttle = AuthThrottle("grpc", "bad", negative_ttl=60, negative_entries=2, clock=clock)
    throttle.remember_bad("a")
    assert throttle.known_bad("a") and not throttle.known_bad("b")
    clock.now += 61
    assert not throttle.known_bad("a")
    for digest in ("x", "y", "z"):  # bounded: the oldest goes first
        throttle.remember_bad(digest)
    assert [throttle.known_bad(d) for d in ("x", "y", "z")] == [False, True, True]


def run_attempts(throttle: AuthThrottle, tokens: list[str], good: set[str]) -> tuple[list[str], list[str]]:
    """Authenticate every token at once from one peer; (answers in order, tokens the "database" was asked about)."""
    asked: list[str] = []

    async def attempt(token: str) -> str:
        async def lookup() -> str:
            asked.append(token)
            await asyncio.sleep(0.001)
            if token not in good:
                raise Unauthenticated("bad")
            return token

        try:
            return await throttle.authenticate("peer", token, lookup)
        except Unauthenticated:
            return "401"
        except ResourceExhausted:
            return "429"

    async def main() -> list[str]:
        return list(await asyncio.gather(*(attempt(t) for t in tokens)))

    return asyncio.run(main()), asked


def test_good_tokens_are_never_held_up_however_many_at_once() -> None:
    throttle = AuthThrottle("grpc", "bad", burst=2, rate=1.0, max_wait=0.05)
    tokens = [f"good-{i}" for i in range(50)]
    answers, asked = run_attempts(throttle, tokens, set(tokens))
    assert answers == tokens and len(asked) == 50


def test_a_flood_of_bad_tokens_gets_its_budget_and_then_waits_and_is_refused_unlooked_up() -> None:
    throttle = AuthThrottle("grpc", "bad", burst=5, rate=1.0, max_wait=0.2, lookups=2)
    answers, asked = run_attempts(throttle, [f"bad-{i}" for i in range(40)], set())
    assert answers.count("401") == len(asked)
    assert 5 <= len(asked) <= 5 + 2  # the burst, and the lookups already under way when it ran out
    assert answers.count("429") == 40 - len(asked)


def test_a_repeated_bad_token_is_looked_up_once() -> None:
    throttle = AuthThrottle("grpc", "bad", burst=100)
    asked: list[str] = []

    async def lookup() -> str:
        asked.append("x")
        raise Unauthenticated("bad")

    async def main() -> None:
        for _ in range(10):
            with pytest.raises(Unauthenticated, match="bad"):
                await throttle.authenticate("peer", "digest-x", lookup)

    asyncio.run(main())
    assert asked == ["x"]


def test_a_database_error_is_not_a_failed_authentication() -> None:
    throttle = AuthThrottle("grpc", "bad", burst=1)

    async def lookup() -> str:
        raise OSError("database down")

    async def main() -> None:
        for _ in range(5):
            with pytest.raises(OSError):
                await throttle.authenticate("peer", "digest", lookup)

    asyncio.run(main())
    assert throttle.wait("peer") == 0 and not throttle.known_bad("digest")


def test_a_known_good_token_skips_the_line_and_is_still_looked_up_each_time() -> None:
    """An approver behind the same address as a flood, or queued behind its lookups, is not held up; a token
    revoked since it last succeeded fails at once and then waits in line like any other."""
    clock = Clock()
    throttle = AuthThrottle("admin", "bad", burst=1, rate=0.001, max_wait=0.0, lookups=1, clock=clock)
    lookups: list[str] = []

    async def run() -> None:
        async def good() -> str:
            lookups.append("good")
            return "approver"

        async def slow_bad() -> str:
            await asyncio.sleep(0.2)
            raise Unauthenticated("bad")

        assert await throttle.authenticate("p", "good-digest", good) == "approver"
        throttle.failed("p")  # the peer is now over budget, and max_wait is 0: unknown tokens are refused
        with pytest.raises(ResourceExhausted):
            await throttle.authenticate("p", "unknown-digest", good)
        flood = asyncio.ensure_future(throttle.authenticate("q", "bad-digest", slow_bad))  # holds the one slot
        await asyncio.sleep(0.05)
        assert await throttle.authenticate("p", "good-digest", good) == "approver"
        assert not flood.done()
        with pytest.raises(Unauthenticated):
            await flood

        async def revoked() -> str:
            raise Unauthenticated("bad")

        with pytest.raises(Unauthenticated):
            await throttle.authenticate("p", "good-digest", revoked)
        assert not throttle.known_good("good-digest") and throttle.known_bad("good-digest")

    asyncio.run(run())
    assert lookups == ["good", "good"]
