"""The admin FastAPI application: the approvers' JSON API, their HTML pages, health.

Typed errors (:mod:`pdp.errors`) become HTTP statuses in one table, :data:`STATUS`; the handlers below render
them as ``{"error", "field"}`` JSON under /api/ and as an HTML page elsewhere. Every response carries the
security headers of :data:`SECURITY_HEADERS`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pdp.admin import api, auth, pages, sessions
from pdp.admin.limits import BodyLimit
from pdp.approvals.service import ApprovalService
from pdp.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PdpError,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from pdp.observability import exposition
from pdp.observability import metrics as observed

log = logging.getLogger(__name__)

STATUS: dict[type[PdpError], int] = {
    Unauthenticated: 401,
    PermissionDenied: 403,
    NotFound: 404,
    AlreadyExists: 409,
    FailedPrecondition: 409,
    InvalidArgument: 422,
    ResourceExhausted: 429,
    Unavailable: 503,
}

SECURITY_HEADERS = {
    # The pages need only their own stylesheet (inline) and /static/countdown.js; nothing may frame them.
    "content-security-policy": (
        "default-src 'none'; style-src 'self' 'unsafe-inline'; script-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    # Pages show who may do what right now, and the API answers per approver: never cache either.
    "cache-control": "no-store",
}


class SecurityHeaders:
    """Pure ASGI middleware (no BaseHTTPMiddleware: it would buffer and re-wrap every response)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.decode("latin-1") not in SECURITY_HEADERS]
                headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in SECURITY_HEADERS.items()]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def _json_error(status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None) -> Response:
    body = api.ErrorBody(error=message, field=field).model_dump()
    return JSONResponse(body, status_code=status, headers=headers)


def _to_login() -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(sessions.COOKIE, path="/", httponly=True, samesite="strict")
    return response


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(PdpError)
    async def typed_error(request: Request, exc: PdpError) -> Response:
        status = next((code for cls, code in STATUS.items() if isinstance(exc, cls)), 500)
        if status == 500:
            log.error("untyped PdpError on %s %s: %s", request.method, request.url.path, exc.message)
        if _is_api(request):
            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            return _json_error(status, exc.message, getattr(exc, "field", None), headers)
        if status == 401:
            return _to_login()
        return pages.error_page(request, status, exc.message)

    @app.exception_handler(pages.LoginRequired)
    async def login_required(request: Request, exc: pages.LoginRequired) -> Response:
        return _to_login()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        first: dict[str, Any] = errors[0] if errors else {}
        loc = list(first.get("loc", ()))
        # ("body", "reason") → "reason"; ("query", "state") → "state"; a body that is not an object, or not
        # JSON at all (("body", <offset>)), → "body".
        names = [part for part in loc[1:] if isinstance(part, str)]
        field = names[0] if names else (str(loc[0]) if loc else None)
        message = f"{field}: {first.get('msg', 'invalid')}" if field else str(first.get("msg", "invalid request"))
        if _is_api(request):
            return _json_error(422, message, field)
        return pages.error_page(request, 422, message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        headers = dict(exc.headers or {})  # keeps e.g. the Allow header of a 405
        if exc.status_code == 400 and request.method == "POST":
            # FastAPI's "error parsing the body" (e.g. not UTF-8): a malformed body like any other, so 422.
            if _is_api(request):
                return _json_error(422, f"body: {exc.detail}", "body")
            return pages.error_page(request, 422, str(exc.detail))
        if _is_api(request) or request.url.path in ("/openapi.json", "/healthz"):
            return _json_error(exc.status_code, str(exc.detail), headers=headers)
        response = pages.error_page(request, exc.status_code, str(exc.detail))
        response.headers.update(headers)
        return response

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        # A bug, never the caller's fault: log it whole, say nothing about it on the wire.
        log.exception("admin endpoint failed on %s %s", request.method, request.url.path)
        if _is_api(request):
            return _json_error(500, "internal error")
        return pages.error_page(request, 500, "internal error; the details are in the server log")


def create_app(
    service: ApprovalService,
    *,
    session_key: bytes,
    health: Callable[[], dict[str, Any]],
    cookie_secure: bool = False,
    metrics: CollectorRegistry | None = None,
) -> FastAPI:
    """``metrics``: what ``GET /metrics`` serves (the server's registry; by default the process-wide series)."""
    # No /docs or /redoc: Swagger UI loads its assets from a CDN, which the CSP (rightly) refuses.
    app = FastAPI(title="agent-pdp admin", version="1", docs_url=None, redoc_url=None)
    app.state.approvals = service
    app.state.session_key = session_key
    app.state.cookie_secure = cookie_secure
    app.state.auth_throttle = auth.new_throttle()
    # Outermost last: security headers on every answer, then the body cap, then the API's bearer check, so an
    # oversized or unauthenticated request is refused before a byte of its body is read.
    app.add_middleware(auth.BearerAuth, service=service, throttle=app.state.auth_throttle)
    app.add_middleware(BodyLimit)
    app.add_middleware(SecurityHeaders)
    _install_handlers(app)

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, Any]:
        return health()

    registry = metrics if metrics is not None else observed.registry(observed.PDP)

    # Sync on purpose: scrape-time gauges query the database, so this runs on the thread pool. For Prometheus,
    # not people: unauthenticated like /healthz (the admin port is local unless configured otherwise).
    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        return Response(exposition.render(registry), media_type=exposition.CONTENT_TYPE)

    app.include_router(api.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=Path(__file__).with_name("static")), name="static")
    return app
