"""Invisible characters in agent-supplied text, made visible on the approval page.

Bidi controls (U+202A to U+202E, U+2066 to U+2069, U+200E/U+200F) reorder what an approver reads: a resource or a
justification can display as something it is not. Zero-width and other format characters hide text or split
a word that looks whole. So every such character an approver would see is replaced by a visible marker naming
it, ``⟦U+202E⟧``: format characters (Cf), control characters other than newline and tab, line and paragraph
separators, surrogates and unassigned code points. The marker is plain text: HTML escaping still applies, so
it is safe in any template context (element text or attribute value).
"""

from __future__ import annotations

import unicodedata

_HIDDEN = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Cn"})
_LAYOUT = str.maketrans("", "", "\n\t")


def _marker(char: str) -> str:
    return f"⟦U+{ord(char):04X}⟧"


def reveal(text: str) -> str:
    """``text`` with every hidden character replaced by its ``⟦U+XXXX⟧`` marker (newlines and tabs kept)."""
    if text.translate(_LAYOUT).isprintable():  # the common case, at C speed
        return text
    return "".join(
        _marker(c) if c not in "\n\t" and not c.isprintable() and unicodedata.category(c) in _HIDDEN else c
        for c in text
    )
