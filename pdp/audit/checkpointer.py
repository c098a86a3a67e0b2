"""Signs the chain head in the background: once it moved and ``interval`` seconds (default 1) passed since
the last checkpoint, after every ``every`` new events, and once more at shutdown.

The head follows the chain closely so that the events no signature covers, the unsigned tail `pdp audit
verify` reports, are the last second's while the PDP runs: a longer or older tail then means the PDP was
not running (the executor's events after it stopped wait for its next start) or someone with the
database's grants appended behind its back. A checkpoint is one writer unit (head read, a signature of
~50 µs, one insert) and an fsynced line in the file: once a second it costs nothing measurable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine

from pdp.audit import chain
from pdp.audit.checkpoints import Checkpoint, append_to_file, sign_head
from pdp.store.writer import GroupCommitWriter

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(
        self,
        engine: Engine,
        writer: GroupCommitWriter,
        key: Ed25519PrivateKey,
        file: Path,
        *,
        every: int,
        interval: float,
        clock: Callable[[], datetime],
    ) -> None:
        self._engine, self._writer, self._key, self._file = engine, writer, key, file
        self._every, self._interval, self._clock = every, interval, clock
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._signed_seq = 0
        self._signed_at = time.monotonic()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="pdp-checkpointer")

    async def stop(self) -> None:
        """Stop the loop and sign whatever the chain has gained since the last checkpoint."""
        self._stop.set()
        if self._task is not None:
            await self._task
        await self.checkpoint()

    def _head_seq(self) -> int:
        with self._engine.connect() as conn:
            return chain.head(conn)[0]

    async def checkpoint(self, seen: int = 0) -> Checkpoint | None:
        """Sign the head; ``seen`` is a head seq read before, known signed when nothing new was (another
        replica signed it), so an idle chain is not looked at again every second."""
        started = time.monotonic()  # the interval runs from here, so a poll every `interval` finds it due
        try:
            signed = await asyncio.wrap_future(
                self._writer.submit(lambda conn: sign_head(conn, self._key, self._clock()))
            )
            if signed is not None:
                await asyncio.to_thread(append_to_file, self._file, signed)
            self._signed_seq = max(self._signed_seq, signed.seq if signed is not None else seen)
            self._signed_at = started
            return signed
        except Exception:  # a failed checkpoint weakens detection; it must not stop decisions
            log.exception("audit checkpoint failed")
            return None

    async def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), min(1.0, self._interval))
            try:
                seq = await asyncio.to_thread(self._head_seq)
            except Exception:
                log.exception("reading the audit chain head failed")
                continue
            due = time.monotonic() - self._signed_at >= self._interval
            if seq > self._signed_seq and (seq - self._signed_seq >= self._every or due):
                await self.checkpoint(seen=seq)
