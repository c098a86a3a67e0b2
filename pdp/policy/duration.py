"""Durations as policy authors write them: "90s", "30m", "1h30m", "2d"."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated

from pydantic import AfterValidator

_PART = re.compile(r"(\d+)(ms|s|m|h|d)")
MAX_SECONDS = 365 * 86400
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """Parse a Go-style duration; raise ValueError naming the bad text."""
    stripped = text.strip()
    parts = _PART.findall(stripped)
    if not stripped or "".join(n + u for n, u in parts) != stripped:
        raise ValueError(f"invalid duration {text!r}: use forms like 90s, 30m, 1h30m, 2d")
    seconds = sum(int(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"invalid duration {text!r}: must be positive")
    if seconds > MAX_SECONDS:
        raise ValueError(f"invalid duration {text!r}: at most 365d")
    return timedelta(seconds=seconds)


def _checked(text: str) -> str:
    parse_duration(text)
    return text


# A duration field in a pydantic model (policy documents, executor config): kept as written, checked on load.
DurationText = Annotated[str, AfterValidator(_checked)]
