"""One row's failure stays that row's: a savepoint per row, and rows that cannot even be refused set aside.

The claim and recovery transactions handle several rows at once. Before, one row that raised while it was
checked (a number the database had rewritten, a forged row) rolled the whole transaction back, and the
same row, still oldest, came first again at every poll: nothing of any agent ran again. Now each row is
worked on inside its own savepoint. When that fails, the row alone is refused (in a fresh savepoint), and
when even refusing it fails, it is set aside in memory for a while and logged, so the loop moves on. The
chain's lock is taken before these savepoints, so rolling one back never releases it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TypeVar

from sqlalchemy import Connection

from pdp.store.writer import raw_savepoint

log = logging.getLogger("executor")

T = TypeVar("T")
PAUSE = timedelta(minutes=1)


class SetAside:
    """Proposals this executor could neither check nor refuse: not picked again until their pause ends."""

    def __init__(self, pause: timedelta = PAUSE) -> None:
        self.pause = pause
        self._until: dict[str, datetime] = {}
        self._lock = threading.Lock()

    def add(self, proposal_id: str, now: datetime) -> None:
        with self._lock:
            self._until[proposal_id] = now + self.pause

    def ids(self, now: datetime) -> list[str]:
        """The proposals still set aside at ``now`` (the others are forgotten)."""
        with self._lock:
            self._until = {pid: until for pid, until in self._until.items() if until > now}
            return sorted(self._until)


def each_alone(
    conn: Connection,
    proposal_id: str,
    work: Callable[[], T | None],
    refuse: Callable[[Exception], None],
    aside: SetAside | None,
    now: datetime,
) -> T | None:
    """``work()`` in a savepoint; if it raises, ``refuse(error)`` in another; if that raises too, set aside."""
    try:
        return _in_savepoint(conn, work)
    except Exception as exc:  # anything at all: this row must not hold the others
        log.exception("cannot check proposal %s; refusing it alone", proposal_id)
        failure = exc
    try:
        _in_savepoint(conn, lambda: refuse(failure))
    except Exception:
        pause = (aside.pause if aside is not None else PAUSE).total_seconds()
        log.exception("cannot refuse proposal %s either: set aside for %.0f s, the others go on", proposal_id, pause)
        if aside is not None:
            aside.add(proposal_id, now)
    return None


def _in_savepoint(conn: Connection, work: Callable[[], T]) -> T:
    return raw_savepoint(conn, work, "pdp_row")
