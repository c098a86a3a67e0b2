"""Group commit: one writer thread commits whatever has queued in one transaction.

Each caller submits a unit of work (a function of a connection) and gets its result only after the
transaction holding it committed, so durability is per caller while fsyncs are shared. If any unit
in a batch fails, the batch is rolled back and each unit re-runs in a transaction of its own, so one
bad request never takes others down and never half-commits. Units must therefore be safe to run
again after a rollback (they are plain inserts/updates whose inputs were computed beforehand).

The audit chain appends inside the same units, so a state change and its audit event commit or
roll back together.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import Connection, Engine

log = logging.getLogger(__name__)

T = TypeVar("T")
Work = Callable[[Connection], T]


@dataclass(slots=True)
class _Item(Generic[T]):
    work: Work[T]
    future: Future[T]


_STOP = object()


class GroupCommitWriter:
    def __init__(self, engine: Engine, *, max_batch: int = 128) -> None:
        self._engine = engine
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="pdp-writer", daemon=True)
        self._closed = False
        self._thread.start()

    def submit(self, work: Work[T]) -> Future[T]:
        future: Future[T] = Future()
        if self._closed:
            future.set_exception(RuntimeError("writer is closed"))
            return future
        self._queue.put(_Item(work, future))
        return future

    def close(self, timeout: float = 10.0) -> None:
        """Finish what is queued, then stop."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch: list[_Item[Any]] = [first]
            stop = False
            while len(batch) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            try:
                self._commit(batch)
            except BaseException as exc:  # never strand a caller: a dead writer would hang every request
                log.exception("writer failed")
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
            if stop:
                return

    def _commit(self, batch: list[_Item[Any]]) -> None:
        try:
            with self._engine.begin() as conn:
                results = [item.work(conn) for item in batch]
        except Exception as exc:
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            log.debug("batch of %d failed; retrying each unit alone", len(batch), exc_info=True)
            for item in batch:
                self._commit_alone(item)
            return
        for item, result in zip(batch, results, strict=True):
            item.future.set_result(result)

    def _commit_alone(self, item: _Item[Any]) -> None:
        try:
            with self._engine.begin() as conn:
                result = item.work(conn)
        except Exception as exc:
            item.future.set_exception(exc)
        else:
            item.future.set_result(result)
