"""A cap on request bodies, enforced before anything reads them (pure ASGI middleware, outside every route).

Every body the admin endpoint accepts is small (a vote's comment or reason is at most 4,096 characters; the
login and vote forms are smaller), so :data:`MAX_BODY_BYTES` is 64 KiB. A request whose ``Content-Length`` is
over it is answered 413 before the app runs, so not one byte of its body is read. A body without a length
(``Transfer-Encoding: chunked``) is counted as the app reads it and refused with 413 once past the cap. Any
response sent before the body was read to its end closes the connection, so the server never reads (or
drains) the rest of an unwanted body.
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_BODY_BYTES = 64 * 1024
CLOSE = (b"connection", b"close")


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once a body without a length passes the cap; rendered as 413 like any HTTP error."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")


def _length(scope: Scope) -> tuple[int | None, bool]:
    """(Content-Length or None, whether the request says it has a body at all); -1 for a malformed length."""
    length: int | None = None
    chunked = False
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            length = int(text) if text.isascii() and text.isdigit() else -1
        elif name == b"transfer-encoding":
            chunked = True
    return length, chunked or bool(length)


async def refuse(scope: Scope, send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]]) -> None:
    """A JSON error (``{"error", "field"}``, as the app's own) that closes the connection."""
    body = json.dumps({"error": message, "field": "body" if status in (400, 413) else None}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                CLOSE,
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length, has_body = _length(scope)
        if length == -1:
            await refuse(scope, send, 400, "Content-Length is not a number", [])
            return
        if length is not None and length > self.max_bytes:
            await refuse(scope, send, 413, f"request body larger than {self.max_bytes} bytes", [])
            return

        received = 0
        body_done = not has_body
        started = False

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if received > self.max_bytes:
                raise BodyTooLarge(self.max_bytes)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
                if not message.get("more_body", False):
                    body_done = True
            return message

        async def closing_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if not body_done:  # an answer before the whole body: never read the rest of it
                    message["headers"] = [*message.get("headers", []), CLOSE]
            await send(message)

        try:
            await self.app(scope, limited_receive, closing_send)
        except BodyTooLarge as exc:
            if started:
                raise
            await refuse(scope, send, 413, str(exc.detail), [])
