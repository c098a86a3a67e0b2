"""Log lines: one JSON object per line (or plain text), carrying the proposal, agent, tool and trace they are about.

Fields come from the record (``log.info(..., extra={"proposal_id": ...})``) or, failing that, from the
request being handled: :func:`context` binds ids to the current task or thread (a contextvar), and the
trace id is the current OpenTelemetry span's. So every line emitted while a proposal is being handled names
it, including lines from code that knows nothing about proposals (a database error, a connector bug).

A JSON line: ``{"ts", "level", "logger", "msg", "proposal_id"?, "agent_id"?, "tool"?, "trace_id"?, "span_id"?,
"exc"?}``. ``json.dumps`` escapes newlines, so a line is always one object, whatever an agent put in a message.
"""

from __future__ import annotations

import json as jsonlib
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace

# Ids a line may carry, in the order they are written.
FIELDS = ("proposal_id", "agent_id", "tool", "trace_id", "span_id")
FORMATS = ("json", "text")

_bound: ContextVar[dict[str, str] | None] = ContextVar("pdp_log_context", default=None)


@contextmanager
def context(**fields: str) -> Iterator[dict[str, str]]:
    """Bind ``fields`` to every line logged in this context; the yielded dict takes more as they become known.

    Nested contexts add to the outer one. Work handed to a thread pool keeps them only if it runs in a copy of
    the context (``contextvars.copy_context().run``).
    """
    outer = _bound.get()
    bound = {**outer, **fields} if outer else dict(fields)
    token = _bound.set(bound)
    try:
        yield bound
    finally:
        _bound.reset(token)


def _stamp(record: logging.LogRecord) -> None:
    """Copy the bound ids and the current trace onto ``record``, never over what ``extra=`` set."""
    bound = _bound.get()
    if bound:
        for name, value in bound.items():
            if value and not hasattr(record, name):
                setattr(record, name, value)
    if not hasattr(record, "trace_id"):
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            record.trace_id = trace.format_trace_id(span.trace_id)
            record.span_id = trace.format_span_id(span.span_id)


class ContextFilter(logging.Filter):
    """Stamps the ids when the line is emitted (on the emitting thread), whatever formats it later."""

    def filter(self, record: logging.LogRecord) -> bool:
        _stamp(record)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        _stamp(record)
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value:
                entry[name] = str(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return jsonlib.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``ts LEVEL logger: message key=value…`` for people reading a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        _stamp(record)
        line = super().format(record)
        ids = " ".join(f"{name}={getattr(record, name)}" for name in FIELDS if getattr(record, name, None))
        return f"{line} {ids}" if ids else line


def configure(
    *,
    json: bool = True,
    level: int = logging.INFO,
    loggers: Sequence[str] = ("pdp",),
    filters: Sequence[logging.Filter] = (),
) -> logging.Handler:
    """One stderr handler on the root logger; ``loggers`` log at ``level``, everything else at WARNING.

    ``filters`` run first, in order (the executor's redaction), so nothing unscrubbed reaches the formatter.
    """
    handler = logging.StreamHandler(sys.stderr)
    for item in filters:
        handler.addFilter(item)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for name in loggers:
        logging.getLogger(name).setLevel(level)
    return handler
