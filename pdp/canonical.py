"""Canonical JSON per RFC 8785 (JCS): what audit hashes, action digests and signatures are taken over.

Objects have their keys sorted by UTF-16 code units, there is no insignificant whitespace, strings are
escaped as ECMAScript's JSON.stringify does (only ``"``, ``\\`` and control characters), numbers are
written as ECMAScript writes IEEE doubles, and the result is UTF-8. An integer is a double too: one beyond
2**53 is written as the double it equals (what RFC 8785 does after parsing it), and refused when no double
equals it; NaN and infinities are refused. ``docs/audit-format.md`` freezes these rules.

Canonicalising is idempotent across a database: PostgreSQL's JSONB gives ``1e16`` back as the integer
10000000000000000, which is written exactly as the double was. :func:`loads` reads canonical text back
into the values it was written from (such integers as doubles), so a stored canonical text can be run
without being re-serialised.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

_MAX_EXACT_INT = 2**53


def _exact_double(value: int) -> float:
    """The double equal to ``value``; ValueError when none is (Python compares int and float exactly)."""
    try:
        double = float(value)
    except OverflowError:
        double = math.inf
    if double != value:
        raise ValueError(f"integer {value} does not fit a double exactly")
    return double


def _number(value: float) -> str:
    """ECMAScript Number::toString for a finite double (RFC 8785 §3.2.2.3)."""
    if not math.isfinite(value):
        raise ValueError("canonical JSON has no NaN or infinity")
    if value == 0:
        return "0"
    if value.is_integer() and abs(value) <= _MAX_EXACT_INT:
        return str(int(value))
    sign = "-" if value < 0 else ""
    # repr gives the shortest digits that round-trip, as ECMAScript does; value = digits x 10**(n - k).
    parts = Decimal(repr(abs(value))).normalize().as_tuple()
    digits = "".join(map(str, parts.digits))
    n = int(parts.exponent) + len(digits)
    k = len(digits)
    if k <= n <= 21:
        return sign + digits + "0" * (n - k)
    if 0 < n <= 21:
        return sign + digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return sign + "0." + "0" * (-n) + digits
    e = n - 1
    exp = ("+" if e > 0 else "-") + str(abs(e))
    return sign + (digits if k == 1 else digits[0] + "." + digits[1:]) + "e" + exp


def _encode(value: Any, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(json.dumps(value, ensure_ascii=False))
    elif value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        out.append(str(value) if abs(value) <= _MAX_EXACT_INT else _number(_exact_double(value)))
    elif isinstance(value, float):
        out.append(_number(value))
    elif isinstance(value, dict):
        out.append("{")
        for i, key in enumerate(sorted(value, key=_utf16)):
            if not isinstance(key, str):
                raise TypeError(f"object keys must be strings, not {type(key).__name__}")
            if i:
                out.append(",")
            out.append(json.dumps(key, ensure_ascii=False))
            out.append(":")
            _encode(value[key], out)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _encode(item, out)
        out.append("]")
    else:
        raise TypeError(f"{type(value).__name__} has no canonical JSON form")


def _utf16(key: Any) -> bytes:
    return str(key).encode("utf-16-be")


class _NeedsExactEncoder(Exception):
    pass


def _normalised(value: Any) -> Any:
    """A copy the C ``json`` encoder writes exactly as RFC 8785 does, or _NeedsExactEncoder.

    C json differs from RFC 8785 in two places: it writes floats with Python's repr ("40.0", "1e-07")
    and sorts keys by code point. Integral floats become ints; any other float whose repr is not the
    ECMAScript form, any integer beyond 2**53 (written as a double), and any key with a character at
    or above U+E000 (where UTF-16 order and code point order can disagree), sends the whole value to
    the exact encoder.
    """
    if isinstance(value, str) or value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if abs(value) > _MAX_EXACT_INT:
            raise _NeedsExactEncoder
        return value
    if isinstance(value, float):
        if value.is_integer() and abs(value) <= _MAX_EXACT_INT:
            return int(value)
        if repr(value) != _number(value):
            raise _NeedsExactEncoder
        return value
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"object keys must be strings, not {type(key).__name__}")
            if key and max(key) >= "\ue000":
                raise _NeedsExactEncoder
            out[key] = _normalised(item)
        return out
    if isinstance(value, list | tuple):
        return [_normalised(item) for item in value]
    raise TypeError(f"{type(value).__name__} has no canonical JSON form")


def canonical_json(value: Any) -> bytes:
    try:
        fast = _normalised(value)
    except _NeedsExactEncoder:
        out: list[str] = []
        _encode(value, out)
        return "".join(out).encode("utf-8")
    return json.dumps(fast, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def reference_canonical_json(value: Any) -> bytes:
    """The reference encoder, always: for tests that the fast path agrees with it."""
    out: list[str] = []
    _encode(value, out)
    return "".join(out).encode("utf-8")


def timestamp(value: datetime) -> str:
    """The one timestamp form in hashed and signed data: UTC, microseconds, "Z" (2026-11-21T14:40:13.000000Z)."""
    if value.tzinfo is None:
        raise ValueError("naive datetime in canonical data")
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def digest_of(canonical: bytes) -> str:
    """SHA-256 (lowercase hex) of canonical JSON bytes already in hand: hash them, never re-serialise."""
    return hashlib.sha256(canonical).hexdigest()


def digest(value: Any) -> str:
    return digest_of(canonical_json(value))


def _integer(text: str) -> int | float:
    value = int(text)
    if abs(value) <= _MAX_EXACT_INT:
        return value
    double = float(text)  # the double these digits name, as any JSON reader of doubles rounds them
    if not math.isfinite(double):
        raise ValueError(f"{text[:40]}… is beyond the range of a double")
    return double


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads(text: str | bytes) -> Any:
    """Canonical JSON back into the values it was written from: ``canonical_json(loads(t)) == t`` for any
    canonical ``t``. Digits beyond 2**53 come back as the double they were written from (canonical JSON
    writes such a double with its shortest digits, e.g. 2**68 as 295147905179352830000); NaN, Infinity and
    digits beyond any double raise ValueError, as does anything that is not JSON."""
    return json.loads(text, parse_int=_integer, parse_constant=_no_constant)


def same_values(stored: Any, exact: Any) -> bool:
    """Whether a value read back from a JSON column (``stored``) says what the canonical ``exact`` says: the same
    structure and strings, numbers equal as doubles (JSONB may write 1e16 back as an integer)."""
    if isinstance(exact, bool) or isinstance(stored, bool) or exact is None or isinstance(exact, str):
        return type(stored) is type(exact) and stored == exact
    if isinstance(exact, int | float):
        return isinstance(stored, int | float) and _same_double(stored, exact)
    if isinstance(exact, dict):
        return (
            isinstance(stored, dict)
            and stored.keys() == exact.keys()
            and all(same_values(stored[key], value) for key, value in exact.items())
        )
    if isinstance(exact, list):
        return (
            isinstance(stored, list)
            and len(stored) == len(exact)
            and all(same_values(s, e) for s, e in zip(stored, exact, strict=True))
        )
    return False


def _same_double(stored: int | float, exact: int | float) -> bool:
    """The numbers name the same double: JSONB keeps the decimal digits a double was written with, and
    those digits read back as that double (-0 and 0 are one value in JSON, as in canonical JSON)."""
    try:
        value = float(stored)
    except OverflowError:
        return False
    return math.isfinite(value) and value == float(exact)
