"""The approvers' HTML pages: sign in, the pending list, a proposal's detail, approve and reject.

Server-rendered with Jinja2 (autoescape on: every agent-supplied string is text, never markup; and every
interpolated string passes :func:`~pdp.admin.reveal.reveal` first, so bidi controls and other invisible
characters show as ``⟦U+202E⟧`` markers), no build step and no external assets.
 Sessions and CSRF live in :mod:`pdp.admin.sessions`; every request re-loads the
approver, so a revoked approver is signed out on their next click. Errors are rendered by
:func:`error_page`, which :mod:`pdp.admin.app` calls for every typed error raised on a page route.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

import jinja2
import markupsafe
from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from pdp.admin import auth, sessions
from pdp.admin.api import proposal_id, service_of
from pdp.admin.reveal import reveal
from pdp.admin.sessions import Session
from pdp.approvals.listing import DEFAULT_PAGE, MAX_CURSOR, MAX_PAGE
from pdp.approvals.service import MAX_TEXT
from pdp.errors import NotFound, PermissionDenied, ResourceExhausted, Unauthenticated
from pdp.identity.approvers import Approver


def _finalize(value: Any) -> Any:
    """Every ``{{ … }}`` string, before it is escaped: hidden characters become visible markers."""
    if isinstance(value, str) and not isinstance(value, markupsafe.Markup):
        return reveal(value)
    return value


_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
    autoescape=True,  # all templates are HTML; never rely on the file extension to turn escaping on
    finalize=_finalize,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)

_TITLES = {
    401: "Not signed in",
    403: "Not allowed",
    404: "Not found",
    409: "No longer pending",
    422: "Check your input",
    429: "Too many requests",
    503: "Temporarily unavailable",
}
CSRF_FAILED = "the form's CSRF token is missing or wrong; reload the page and try again (nothing was changed)"


class LoginRequired(Exception):
    """No valid session (or its approver was revoked): the app answers with a redirect to /login."""


@dataclass(frozen=True, slots=True)
class User:
    approver: Approver
    session: Session
    csrf_token: str


def iso(value: datetime | None) -> str:
    if value is None:
        return ""
    if value.tzinfo is None:  # stored as UTC; say so, or a browser would read it as local time
        value = value.replace(tzinfo=UTC)
    return value.isoformat()


def time_left(seconds: int) -> str:
    if seconds <= 0:
        return "expired"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s left" if hours else f"{minutes}m {secs:02d}s left"


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    user: User | None = getattr(request.state, "user", None)
    context.setdefault("approver", user.approver if user else None)
    context.setdefault("csrf_token", user.csrf_token if user else "")
    html = _env.get_template(template).render(iso=iso, time_left=time_left, **context)
    return HTMLResponse(html, status_code=status_code)


def error_page(request: Request, status_code: int, message: str) -> HTMLResponse:
    back = ""
    if request.method == "POST" and request.url.path.startswith("/proposals/"):
        back = request.url.path.rsplit("/", 1)[0]  # a failed vote links back to its proposal
        back = back if _is_proposal_path(back) else ""
    title = _TITLES.get(status_code, "Something went wrong")
    return render(request, "error.html", status_code, title=title, message=message, back=back)


def _is_proposal_path(path: str) -> bool:
    try:
        proposal_id(path.removeprefix("/proposals/"))
    except NotFound:
        return False
    return True


def _key(request: Request) -> bytes:
    key: bytes = request.app.state.session_key
    return key


def current_user(request: Request) -> User:
    """The signed-in approver as the database has them now; LoginRequired otherwise."""
    key = _key(request)
    session = sessions.read(key, request.cookies.get(sessions.COOKIE), time.time())
    if session is None:
        raise LoginRequired
    try:
        approver = service_of(request).approver(session.approver_id)
    except Unauthenticated:
        raise LoginRequired from None
    user = User(approver, session, sessions.csrf_token(key, session))
    request.state.user = user  # for the header of error pages
    return user


UserDep = Annotated[User, Depends(current_user)]
CsrfField = Annotated[str, Form()]


def _check_csrf(request: Request, user: User, token: str) -> None:
    if not sessions.check_csrf(_key(request), user.session, token):
        raise PermissionDenied(CSRF_FAILED)


def _set_cookie(request: Request, response: Response, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/",
        httponly=True,
        samesite="strict",
        secure=bool(request.app.state.cookie_secure),
    )


def _login_form(request: Request, status_code: int = 200, error: str = "") -> HTMLResponse:
    nonce = sessions.login_nonce()
    csrf = sessions.login_csrf_token(_key(request), nonce)
    response = render(request, "login.html", status_code, error=error, csrf_token=csrf, approver=None)
    _set_cookie(request, response, sessions.LOGIN_COOKIE, nonce, sessions.LOGIN_MAX_AGE)
    return response


router = APIRouter(include_in_schema=False)


@router.get("/login")
def login_page(request: Request) -> Response:
    if sessions.read(_key(request), request.cookies.get(sessions.COOKIE), time.time()) is not None:
        return RedirectResponse("/", status_code=303)
    return _login_form(request)


@router.post("/login")
async def login(request: Request, token: Annotated[str, Form()] = "", csrf_token: CsrfField = "") -> Response:
    key = _key(request)
    if not sessions.check_login_csrf(key, request.cookies.get(sessions.LOGIN_COOKIE), csrf_token):
        # Login CSRF: only a form this server rendered, in this browser, may sign it in.
        return _login_form(request, 403, "This sign-in form has expired or did not come from this site. Try again.")
    try:
        # Paced per address, like the API's bearer tokens: guessing costs the guesser, not the other approvers.
        approver = await auth.authenticate(request, token.strip())
    except Unauthenticated:
        return _login_form(request, 401, "Unknown or revoked token.")
    except ResourceExhausted as exc:
        wait = max(1, exc.retry_after)
        refused = _login_form(request, 429, f"Too many failed sign-ins from this address; retry in {wait} s.")
        refused.headers["retry-after"] = str(wait)
        return refused
    _, cookie = sessions.issue(key, approver.id, time.time())
    response = RedirectResponse("/", status_code=303)
    _set_cookie(request, response, sessions.COOKIE, cookie, sessions.MAX_AGE)
    response.delete_cookie(sessions.LOGIN_COOKIE, path="/")
    return response


@router.post("/logout")
def logout(request: Request, user: UserDep, csrf_token: CsrfField = "") -> Response:
    _check_csrf(request, user, csrf_token)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(sessions.COOKIE, path="/", httponly=True, samesite="strict")
    return response


@router.get("/")
def pending(
    request: Request,
    user: UserDep,
    cursor: Annotated[str | None, Query(max_length=MAX_CURSOR)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
) -> Response:
    page = service_of(request).pending_page(user.approver, limit, cursor)
    size = {"limit": limit} if limit != DEFAULT_PAGE else {}

    def link(position: str | None) -> str:
        return f"/?{urlencode({'cursor': position, **size})}" if position is not None else ""

    return render(
        request, "list.html", items=page.items, prev_link=link(page.prev_cursor), next_link=link(page.next_cursor)
    )


@router.get("/proposals/{id}")
def detail(request: Request, id: str, user: UserDep) -> Response:
    d = service_of(request).detail(user.approver, proposal_id(id))
    params = json.dumps(d.action.get("params") or {}, indent=2, sort_keys=True, ensure_ascii=False)
    labels = d.action.get("labels") or {}
    return render(
        request,
        "detail.html",
        d=d,
        params=params,
        labels=json.dumps(labels, indent=2, sort_keys=True, ensure_ascii=False) if labels else "",
        max_text=MAX_TEXT,
    )


# The detail page's forms carry the digest of the action they showed; the vote is refused if it changed since.
DigestField = Annotated[str, Form()]


@router.post("/proposals/{id}/approve")
def approve(
    request: Request,
    id: str,
    user: UserDep,
    comment: Annotated[str, Form()] = "",
    action_digest: DigestField = "",
    csrf_token: CsrfField = "",
) -> Response:
    _check_csrf(request, user, csrf_token)
    result = service_of(request).approve(user.approver, proposal_id(id), comment, action_digest=action_digest)
    return RedirectResponse(f"/proposals/{result.proposal_id}", status_code=303)


@router.post("/proposals/{id}/reject")
def reject(
    request: Request,
    id: str,
    user: UserDep,
    reason: Annotated[str, Form()] = "",
    action_digest: DigestField = "",
    csrf_token: CsrfField = "",
) -> Response:
    _check_csrf(request, user, csrf_token)
    result = service_of(request).reject(user.approver, proposal_id(id), reason, action_digest=action_digest)
    return RedirectResponse(f"/proposals/{result.proposal_id}", status_code=303)
