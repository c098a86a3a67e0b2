"""Text the CLI prints is text, never terminal commands.

Recorded text (justifications, params, reasons rendered from params, approvers' comments, execution results
and errors, ids and names) may come from an agent, a target system or an approver. Printed raw, ``ESC [2J``
clears the screen, ``ESC ]8;;url`` makes a hyperlink, a C1 ``CSI`` (U+009B) starts a sequence on terminals
that honour 8-bit controls, and bidi controls (U+202E …) reorder what the reader sees. So every such
character is printed as a visible escape instead: C0 and C1 controls, DEL, format characters (Cf: bidi
controls, zero-width characters, tag characters), line and paragraph separators, surrogates and unassigned
code points.

Escapes are written ``\\uXXXX`` (a surrogate pair above U+FFFF), which is also a valid JSON escape: the
same rule applies to JSON output, where such a character can only stand inside a string, so the escaped
document still parses to exactly the recorded text.

Two layers: :func:`visible` escapes one value completely (newlines and tabs too, so a value cannot start a
line of its own and pass for another field); :func:`guard_streams` wraps stdout and stderr so that anything
printed by any command, including text no one thought of, is escaped the same way except the newlines and
tabs that lay the output out.
"""

from __future__ import annotations

import sys
import unicodedata
from typing import Any, TextIO, cast

_UNSAFE = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Cn"})
_LAYOUT = str.maketrans("", "", "\n\t")


def _escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def _escaped(text: str, keep: str) -> str:
    return "".join(
        _escape(c) if c not in keep and not c.isprintable() and unicodedata.category(c) in _UNSAFE else c for c in text
    )


def visible(text: str) -> str:
    """``text`` with every control, format and invisible character (newlines too) as a ``\\uXXXX`` escape."""
    # Fast path: str.isprintable() is False for every unsafe character (and for a few harmless ones).
    return text if text.isprintable() else _escaped(text, "")


def layout_safe(text: str) -> str:
    """Like :func:`visible`, but keeps newlines and tabs: for whole lines of output the CLI composed."""
    return text if text.translate(_LAYOUT).isprintable() else _escaped(text, "\n\t")


class EscapingStream:
    """A text stream that escapes unsafe characters on their way to the real one."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(layout_safe(text))
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def guard_streams() -> None:
    """Escape unsafe characters in everything this process prints from now on (idempotent)."""
    if not isinstance(sys.stdout, EscapingStream):
        sys.stdout = cast(TextIO, EscapingStream(sys.stdout))
    if not isinstance(sys.stderr, EscapingStream):
        sys.stderr = cast(TextIO, EscapingStream(sys.stderr))
