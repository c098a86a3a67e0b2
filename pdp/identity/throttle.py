"""Failed authentications cost the caller who fails, not everyone else.

Every request with a token its door has not cached as good comes here before the database does:

- **Per-peer failure budget.** Each peer (an IP address; an IPv6 /64, which one host usually holds whole) may
  fail ``burst`` authentications at once, then one per ``1 / rate`` seconds (a GCRA leaky bucket that only
  failures fill). While its peer is over budget a request *waits* for the budget to allow it; one still not
  allowed after ``max_wait`` is refused without a lookup (:class:`ResourceExhausted`, retryable). Waiting
  rather than refusing at once is the point: a client that floods in a closed loop is slowed to about its own
  concurrency per ``max_wait``, so the flood's rate, and the CPU each request costs the process before any
  token is checked, stay small. Tokens that prove good never fill the budget: a peer that does not fail is
  never held up, however many agents it serves.
- **Negative cache.** The digests of tokens that failed are remembered (bounded, for ``negative_ttl``): a
  token unknown now never becomes valid (tokens are random and stored with their row) and a revoked one is
  never restored, so repeating one costs no query (it still counts as a failure).
- **Bounded lookups.** At most ``lookups`` database lookups of not-yet-known tokens run at once, from every
  peer together, so a flood from many addresses cannot take the worker threads other requests need. The budget
  is checked again once a lookup's turn comes, so a peer's failures exceed its budget by ``lookups`` at most.

- **Known-good tokens skip the line.** A token that authenticated recently (bounded, ``positive_ttl``) is
  still looked up every time (revocation takes effect at once), but without waiting for its peer's budget or
  a lookup slot: a flood of bad tokens, from any number of addresses, cannot queue an approver behind it.

Good tokens a door has cached never come here. The clock is an argument (tests, and no wall-clock jumps).
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pdp.errors import ResourceExhausted, Unauthenticated
from pdp.observability import metrics

T = TypeVar("T")
Clock = Callable[[], float]

# Defaults: a person mistyping, a script with a stale token, a test suite: far below. A flood: far above.
BURST = 30  # failed authentications a peer may make at once
RATE = 10.0  # failed authentications per second a peer may make after that
MAX_WAIT = 2.0  # the longest a request waits for its peer's budget; then it is refused without a lookup
LOOKUPS = 2  # database lookups of unknown tokens at once, all peers together


def peer_key(address: str) -> str:
    """The address a budget belongs to, from a gRPC peer (``ipv4:1.2.3.4:5678``, ``ipv6:[::1]:5678``) or a host.

    The port is dropped (a new connection must not buy a new budget); IPv6 addresses count per /64 and
    IPv4-mapped ones as IPv4. Anything else (a Unix socket) is its own key.
    """
    host = address
    for prefix in ("ipv4:", "ipv6:"):
        if address.startswith(prefix):
            host = address[len(prefix) :]
            host = host[1:].partition("]")[0] if host.startswith("[") else host.rpartition(":")[0]
            break
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class AuthThrottle:
    """Thread-safe bookkeeping; :meth:`authenticate` is the async entry point both doors use."""

    def __init__(
        self,
        door: str,
        rejection: str,
        *,
        burst: int = BURST,
        rate: float = RATE,
        max_wait: float = MAX_WAIT,
        lookups: int = LOOKUPS,
        negative_entries: int = 10_000,
        negative_ttl: float = 300.0,
        positive_ttl: float = 300.0,
        max_peers: int = 10_000,
        clock: Clock = time.monotonic,
    ) -> None:
        if burst < 1 or rate <= 0 or max_wait < 0 or lookups < 1:
            raise ValueError("burst and lookups must be at least 1, rate positive, max_wait not negative")
        self.door = door
        self._rejection = rejection  # the message a remembered bad token gets: the same as a looked-up one
        self._interval = 1.0 / rate
        self._tolerance = (burst - 1) * self._interval  # so exactly `burst` failures pass at once
        self._max_wait = max_wait
        self._lookups = lookups
        self._negative_entries = negative_entries
        self._negative_ttl = negative_ttl
        self._positive_ttl = positive_ttl
        self._max_peers = max_peers
        self._clock = clock
        self._lock = threading.Lock()
        self._due: OrderedDict[str, float] = OrderedDict()  # peer -> theoretical arrival time (GCRA) of failures
        self._bad: OrderedDict[str, float] = OrderedDict()  # token digest -> when it is forgotten
        self._good: OrderedDict[str, float] = OrderedDict()  # token digest -> until when it skips the line
        self._semaphores: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}

    # --- bookkeeping (any thread) --------------------------------------------------------------------

    def wait(self, peer: str) -> float:
        """Seconds until ``peer`` may try to authenticate again (0: now)."""
        now = self._clock()
        with self._lock:
            due = self._due.get(peer)
        return 0.0 if due is None else max(0.0, due - self._tolerance - now)

    def failed(self, peer: str) -> None:
        """``peer`` failed an authentication: it fills the budget by one."""
        now = self._clock()
        with self._lock:
            self._due[peer] = max(self._due.get(peer, now), now) + self._interval
            self._due.move_to_end(peer)
            while len(self._due) > self._max_peers:
                self._due.popitem(last=False)

    def known_bad(self, digest: str) -> bool:
        return self._recent(self._bad, digest)

    def remember_bad(self, digest: str) -> None:
        self._remember(self._bad, digest, self._negative_ttl)

    def _recent(self, table: OrderedDict[str, float], digest: str) -> bool:
        now = self._clock()
        with self._lock:
            until = table.get(digest)
            if until is None:
                return False
            if until <= now:
                del table[digest]
                return False
            return True

    def known_good(self, digest: str) -> bool:
        return self._recent(self._good, digest)

    def _remember(self, table: OrderedDict[str, float], digest: str, ttl: float) -> None:
        with self._lock:
            table[digest] = self._clock() + ttl
            table.move_to_end(digest)
            while len(table) > self._negative_entries:
                table.popitem(last=False)

    # --- the entry point (on the event loop) ---------------------------------------------------------

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        with self._lock:
            semaphore = self._semaphores.get(loop)
            if semaphore is None:
                self._semaphores = {k: v for k, v in self._semaphores.items() if not k.is_closed()}
                semaphore = self._semaphores[loop] = asyncio.Semaphore(self._lookups)
            return semaphore

    async def _allowed(self, peer: str, deadline: float) -> None:
        """Return once ``peer``'s budget allows a try; ResourceExhausted if it does not by ``deadline``."""
        while (wait := self.wait(peer)) > 0:
            left = deadline - self._clock()
            if wait > left:
                await asyncio.sleep(max(0.0, left))
                metrics.auth_failed(self.door, "throttled")
                retry = max(1, math.ceil(self.wait(peer)))
                raise ResourceExhausted(
                    f"too many failed authentications from this address; retry in {retry} s", retry_after=retry
                )
            await asyncio.sleep(wait)

    async def authenticate(self, peer: str, digest: str, lookup: Callable[[], Awaitable[T]]) -> T:
        """``lookup()`` (the database) for a token not known to be good, paced and bounded as described above.

        Raises :class:`Unauthenticated` for a bad token, :class:`ResourceExhausted` when ``peer`` stays over its
        budget for ``max_wait``, and whatever ``lookup`` raises otherwise.
        """
        if self.known_good(digest):
            try:
                return await lookup()
            except Unauthenticated:  # revoked since: from now on it waits in line like any unknown token
                with self._lock:
                    self._good.pop(digest, None)
                self.remember_bad(digest)
                self.failed(peer)
                metrics.auth_failed(self.door, "looked_up")
                raise
        deadline = self._clock() + self._max_wait
        while True:
            await self._allowed(peer, deadline)
            if self.known_bad(digest):
                self.failed(peer)
                metrics.auth_failed(self.door, "remembered")
                raise Unauthenticated(self._rejection)
            async with self._semaphore():
                if self.wait(peer) > 0:
                    continue  # the peer failed again while this one queued: back to waiting
                try:
                    found = await lookup()
                except Unauthenticated:
                    self.remember_bad(digest)
                    self.failed(peer)
                    metrics.auth_failed(self.door, "looked_up")
                    raise
                self._remember(self._good, digest, self._positive_ttl)
                return found
