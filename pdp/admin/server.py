"""Serving the admin app with uvicorn on the PDP's own event loop, next to the gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Generator

import uvicorn
from fastapi import FastAPI


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # `pdp serve` owns SIGINT/SIGTERM and stops this server itself.
        yield


def bind(address: str) -> socket.socket:
    """A listening socket for ``host:port`` (port 0 picks one); OSError when it cannot be had."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: without it asyncio leaves Nagle on for accepted connections (40 ms per response).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.bind((host, int(port)))
        sock.listen(128)
    except (OSError, ValueError):
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class AdminServer:
    def __init__(self, app: FastAPI, sock: socket.socket) -> None:
        self._sock = sock
        self.port: int = sock.getsockname()[1]
        # log_config=None: uvicorn's lines go through the root handler (JSON, like every other line of `pdp serve`).
        # proxy_headers=False: uvicorn would otherwise take X-Forwarded-For from a loopback client as the client's
        # address, and anyone on the host could mint a fresh failed-authentication budget per request.
        config = uvicorn.Config(
            app,
            lifespan="off",
            access_log=False,
            log_level="warning",
            log_config=None,
            timeout_graceful_shutdown=5,
            proxy_headers=False,
        )
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the admin server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await self._task
        self._sock.close()
