"""Serving a registry as Prometheus text: a body for the admin app, a small HTTP server for the executor."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, start_http_server

CONTENT_TYPE = CONTENT_TYPE_LATEST


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition of ``registry``; scrape-time collectors run now, on the caller's thread."""
    return generate_latest(registry)


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) → (host, port); ValueError when it is not one."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{address!r} is not host:port")
    return host.strip("[]") or "127.0.0.1", int(port)


@dataclass
class MetricsServer:
    """``GET /metrics`` (any path, in fact) on its own thread; port 0 picks a free port, see :attr:`port`."""

    server: WSGIServer
    thread: threading.Thread

    @classmethod
    def start(cls, address: str, registry: CollectorRegistry) -> MetricsServer:
        """Bind and serve; OSError or ValueError when ``address`` cannot be had (a startup error)."""
        host, port = split_address(address)
        server, thread = start_http_server(port, host, registry)
        return cls(server, thread)

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
