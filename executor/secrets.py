"""Credentials: referenced from config (an environment variable or a file), never written inline.

A resolved credential travels as :class:`Secret`, whose ``repr`` and ``str`` hide it, so it cannot
leak through a log line or a traceback by accident; ``reveal()`` is the one way to read it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, model_validator

# Shorter values would be scrubbed out of ordinary text everywhere ("admin", "1234"), and are not
# credentials worth the name.
MIN_SECRET_LENGTH = 8


class SecretError(Exception):
    """A credential reference cannot be resolved; the message names it (never its value)."""


class Secret:
    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class SecretRef(BaseModel):
    """``{env: NAME}`` or ``{file: PATH}``; a plain string where a credential belongs is a config error."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    env: str | None = None
    file: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> SecretRef:
        if (self.env is None) == (self.file is None):
            raise ValueError("a credential is given as exactly one of {env: NAME} or {file: PATH}")
        return self

    def describe(self) -> str:
        return f"environment variable {self.env}" if self.env is not None else f"file {self.file}"

    def resolve(self, base: Path | None = None, environ: Mapping[str, str] | None = None) -> Secret:
        """Read the value: the variable, or the file (relative to ``base``) without its trailing newline."""
        if self.env is not None:
            value = (os.environ if environ is None else environ).get(self.env)
            if value is None:
                raise SecretError(f"credential {self.describe()} is not set")
        else:
            assert self.file is not None
            path = Path(self.file)
            if base is not None and not path.is_absolute():
                path = base / path
            try:
                value = path.read_text(encoding="utf-8").rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as exc:
                raise SecretError(f"credential file {path} cannot be read: {exc.__class__.__name__}") from exc
        if len(value) < MIN_SECRET_LENGTH:
            raise SecretError(f"credential {self.describe()} is shorter than {MIN_SECRET_LENGTH} characters")
        return Secret(value)
