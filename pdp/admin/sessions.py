"""Signed session cookies and CSRF tokens for the HTML pages.

A session cookie carries the approver id, an expiry and a random nonce, signed with HMAC-SHA256. It never
carries the bearer token: a stolen cookie dies with its expiry, and every request re-loads the approver from
the database, so revoking an approver ends their sessions at once. The CSRF token of a session is an HMAC of
its nonce, so it needs no server-side state and differs per login.

The login form has no session yet, so it uses a signed double-submit pre-session cookie (``pdp_login``): the
form carries HMAC(key, "login" + nonce) and the cookie the nonce. A cross-site page cannot read the cookie
(and, being SameSite=Strict, it is not even sent cross-site), so it cannot log a victim into the attacker's
account.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass

COOKIE = "pdp_session"
LOGIN_COOKIE = "pdp_login"
MAX_AGE = 8 * 60 * 60
LOGIN_MAX_AGE = 60 * 60
_VERSION = "v1"


@dataclass(frozen=True, slots=True)
class Session:
    approver_id: str
    expires: int  # Unix seconds
    nonce: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _equal(given: str, expected: str) -> bool:
    # Constant time; "surrogatepass" because request text may hold lone surrogates, which must not raise.
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


def _mac(key: bytes, purpose: str, message: str) -> str:
    # The purpose prefix keeps a MAC made for one use (session, csrf, login) from being valid for another.
    return hmac.new(key, f"{purpose}\n{message}".encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def issue(key: bytes, approver_id: str, now: float) -> tuple[Session, str]:
    """A new session for ``approver_id`` and its cookie value."""
    session = Session(approver_id, int(now) + MAX_AGE, secrets.token_hex(16))
    payload = ".".join((_VERSION, _b64(approver_id.encode()), str(session.expires), session.nonce))
    return session, f"{payload}.{_mac(key, 'session', payload)}"


def read(key: bytes, value: str | None, now: float) -> Session | None:
    """The session a cookie value carries, or None when it is missing, forged, malformed or expired."""
    if not value:
        return None
    payload, _, mac = value.rpartition(".")
    if not payload or not _equal(mac, _mac(key, "session", payload)):
        return None
    parts = payload.split(".")
    if len(parts) != 4 or parts[0] != _VERSION:
        return None
    try:
        approver_id = _unb64(parts[1]).decode()
        expires = int(parts[2])
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    if expires <= now:
        return None
    return Session(approver_id, expires, parts[3])


def csrf_token(key: bytes, session: Session) -> str:
    return _mac(key, "csrf", session.nonce)


def check_csrf(key: bytes, session: Session, token: str | None) -> bool:
    return bool(token) and _equal(token or "", csrf_token(key, session))


def login_nonce() -> str:
    return secrets.token_hex(16)


def login_csrf_token(key: bytes, nonce: str) -> str:
    return _mac(key, "login", nonce)


def check_login_csrf(key: bytes, nonce: str | None, token: str | None) -> bool:
    if not nonce or not token:
        return False
    return _equal(token, login_csrf_token(key, nonce))
