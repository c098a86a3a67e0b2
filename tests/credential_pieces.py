"""What a piece of a credential is, for tests: any 8 characters of any form docs/execution.md says is covered.

Restated here from the docs rather than imported from the redactor, so a form the redactor forgot is a test
failure, not a blind spot shared by both. Comparison ignores case (``casefold``, broader than the redactor's
own fold), as the redactor promises to.
"""

from __future__ import annotations

import base64
import json
from functools import cache
from urllib.parse import quote, quote_plus

PIECE = 8  # the shortest credential the executor accepts is 8 characters (executor.secrets.MIN_SECRET_LENGTH)


def _inside_base64(raw: bytes) -> set[str]:
    """The base64 characters made only of ``raw``'s bits, when ``raw`` starts 0, 1 or 2 bytes into a longer text."""
    found = set()
    for offset in range(3):
        first, end = -(-offset * 8 // 6), (offset + len(raw)) * 8 // 6
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            found.add(encode(bytes(offset) + raw).decode()[first:end])
    return found


PUNCTUATION = "".join(c for c in map(chr, range(0x21, 0x7F)) if not c.isalnum())


def _json_escaped(value: str, chars: str) -> str:
    """JSON with each of ``chars`` as \\u00xx, as Go, .NET or a cautious encoder writes it."""
    return "".join(f"\\u{ord(c):04x}" if c in chars else json.dumps(c)[1:-1] for c in value)


def covered_forms(credential: str) -> set[str]:
    """The credential as given, wholly upper- and lower-cased, each raw, URL-quoted, JSON-escaped, base64
    (standard and URL-safe, padded or not, alone or inside a longer base64 text) and hex."""
    found: set[str] = set()
    for value in {credential, credential.upper(), credential.lower()}:
        raw = value.encode()
        standard, urlsafe = base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()
        found |= _inside_base64(raw) | {
            value,
            quote(value, safe=""),
            quote(value),
            quote_plus(value),
            json.dumps(value)[1:-1],
            json.dumps(value, ensure_ascii=False)[1:-1],
            *(_json_escaped(value, chars) for chars in ("<>&", "<>&'+`\"", PUNCTUATION)),
            standard,
            standard.rstrip("="),
            urlsafe,
            urlsafe.rstrip("="),
            raw.hex(),
            raw.hex().upper(),
        }
    return found


@cache
def pieces(credential: str) -> frozenset[str]:
    """Every ``PIECE`` characters of every covered form, case-folded."""
    return frozenset(
        form[i : i + PIECE].casefold() for form in covered_forms(credential) for i in range(len(form) - PIECE + 1)
    )


def leaked(text: str, credential: str) -> list[str]:
    """The pieces of ``credential`` found in ``text``, ignoring case; [] when none is."""
    folded = text.casefold()
    return sorted(piece for piece in pieces(credential) if piece in folded)
