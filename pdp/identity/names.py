"""The one rule for identity names: agent ids, agent owners, approver ids and approver groups.

Separation of duties compares an approver's id with an agent's owner, a vote counts once per approver, and
quorum matches approvers' groups with the groups a decision names. Those comparisons must not be fooled by
two spellings a human reads as one name (``alice``, ``Alice``, `` alice``, ``alice`` + U+200B, ``alice`` in
fullwidth letters). Two halves:

- **New names are canonical.** An id or owner is 1 to 200 characters of lowercase ASCII letters, digits and
  ``. _ - @ +``, starting with a letter or a digit (``alice``, ``alice@example.com``, ``support-bot-2``);
  a group name is 1 to 128 of lowercase letters, digits and ``_ . -``, starting with a letter or a digit.
  Anything else is refused with the canonical spelling as a hint, never silently rewritten, so the name
  stored is the name the operator typed. ASCII only, so look-alike letters of other scripts (a Cyrillic
  U+0430 for a Latin ``a``) cannot make a second "alice".
- **Every comparison uses :func:`identity_key`** (NFKC, invisible characters dropped, case folded, outer
  whitespace stripped, inner runs of whitespace collapsed), which also covers names stored before this rule:
  a new name is refused when its key equals an existing name's key.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable

from pdp.errors import InvalidArgument

MAX_ID = 200
_ID = re.compile(r"[a-z0-9][a-z0-9._@+\-]{0,199}")
_GROUP = re.compile(r"[a-z0-9][a-z0-9._\-]{0,127}")
# Invisible in most renderings: controls, format characters (bidi, zero-width), unassigned, surrogates.
_INVISIBLE = frozenset({"Cc", "Cf", "Cn", "Cs"})


@functools.lru_cache(maxsize=8192)
def identity_key(name: str) -> str:
    """The form two names are compared in: equal keys mean "the same identity" to a human reader."""
    text = unicodedata.normalize("NFKC", name)
    text = "".join(c for c in text if unicodedata.category(c) not in _INVISIBLE)
    text = unicodedata.normalize("NFKC", text.casefold())
    return " ".join(text.split())


def same_identity(a: str, b: str) -> bool:
    return identity_key(a) == identity_key(b)


def _hint(value: str, pattern: re.Pattern[str]) -> str:
    key = identity_key(value)
    return f"; use {key!r}" if key != value and pattern.fullmatch(key) else ""


def check_id(field: str, value: str) -> str:
    """``value`` if it is a canonical identity name; InvalidArgument naming ``field`` otherwise."""
    if not _ID.fullmatch(value):
        raise InvalidArgument(
            field,
            f"{value!r} is not an identity name: 1 to {MAX_ID} lowercase ASCII letters, digits and . _ - @ +, "
            f"starting with a letter or digit{_hint(value, _ID)}",
        )
    return value


def check_group(value: str) -> str:
    if not _GROUP.fullmatch(value):
        raise InvalidArgument(
            "groups",
            f"{value!r} is not a group name (1 to 128 lowercase letters, digits, _ . -, starting with a letter "
            f"or digit){_hint(value, _GROUP)}",
        )
    return value


# Reorder what a reader sees: never part of a display name. (Other format characters, such as the zero-width
# non-joiner some scripts need, are allowed; pages and the CLI show them visibly.)
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def check_display_name(value: str) -> str:
    """A free-text display name: at most 200 characters, no control, separator or bidi control character."""
    if len(value) > MAX_ID:
        raise InvalidArgument("name", f"is longer than {MAX_ID} characters")
    bad = next((c for c in value if c in _BIDI or unicodedata.category(c) in ("Cc", "Cn", "Cs", "Zl", "Zp")), None)
    if bad is not None:
        raise InvalidArgument("name", f"contains the control or bidi character U+{ord(bad):04X}")
    return value


def colliding(name: str, existing: Iterable[str]) -> str | None:
    """The existing name ``name`` would be confused with (same :func:`identity_key`), if any."""
    key = identity_key(name)
    return next((other for other in existing if identity_key(other) == key), None)
