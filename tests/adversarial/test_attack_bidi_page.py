"""Attack: bidi controls and invisible characters make the approval page show something else than was sent.

An agent with a valid token writes a justification and params with a right-to-left override (so
``exe.gnp`` reads as ``png.exe``), isolates, marks, zero-width characters and a BOM; an approver's comment
carries one too. An approver opens the real page over HTTP (the real admin server, session and all). Every
such character must be shown as a visible marker (``⟦U+202E⟧``), none may reach the page raw, and HTML
escaping must still hold.
"""

from __future__ import annotations

import html
import re
import uuid
from contextlib import closing

import httpx
from conftest import BULK_CLOSE, Server

from pdp.identity.approvers import add_approver
from pdp.v1 import pdp_pb2

LEADS = "support-leads"
HIDDEN = {
    "\u202e": "RIGHT-TO-LEFT OVERRIDE",
    "\u202d": "LEFT-TO-RIGHT OVERRIDE",
    "\u202a": "LEFT-TO-RIGHT EMBEDDING",
    "\u202c": "POP DIRECTIONAL FORMATTING",
    "\u2066": "LEFT-TO-RIGHT ISOLATE",
    "\u2067": "RIGHT-TO-LEFT ISOLATE",
    "\u2069": "POP DIRECTIONAL ISOLATE",
    "\u200e": "LEFT-TO-RIGHT MARK",
    "\u200f": "RIGHT-TO-LEFT MARK",
    "\u200b": "ZERO WIDTH SPACE",
    "\u2060": "WORD JOINER",
    "\ufeff": "ZERO WIDTH NO-BREAK SPACE",
    "\u061c": "ARABIC LETTER MARK",
}
SPOOF = "invoice_\u202eexe.gnp\u202c for \u2066<b>bold</b>\u2069 " + "".join(HIDDEN)


def marker(char: str) -> str:
    return f"⟦U+{ord(char):04X}⟧"


def signed_in(server: Server, *groups: str) -> httpx.Client:
    token = add_approver(server.engine, f"bidi-lead-{uuid.uuid4().hex[:8]}", groups)
    browser = httpx.Client(base_url=server.admin_url, timeout=30)
    form = browser.get("/login")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert csrf is not None
    assert browser.post("/login", data={"token": token, "csrf_token": csrf.group(1)}).status_code == 303
    return browser


def element(page: str, element_id: str) -> str:
    found = re.search(rf'<(\w+)[^>]*\bid="{element_id}"[^>]*>(.*?)</\1>', page, re.S)
    assert found, f"no #{element_id}"
    return found.group(2)


def test_the_page_shows_every_hidden_character_as_a_marker(server: Server) -> None:
    agent = server.add_agent(owner="bidi-owner")
    response = server.client(agent.token).propose(
        "tickets", "POST", BULK_CLOSE, SPOOF, params={"count": 40, "note": SPOOF}, labels={"ticket": SPOOF}
    )
    assert response.state == pdp_pb2.PENDING_APPROVAL
    proposal_id = response.proposal_id
    token = add_approver(server.engine, f"bidi-voter-{uuid.uuid4().hex[:6]}", [LEADS])
    with httpx.Client(base_url=server.admin_url, headers={"Authorization": f"Bearer {token}"}) as voter:
        digest = voter.get(f"/api/v1/proposals/{proposal_id}").json()["action_digest"]
        body = {"comment": "ok \u202eevil\u202c", "action_digest": digest}
        voted = voter.post(f"/api/v1/proposals/{proposal_id}/approve", json=body)
        assert voted.status_code == 200, voted.text

    with closing(signed_in(server, LEADS)) as browser:
        page = browser.get(f"/proposals/{proposal_id}")
    assert page.status_code == 200
    raw = [name for char, name in HIDDEN.items() if char in page.text]
    assert raw == [], f"raw on the page: {raw}"
    for element_id in ("justification", "params", "labels", "approvals"):
        shown = element(page.text, element_id)
        assert marker("\u202e") in shown, element_id
    justification = element(page.text, "justification")
    for char, name in HIDDEN.items():
        assert marker(char) in justification, name
    # Still text, never markup; and the reader sees the characters in the order they were sent.
    assert "<b>bold</b>" not in page.text and "&lt;b&gt;bold&lt;/b&gt;" in justification
    assert html.unescape(justification).startswith("invoice_⟦U+202E⟧exe.gnp⟦U+202C⟧ for ⟦U+2066⟧<b>bold</b>")
