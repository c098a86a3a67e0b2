"""Approver bearer tokens: checked before anything of the request is read, through the failed-auth throttle.

Under ``/api/`` the token is in the ``Authorization`` header, so :class:`BearerAuth` (pure ASGI middleware)
checks it before FastAPI reads or parses the body, before any route runs: a request without a valid token
costs no body, no parsing and no handler. The route's dependency then only picks up the approver found here.
The login form's token arrives in its (capped) body; :func:`authenticate` serves it with the same throttle.

Tokens not yet known go through :class:`pdp.identity.throttle.AuthThrottle` (per-peer pacing, a negative
cache, at most two lookups at once), and their lookup runs on the thread pool, never on the event loop the
gRPC API shares.
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from pdp.admin.limits import refuse
from pdp.approvals.service import ApprovalService
from pdp.errors import ResourceExhausted, Unauthenticated
from pdp.identity.approvers import Approver
from pdp.identity.throttle import AuthThrottle, peer_key
from pdp.identity.tokens import token_hash

API_PREFIX = "/api/"
STATE_KEY = "approver"  # request.state.approver: who BearerAuth found
REJECTION = "unknown or revoked approver token"


def new_throttle() -> AuthThrottle:
    return AuthThrottle("admin", REJECTION)


async def check_token(service: ApprovalService, throttle: AuthThrottle, peer: str, token: str) -> Approver:
    """The approver ``token`` belongs to; Unauthenticated, or ResourceExhausted when ``peer`` fails too often."""
    if not token:
        raise Unauthenticated("an approver bearer token is required")
    return await throttle.authenticate(
        peer_key(peer), token_hash(token), lambda: run_in_threadpool(service.authenticate, token)
    )


async def authenticate(request: Request, token: str) -> Approver:
    """For a token that is not in a header (the login form), with the app's throttle."""
    throttle: AuthThrottle = request.app.state.auth_throttle
    service: ApprovalService = request.app.state.approvals
    return await check_token(service, throttle, request.client.host if request.client else "", token)


def _bearer(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""


class BearerAuth:
    def __init__(self, app: ASGIApp, service: ApprovalService, throttle: AuthThrottle) -> None:
        self.app = app
        self.service = service
        self.throttle = throttle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(API_PREFIX):
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        try:
            approver = await check_token(self.service, self.throttle, client[0] if client else "", _bearer(scope))
        except Unauthenticated as exc:
            await refuse(scope, send, 401, exc.message, [(b"www-authenticate", b"Bearer")])
            return
        except ResourceExhausted as exc:
            await refuse(scope, send, 429, exc.message, [(b"retry-after", str(max(1, exc.retry_after)).encode())])
            return
        scope.setdefault("state", {})[STATE_KEY] = approver
        await self.app(scope, receive, send)
