"""Canonical JSON per RFC 8785 (JCS): what audit hashes, action digests and signatures are taken over.

Objects have their keys sorted by UTF-16 code units, there is no insignificant whitespace, strings are
escaped as ECMAScript's JSON.stringify does (only ``"``, ``\\`` and control characters), numbers are
written as ECMAScript writes IEEE doubles, and the result is UTF-8. Integers must fit a double exactly
(|n| <= 2**53); NaN and infinities are refused. ``docs/audit-format.md`` freezes these rules.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

_MAX_EXACT_INT = 2**53


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
        if abs(value) > _MAX_EXACT_INT:
            raise ValueError(f"integer {value} does not fit a double exactly")
        out.append(str(value))
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
    ECMAScript form, and any key with a character at or above U+E000 (where UTF-16 order and code
    point order can disagree), sends the whole value to the exact encoder.
    """
    if isinstance(value, str) or value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if abs(value) > _MAX_EXACT_INT:
            raise ValueError(f"integer {value} does not fit a double exactly")
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


def digest(value: Any) -> str:
    return hashlib.sha256(canonical_json(value)).hexdigest()
