"""Scrub credentials out of anything the executor stores, returns or logs, and cut text without leaving a piece.

Forms looked for, for the credential as configured and wholly upper- and lower-cased, in any order and
alone or inside a longer text (a target may change its case before encoding it): raw, URL-quoted (``quote``
with and without ``/`` safe, ``quote_plus``), JSON-escaped (ASCII and not), base64 standard and URL-safe,
padded and not, base64 inside a longer base64 text at each of the three byte offsets (an echoed ``Basic``
header), and hex of the UTF-8 bytes. Matching ignores case (a target may upper- or lower-case what it
echoes; hex comes in both), through a fold that maps each character to exactly one, so positions in the
folded text are positions in the text. Every match, overlapping ones included, becomes ``[REDACTED]``.

Not covered, because no scrubbing of text can see it: a target that returns only part of a credential,
or reverses, splits across fields, hashes, encrypts or compresses it, or encodes it in a form not listed.

Text is cut only through :meth:`Redactor.cut`: scrub first, then cut, then drop any trailing fragment that
could be part of a form. A credential cut in two is no longer a whole form, so scrubbing after a cut would
miss it, and an agent controls where a cut falls (its own request's size moves an echo)."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple
from urllib.parse import quote, quote_plus

from executor.secrets import Secret

REDACTED = "[REDACTED]"
_SEPARATOR = "\x00"  # joins the strings of a value for one scan; no form of a credential may hold it

# str.lower() is one character for one and context-free except for U+0130 (two characters) and the Greek
# final sigma; these, and the characters whose upper case lowers to another letter (micro sign and Greek mu,
# long s and s, dotless i and i, ...), are mapped onto one representative, so that text and a form fold alike
# wherever they sit. A test checks every code point.
_FOLD_FIRST = "\u0130"  # capital I with dot above: lower() gives "i" + U+0307
_FOLD_AFTER = {
    "\u00b5": "\u03bc",  # micro sign -> Greek mu
    "\u0131": "i",  # dotless i
    "\u017f": "s",  # long s
    "\u0345": "\u03b9",  # combining ypogegrammeni -> iota
    "\u03c2": "\u03c3",  # final sigma -> sigma
    "\u03d0": "\u03b2",  # Greek symbols (beta, theta, phi, pi, kappa, rho, epsilon) -> the letters
    "\u03d1": "\u03b8",
    "\u03d5": "\u03c6",
    "\u03d6": "\u03c0",
    "\u03f0": "\u03ba",
    "\u03f1": "\u03c1",
    "\u03f5": "\u03b5",
    "\u1c80": "\u0432",  # Cyrillic small letter rounded ve ... -> the ordinary letters
    "\u1c81": "\u0434",
    "\u1c82": "\u043e",
    "\u1c83": "\u0441",
    "\u1c84": "\u0442",
    "\u1c85": "\u0442",
    "\u1c86": "\u044a",
    "\u1c87": "\u0463",
    "\u1c88": "\ua64b",
    "\u1e9b": "\u1e61",  # long s with dot above -> s with dot above
    "\u1fbe": "\u03b9",  # Greek prosgegrammeni -> iota
}


def fold(text: str) -> str:
    """``text`` with case ignored: the same length, character for character, whatever surrounds each one."""
    if text.isascii():
        return text.lower()
    if _FOLD_FIRST in text:
        text = text.replace(_FOLD_FIRST, "i")
    lowered = text.lower()
    for special, target in _FOLD_AFTER.items():  # str.replace is a C scan; str.translate would be per character
        if special in lowered:
            lowered = lowered.replace(special, target)
    return lowered


def _embedded_base64(raw: bytes) -> set[str]:
    """The base64 characters that stand for ``raw`` wherever it sits in a longer encoded text.

    Inside a larger base64 string (an echoed ``Basic`` header, an encoded body) the secret may start at
    any of three byte offsets; for each, keep only the characters whose six bits all come from it.
    """
    forms = set()
    for offset in range(3):
        padded = bytes(offset) + raw
        first = -(-offset * 8 // 6)  # the first character made only of the secret's bits
        last = len(padded) * 8 // 6  # one past the last such character
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            forms.add(encode(padded).decode("ascii")[first:last])
    return forms


def _encodings(value: str) -> set[str]:
    """The ways ``value`` itself can be written into text."""
    raw = value.encode("utf-8")
    encoded = base64.b64encode(raw).decode("ascii")
    urlsafe = base64.urlsafe_b64encode(raw).decode("ascii")
    return (
        _embedded_base64(raw)
        | {
            value,
            quote(value, safe=""),
            quote(value),  # "/" left as is, the default
            quote_plus(value, safe=""),
            json.dumps(value)[1:-1],
            json.dumps(value, ensure_ascii=False)[1:-1],
            *(_unicode_escaped(value, chars) for chars in _JSON_ESCAPED_SETS),
            encoded,
            encoded.rstrip("="),  # unpadded base64 (JWT-style, some headers)
            urlsafe,
            urlsafe.rstrip("="),
            raw.hex(),  # upper-case hex folds onto it
        }
    )


# Characters JSON encoders write as \u00XX although they need no escape: Go's encoding/json escapes <, > and &;
# .NET's default encoder also ', +, ` and "; some escape every punctuation character. One form per convention:
# a credential split by one such escape would otherwise show its pieces on either side.
_JSON_ESCAPED_SETS = ("<>&", "<>&'+`\"", "".join(chr(c) for c in range(0x21, 0x7F) if not chr(c).isalnum()))


def _unicode_escaped(value: str, chars: str) -> str:
    """``value`` JSON-escaped, with each of ``chars`` written as ``\\u00xx`` (matching ignores the hex digits' case)."""
    escaped = json.dumps(value)[1:-1]
    for char in chars:
        plain = json.dumps(char)[1:-1]  # '"' and '\\' are escaped already; the rest stand as themselves
        escaped = escaped.replace(plain, f"\\u{ord(char):04x}")
    return escaped


def _recased(value: str) -> set[str]:
    """``value`` upper-cased, and lower-cased alone or inside a longer text: a letter before or after it decides
    whether a capital sigma at its edge lower-cases to the final form or not."""
    return {
        value.upper(),
        value.lower(),
        ("a" + value).lower()[1:],
        (value + "a").lower()[:-1],
        ("a" + value + "a").lower()[1:-1],
    }


def _cased(value: str) -> set[str]:
    """``value`` and what changing its case, in any order, can make of it (ẞ → ß → SS → ss)."""
    found = {value}
    frontier = {value}
    while frontier:
        frontier = {changed for item in frontier for changed in _recased(item)} - found
        found |= frontier
    return found


def forms(value: str) -> set[str]:
    """Every form of ``value`` the redactor looks for (before folding)."""
    found: set[str] = set()
    for variant in _cased(value):
        found |= _encodings(variant)
    found.discard("")
    return found


class Cut(NamedTuple):
    text: str
    truncated: bool


@dataclass(frozen=True, slots=True)
class _Compiled:
    folded: tuple[str, ...]  # every form, folded, longest first
    longest: int  # characters in the longest form
    overlap: int  # UTF-8 bytes of the longest form, at most, in any case
    separable: bool  # no form holds _SEPARATOR

    @classmethod
    def of(cls, secrets: Iterable[Secret]) -> _Compiled:
        unfolded: set[str] = set()
        for secret in secrets:
            unfolded |= forms(secret.reveal())
        folded = tuple(sorted({fold(form) for form in unfolded}, key=lambda form: (-len(form), form)))
        longest = len(folded[0]) if folded else 0
        # Folding keeps the number of characters; in some case one may take up to 4 bytes.
        return cls(folded, longest, 4 * longest, not any(_SEPARATOR in form for form in folded))


class Redactor:
    """Replaces every known credential (and its forms) with ``[REDACTED]``, and cuts text safely.

    One redactor serves the whole executor: connectors get it through their context and register their
    credentials with :meth:`add` as they resolve them; the executor adds every connector's ``secrets()``.
    Reads are lock-free: ``add`` swaps in a new compiled state (it is called at start-up).
    """

    def __init__(self, secrets: Iterable[Secret] = ()) -> None:
        self._secrets: list[Secret] = []
        self._compiled = _Compiled.of(())
        self.add(secrets)

    def __repr__(self) -> str:
        return "Redactor(...)"

    def __bool__(self) -> bool:
        return bool(self._compiled.folded)

    def add(self, secrets: Iterable[Secret]) -> None:
        """Look for these credentials too, from now on."""
        new = [secret for secret in secrets if secret not in self._secrets]
        if new:
            self._secrets.extend(new)
            self._compiled = _Compiled.of(self._secrets)

    @property
    def overlap(self) -> int:
        """Bytes to read past a limit so that a form straddling it is seen whole before the cut."""
        return self._compiled.overlap

    def text(self, s: str) -> str:
        compiled = self._compiled
        if not compiled.folded or not s:
            return s
        folded = fold(s)
        spans: list[tuple[int, int]] = []
        for form in compiled.folded:
            # str.find is a fast C scan; every occurrence counts, overlapping ones included.
            start = folded.find(form)
            while start >= 0:
                spans.append((start, start + len(form)))
                start = folded.find(form, start + 1)
        if not spans:
            return s
        spans.sort()
        merged = [list(spans[0])]
        for start, end in spans[1:]:
            if start < merged[-1][1]:  # overlapping: one marker for both
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        parts: list[str] = []
        done = 0
        for start, end in merged:
            parts += (s[done:start], REDACTED)
            done = end
        parts.append(s[done:])
        return "".join(parts)

    def cut(self, s: str, limit: int, *, more: bool = False, unit: Literal["chars", "bytes"] = "chars") -> Cut:
        """``s`` scrubbed, then cut to at most ``limit`` characters (or UTF-8 bytes), with no trailing fragment
        of a credential. ``more``: ``s`` is itself only the start of a longer text (a read limit), so its end
        is a cut edge already."""
        scrubbed = self.text(s)
        if unit == "bytes":
            encoded = scrubbed.encode("utf-8")
            over = len(encoded) > limit
            head = encoded[:limit].decode("utf-8", errors="ignore") if over else scrubbed
        else:
            over = len(scrubbed) > limit
            head = scrubbed[:limit]
        if not over and not more:
            return Cut(scrubbed, False)
        return Cut(self.trim(head), True)

    def trim(self, s: str) -> str:
        """``s`` without what may remain of a credential at its end, a cut edge: the longest tail that is the
        start of a form, or, right after a ``[REDACTED]`` marker, a tail that is any part of one (a form that
        began inside a scrubbed one, cut before its end, shows only its middle).

        A tail that only looks like part of a form goes too: at a cut edge nobody can tell them apart.
        ``s`` should be scrubbed already; a marker is never cut into.
        """
        compiled = self._compiled
        if not compiled.folded or not s:
            return s
        start = max(0, len(s) - compiled.longest)
        marker = s.rfind(REDACTED, max(0, start - len(REDACTED)))
        if marker >= 0 and marker + len(REDACTED) >= start:
            start = marker + len(REDACTED)
            if any(fold(s[start:]) in form for form in compiled.folded):
                return s[:start]
        tail = fold(s[start:])
        for i in range(len(tail)):
            fragment = tail[i:]
            if any(form.startswith(fragment) for form in compiled.folded):
                return s[: start + i]
        return s

    def value(self, obj: Any) -> Any:
        """``obj`` with every string in it scrubbed, dict keys included; other scalars unchanged.

        The strings are scrubbed as one text, joined by a character no form holds (so no match spans two),
        because a result may hold tens of thousands of short strings and each scan has a fixed cost.
        """
        compiled = self._compiled
        if not compiled.folded:
            return obj
        strings: list[str] = []
        _strings(obj, strings)
        if not strings:
            return obj
        joined = _SEPARATOR.join(strings)
        if compiled.separable and joined.count(_SEPARATOR) == len(strings) - 1:
            scrubbed = self.text(joined).split(_SEPARATOR)
        else:  # a string or a credential holds the separator itself
            scrubbed = [self.text(string) for string in strings]
        return _rebuilt(obj, iter(scrubbed))


def _strings(obj: Any, found: list[str]) -> None:
    """Every string in ``obj``, depth first, each dict key before its value."""
    if isinstance(obj, str):
        found.append(obj)
    elif isinstance(obj, dict):
        for key, item in obj.items():
            _strings(key, found)
            _strings(item, found)
    elif isinstance(obj, list | tuple):
        for item in obj:
            _strings(item, found)


def _rebuilt(obj: Any, strings: Iterator[str]) -> Any:
    """``obj`` with its strings replaced, in the order :func:`_strings` found them."""
    if isinstance(obj, str):
        return next(strings)
    if isinstance(obj, dict):
        return {_rebuilt(key, strings): _rebuilt(item, strings) for key, item in obj.items()}
    if isinstance(obj, list):
        return [_rebuilt(item, strings) for item in obj]
    if isinstance(obj, tuple):
        return tuple(_rebuilt(item, strings) for item in obj)
    return obj


class RedactingFilter(logging.Filter):
    """Scrubs a log record's final message and its traceback; attach it to handlers.

    The message is formatted here (args merged in) and the traceback rendered to text, because a
    credential is as likely to sit in an argument or an exception message as in the format string.
    """

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self._redactor = redactor
        self._formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._redactor:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a broken format string must still not leak its arguments
            message = f"{record.msg!s} {record.args!r}"
        record.msg = self._redactor.text(message)
        record.args = None
        if record.exc_info:
            record.exc_text = self._formatter.formatException(record.exc_info)
            record.exc_info = None
        if record.exc_text:
            record.exc_text = self._redactor.text(record.exc_text)
        if record.stack_info:
            record.stack_info = self._redactor.text(record.stack_info)
        return True
