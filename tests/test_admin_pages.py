"""The approvers' HTML pages over plain HTTP (no browser): sessions, CSRF, escaping, headers.

A real server (gRPC + admin endpoint) on SQLite and PostgreSQL; proposals come from agents over gRPC.
"""

from __future__ import annotations

import html
import itertools
import re
import uuid
from contextlib import closing
from dataclasses import dataclass

import httpx
import pytest
from conftest import BULK_CLOSE, Server
from sqlalchemy import select

from pdp.identity.approvers import add_approver, revoke_approver
from pdp.store.models import approvals, proposals
from pdp.v1 import pdp_pb2

LEADS = "support-leads"
XSS = ("<script>alert(1)</script>", "<img src=x onerror=alert(1)>")
CSP = (
    "default-src 'none'; style-src 'self' 'unsafe-inline'; script-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
_numbers = itertools.count(1)
_CSRF = re.compile(r'name="csrf_token" value="([^"]*)"')
_DIGEST = re.compile(r'name="action_digest" value="([0-9a-f]{64})"')


@dataclass
class Admin:
    server: Server
    url: str

    def browser(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, follow_redirects=False, timeout=30)

    def approver(self, *groups: str, approver_id: str = "") -> tuple[str, str]:
        approver_id = approver_id or f"page-approver-{next(_numbers)}-{uuid.uuid4().hex[:6]}"
        return approver_id, add_approver(self.server.engine, approver_id, groups, name=f"Person {approver_id}")

    def signed_in(self, *groups: str, approver_id: str = "") -> tuple[str, httpx.Client]:
        approver_id, token = self.approver(*groups, approver_id=approver_id)
        browser = self.browser()
        response = login(browser, token)
        assert response.status_code == 303 and response.headers["location"] == "/", response.text
        return approver_id, browser

    def bulk_close(self, owner: str = "tester", justification: str = "close duplicates", **params: object) -> str:
        agent = self.server.add_agent(owner=owner)
        response = self.server.client(agent.token).propose(
            "tickets", "POST", BULK_CLOSE, justification, params={"count": 40, **params}
        )
        assert response.decision.outcome == pdp_pb2.NEEDS_APPROVAL
        return response.proposal_id

    def votes(self, proposal_id: str) -> list[tuple[str, str, str]]:
        with self.server.engine.connect() as conn:
            rows = conn.execute(select(approvals).where(approvals.c.proposal_id == proposal_id)).mappings().all()
        return [(r["approver_id"], r["verdict"], r["comment"]) for r in rows]

    def row_digest(self, proposal_id: str) -> str:
        row = self.server.row(proposal_id)
        assert row is not None
        return str(row["action_digest"])

    def state(self, proposal_id: str) -> str:
        with self.server.engine.connect() as conn:
            return str(conn.execute(select(proposals.c.state).where(proposals.c.id == proposal_id)).scalar_one())


@pytest.fixture(scope="module")
def admin(server: Server) -> Admin:
    """conftest's one server per module and backend; tests isolate themselves with approvers and proposals."""
    return Admin(server, server.admin_url)


def csrf(page: httpx.Response) -> str:
    found = _CSRF.search(page.text)
    assert found and found.group(1), page.text
    return found.group(1)


def shown_digest(page: httpx.Response) -> str:
    """The action digest the page's forms carry (the same in both forms)."""
    found: set[str] = set(_DIGEST.findall(page.text))
    assert len(found) == 1, page.text
    return found.pop()


def login(browser: httpx.Client, token: str) -> httpx.Response:
    form = browser.get("/login")
    assert form.status_code == 200
    return browser.post("/login", data={"token": token, "csrf_token": csrf(form)})


def by_id(page: httpx.Response, element_id: str) -> str:
    """The text of the element with ``id`` (no nesting of the same tag inside it in our templates)."""
    found = re.search(rf'<(\w+)[^>]*\bid="{element_id}"[^>]*>(.*?)</\1>', page.text, re.S)
    assert found, f"no #{element_id} in\n{page.text}"
    return html.unescape(re.sub(r"<[^>]+>", "", found.group(2))).strip()


def set_cookie(response: httpx.Response, name: str) -> str:
    header = next((h for h in response.headers.get_list("set-cookie") if h.startswith(f"{name}=")), None)
    assert header is not None, response.headers
    return header


def test_login_sets_a_strict_httponly_session_cookie_without_the_token(admin: Admin) -> None:
    _, token = admin.approver(LEADS)
    with admin.browser() as browser:
        form = browser.get("/login")
        assert form.status_code == 200
        for needle in ('id="login-form"', 'name="token" id="token" type="password"', 'id="login" type="submit"'):
            assert needle in form.text
        response = browser.post("/login", data={"token": token, "csrf_token": csrf(form)})
        assert response.status_code == 303 and response.headers["location"] == "/"
        cookie = set_cookie(response, "pdp_session")
        attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
        assert {"httponly", "path", "max-age", "samesite"} <= attributes
        assert "samesite=strict" in cookie.lower() and "max-age=28800" in cookie.lower()
        assert "secure" not in attributes  # cookie_secure is off on plain-HTTP localhost
        value = cookie.split(";")[0].split("=", 1)[1]
        assert token not in value and token.removeprefix("pdp_") not in value
        assert browser.get("/").status_code == 200
        assert browser.get("/login").headers["location"] == "/"  # already signed in


def test_bad_logins_are_refused(admin: Admin) -> None:
    _, token = admin.approver(LEADS)
    with admin.browser() as browser:
        wrong = login(browser, "pdp_wrong")
        assert wrong.status_code == 401 and by_id(wrong, "error") == "Unknown or revoked token."
        assert "pdp_session" not in wrong.headers.get("set-cookie", "")
        # Login CSRF: a form this server did not render for this browser is refused, even with a good token.
        browser.get("/login")
        forged = browser.post("/login", data={"token": token, "csrf_token": "0" * 64})
        assert forged.status_code == 403 and by_id(forged, "error")
        with admin.browser() as fresh:  # no pre-session cookie at all
            missing = fresh.post("/login", data={"token": token, "csrf_token": csrf(browser.get("/login"))})
            assert missing.status_code == 403 and "pdp_session" not in missing.headers.get("set-cookie", "")


def test_pages_need_a_session(admin: Admin) -> None:
    proposal = admin.bulk_close()
    with admin.browser() as browser:
        for path in ("/", f"/proposals/{proposal}"):
            response = browser.get(path)
            assert response.status_code == 303 and response.headers["location"] == "/login"
        browser.cookies.set("pdp_session", "v1.YWxpY2U.9999999999.00.deadbeef")  # forged
        assert browser.get("/").headers["location"] == "/login"
        response = browser.post(f"/proposals/{proposal}/approve", data={"csrf_token": "x"})
        assert response.status_code == 303 and response.headers["location"] == "/login"
    assert admin.votes(proposal) == []


def test_list_and_detail_render(admin: Admin) -> None:
    first, second = admin.bulk_close(), admin.bulk_close()
    _, browser = admin.signed_in(LEADS)
    with closing(browser):
        page = browser.get("/")
        assert page.status_code == 200
        assert page.text.index(f'data-proposal-id="{first}"') < page.text.index(f'data-proposal-id="{second}"')
        row = re.search(rf'<li class="proposal" data-proposal-id="{first}">(.*?)</li>', page.text, re.S)
        assert row, page.text
        assert f'<a href="/proposals/{first}">' in row.group(1) and BULK_CLOSE in row.group(1)
        countdown = re.search(r'<span class="countdown" data-expires-at="([^"]+)">([^<]+)</span>', row.group(1))
        assert countdown and re.fullmatch(r"(\dh \d\dm|\d+m) \d\ds left", countdown.group(2)), row.group(1)
        assert 'src="/static/countdown.js"' in page.text
        script = browser.get("/static/countdown.js")
        assert script.status_code == 200 and "countdown" in script.text

        detail = browser.get(f"/proposals/{first}")
        assert detail.status_code == 200
        assert by_id(detail, "state") == "PENDING_APPROVAL"
        assert by_id(detail, "justification") == "close duplicates"
        assert by_id(detail, "justification-label") == "Unverified — written by the agent"
        assert by_id(detail, "resource") == BULK_CLOSE and '"count": 40' in by_id(detail, "params")
        assert "rule:tickets-bulk" in by_id(detail, "reasons") and by_id(detail, "policy-version")
        assert "proposal.decided" in by_id(detail, "timeline") and "0 of 2" in by_id(detail, "requirements")
        for form in ("approve-form", "reject-form"):
            assert re.search(rf'<form[^>]*id="{form}"[^>]*method="post"', detail.text)
        # Both forms send back the digest of the action this page showed (the vote is refused if it changed).
        assert detail.text.count('type="hidden" name="action_digest"') == 2
        assert shown_digest(detail) == by_id(detail, "action-digest") == admin.row_digest(first)
        assert 'name="reason"' in detail.text and 'id="approve"' in detail.text and 'id="reject"' in detail.text
        assert detail.text.count(f'name="csrf_token" value="{csrf(detail)}"') == 3  # approve, reject, sign out
        assert 'id="why-not"' not in detail.text


def test_owner_sees_why_they_cannot_vote_and_an_empty_list(admin: Admin) -> None:
    proposal = admin.bulk_close(owner="page-owner")
    _, browser = admin.signed_in("no-such-group", approver_id="page-owner")
    with closing(browser):
        assert by_id(browser.get("/"), "empty")
        detail = browser.get(f"/proposals/{proposal}")
        assert "separation of duties" in by_id(detail, "why-not") and 'id="approve-form"' not in detail.text


def test_posts_without_the_csrf_token_change_nothing(admin: Admin) -> None:
    proposal = admin.bulk_close()
    _, browser = admin.signed_in(LEADS)
    _, other = admin.signed_in(LEADS)
    with closing(browser), closing(other):
        page = browser.get(f"/proposals/{proposal}")
        token, seen = csrf(page), shown_digest(page)
        for data in ({}, {"csrf_token": ""}, {"csrf_token": "0" * 64}, {"csrf_token": csrf(other.get("/"))}):
            for verb, text in (("approve", {"comment": "ok"}), ("reject", {"reason": "no"})):
                response = browser.post(f"/proposals/{proposal}/{verb}", data={**text, **data})
                assert response.status_code == 403 and "CSRF" in by_id(response, "error")
            assert browser.post("/logout", data=data).status_code == 403
        assert admin.votes(proposal) == [] and admin.state(proposal) == "PENDING_APPROVAL"
        # Without the digest the page showed, the form is malformed and nothing is recorded.
        missing = browser.post(f"/proposals/{proposal}/approve", data={"comment": "fine", "csrf_token": token})
        assert missing.status_code == 422 and "action_digest" in by_id(missing, "error")
        assert admin.votes(proposal) == []
        response = browser.post(
            f"/proposals/{proposal}/approve", data={"comment": "fine", "csrf_token": token, "action_digest": seen}
        )
        assert response.status_code == 303 and response.headers["location"] == f"/proposals/{proposal}"
        assert [v[1:] for v in admin.votes(proposal)] == [("approve", "fine")]


def test_reject_from_the_page_then_errors_render_with_their_status(admin: Admin) -> None:
    proposal = admin.bulk_close()
    _, browser = admin.signed_in(LEADS)
    _, late = admin.signed_in(LEADS)
    with closing(browser), closing(late):
        token = csrf(browser.get(f"/proposals/{proposal}"))
        empty = browser.post(f"/proposals/{proposal}/reject", data={"reason": "  ", "csrf_token": token})
        assert empty.status_code == 422 and "reason" in by_id(empty, "error")
        done = browser.post(f"/proposals/{proposal}/reject", data={"reason": "not now", "csrf_token": token})
        assert done.status_code == 303 and admin.state(proposal) == "REJECTED"
        assert by_id(browser.get(f"/proposals/{proposal}"), "state") == "REJECTED"
        again = late.post(
            f"/proposals/{proposal}/approve",
            data={"csrf_token": csrf(late.get("/")), "action_digest": admin.row_digest(proposal)},
        )
        assert again.status_code == 409 and "REJECTED" in by_id(again, "error")
        assert f'href="/proposals/{proposal}"' in again.text
        unknown = late.get(f"/proposals/{uuid.uuid4()}")
        assert unknown.status_code == 404 and by_id(unknown, "error")
        assert late.get("/proposals/<script>").status_code == 404
        assert late.get("/no/such/page").status_code == 404


def test_agent_text_is_escaped(admin: Admin) -> None:
    payload = " ".join(XSS)
    proposal = admin.bulk_close(justification=payload, note=payload)
    _, browser = admin.signed_in(LEADS)
    with closing(browser):
        page = browser.get(f"/proposals/{proposal}")
        voted = browser.post(
            f"/proposals/{proposal}/approve",
            data={"comment": payload, "csrf_token": csrf(page), "action_digest": shown_digest(page)},
        )
        assert voted.status_code == 303, voted.text
        detail = browser.get(f"/proposals/{proposal}")
        for raw in XSS:
            assert raw not in detail.text
        assert html.escape(XSS[0], quote=False) in detail.text
        assert by_id(detail, "justification") == payload
        assert payload in by_id(detail, "params") and payload in by_id(detail, "approvals")
        assert "<script" not in detail.text.replace('<script src="/static/countdown.js" defer></script>', "")


def test_every_page_carries_the_security_headers(admin: Admin) -> None:
    proposal = admin.bulk_close()
    _, browser = admin.signed_in(LEADS)
    with closing(browser):
        responses = [
            browser.get("/"),
            browser.get(f"/proposals/{proposal}"),
            browser.get(f"/proposals/{uuid.uuid4()}"),
            browser.post(f"/proposals/{proposal}/approve", data={}),
            browser.get("/static/countdown.js"),
            browser.get("/api/v1/proposals"),
        ]
        with admin.browser() as anonymous:
            responses += [anonymous.get("/login"), anonymous.get("/")]
    for response in responses:
        headers = response.headers
        assert headers["content-security-policy"] == CSP, response.url
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "no-referrer"
        assert headers["cache-control"] == "no-store"
    page = responses[0].text
    assert '<meta name="viewport"' in page and "max-width" in page and "overflow-wrap: anywhere" in page


def test_logout_clears_the_session_cookie(admin: Admin) -> None:
    """Sessions are stateless (signed cookies): logout clears the browser's; see the README on copied cookies."""
    _, browser = admin.signed_in(LEADS)
    with closing(browser):
        token = csrf(browser.get("/"))
        response = browser.post("/logout", data={"csrf_token": token})
        assert response.status_code == 303 and response.headers["location"] == "/login"
        cleared = set_cookie(response, "pdp_session").lower()
        assert "max-age=0" in cleared or "expires=thu, 01 jan 1970" in cleared
        assert "pdp_session" not in browser.cookies
        assert browser.get("/").headers["location"] == "/login"


def test_a_revoked_approvers_session_stops_working(admin: Admin) -> None:
    proposal = admin.bulk_close()
    approver_id, browser = admin.signed_in(LEADS)
    with closing(browser):
        token = csrf(browser.get(f"/proposals/{proposal}"))
        revoke_approver(admin.server.engine, approver_id)
        assert browser.get("/").headers["location"] == "/login"
        response = browser.post(f"/proposals/{proposal}/approve", data={"csrf_token": token})
        assert response.status_code == 303 and response.headers["location"] == "/login"
    assert admin.votes(proposal) == []
