"""`pdp serve --workers N`: N server processes on one port, so decisions use every core.

A Python process decides on one core (the GIL); the kernel spreads connections across processes that
bind the same port with SO_REUSEPORT. Each worker is a full server with its own group-commit writer;
they share the database (SQLite serialises their writers; PostgreSQL's advisory lock serialises audit
appends). Before starting workers the parent binds the port once *without* SO_REUSEPORT, so workers
never join a server that already listens there. If any worker dies, the parent stops the others and
exits non-zero, for the supervisor to restart the whole set.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import socket
import sys
import time
from multiprocessing.process import BaseProcess

from pdp.config import Config
from pdp.server.app import StartupError, serve
from pdp.store.database import is_sqlite


def _worker(config: Config) -> None:
    try:
        asyncio.run(serve(config, reuse_port=True))
    except StartupError as exc:
        print(f"pdp serve worker: {exc}", file=sys.stderr)
        sys.exit(2)


def _port_is_free(address: str) -> None:
    host, _, port = address.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        raise StartupError("--workers needs a fixed port in --grpc-addr (not 0)")
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host.strip("[]"), int(port)))
        except OSError as exc:
            raise StartupError(f"cannot listen on {address}: {exc.strerror}") from exc


def run_workers(config: Config, count: int) -> int:
    if is_sqlite(config.database_url):
        # Measured: two workers on SQLite wait out each other's write lock (p99 ~0.8 s, no more throughput).
        raise StartupError("--workers > 1 needs PostgreSQL: SQLite has one writer at a time")
    _port_is_free(config.grpc_addr)
    context = multiprocessing.get_context("spawn")
    workers: list[BaseProcess] = [
        context.Process(target=_worker, args=(config,), name=f"pdp-worker-{i}") for i in range(count)
    ]
    for worker in workers:
        worker.start()
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    while not stopping and all(w.is_alive() for w in workers):
        time.sleep(0.2)
    failed = not stopping
    for worker in workers:
        if worker.is_alive():
            worker.terminate()  # SIGTERM: each worker shuts down gracefully
    for worker in workers:
        worker.join(timeout=30)
    if failed:
        codes = [w.exitcode for w in workers]
        print(f"pdp serve: a worker exited ({codes}); stopped the others", file=sys.stderr)
        return 2 if 2 in codes else 1
    return 0
