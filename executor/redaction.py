"""Scrub credentials out of anything the executor stores or logs: results, errors, log lines, tracebacks.

Each credential is also looked for in the encodings it commonly travels in (URL-quoted, JSON-escaped,
base64), since an echoed request or an error message rarely shows it raw. Every form is replaced by
``[REDACTED]``, longest first, so a longer form is never half-replaced through a shorter one.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, quote_plus

from executor.secrets import Secret

REDACTED = "[REDACTED]"


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


def _forms(value: str) -> set[str]:
    """The ways ``value`` can appear in text."""
    encoded = base64.b64encode(value.encode("utf-8")).decode("ascii")
    urlsafe = base64.urlsafe_b64encode(value.encode("utf-8")).decode("ascii")
    forms = _embedded_base64(value.encode("utf-8")) | {
        value,
        quote(value, safe=""),
        quote_plus(value, safe=""),
        json.dumps(value)[1:-1],
        json.dumps(value, ensure_ascii=False)[1:-1],
        encoded,
        encoded.rstrip("="),  # unpadded base64 (JWT-style, some headers)
        urlsafe,
        urlsafe.rstrip("="),
    }
    forms.discard("")
    return forms


class Redactor:
    """Replaces every known credential (and its common encodings) with ``[REDACTED]``."""

    def __init__(self, secrets: Iterable[Secret]) -> None:
        forms: set[str] = set()
        for secret in secrets:
            forms |= _forms(secret.reveal())
        # Longest first: regex alternation takes the first alternative that matches at a position.
        ordered = sorted(forms, key=lambda form: (-len(form), form))
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def __repr__(self) -> str:
        return "Redactor(...)"

    def __bool__(self) -> bool:
        return self._pattern is not None

    def text(self, s: str) -> str:
        if self._pattern is None:
            return s
        return self._pattern.sub(REDACTED, s)

    def value(self, obj: Any) -> Any:
        """``obj`` with every string in it scrubbed, dict keys included; other scalars unchanged."""
        if self._pattern is None:
            return obj
        if isinstance(obj, str):
            return self.text(obj)
        if isinstance(obj, dict):
            return {self.value(key): self.value(item) for key, item in obj.items()}
        if isinstance(obj, list):
            return [self.value(item) for item in obj]
        if isinstance(obj, tuple):
            return tuple(self.value(item) for item in obj)
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
