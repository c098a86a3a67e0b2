"""The ``http`` connector: one request to exactly the URL the policy saw, with credentials injected as headers.

Config section (one per tool in the executor's config)::

    tickets:
      timeout: 10s                  # whole call, connect to last body byte (default 10s)
      max_response_bytes: 1048576   # the most body returned; the result says truncated (default 1 MiB)
      response_headers: [content-type, location, etag, retry-after]   # only these are returned (the default)
      headers:                      # sent on every request; values are always references, never inline
        Authorization: {env: TICKETS_TOKEN, template: "Bearer {}"}    # template optional, "{}" once
        X-Api-Key: {file: .pdp/demo/key}
      verify_tls: true              # default true

The request:

- URL: ``call.resource``, verbatim. It must pass the catalog's own checks again (inside the tool's prefix,
  in the catalog's one normal form) and be http or https; nothing from ``params`` is ever added to it. The
  request target on the wire is exactly the resource's path and query as written (sent raw, so the HTTP
  client cannot re-encode or normalise it), and ``Host`` is exactly its authority.
- Method: ``call.operation`` upper-cased, one of GET, HEAD, POST, PUT, PATCH, DELETE.
- Body: ``call.params`` as JSON for POST, PUT and PATCH. For GET, HEAD and DELETE the params are ignored
  (no body, no query string): the resource already says exactly what is touched.
- ``Idempotency-Key: <proposal id>`` on every request, so a retried idempotent action is recognisable.
- Redirects are never followed (one could leave the prefix); a 3xx is returned as the result.
- Environment proxies and ``.netrc`` are ignored: the executor's config is the only source of credentials.

The result is ``{"status", "headers", "body", "truncated"}``; the body is parsed JSON when the response
says JSON and arrived whole, else text. A status of 400 or more fails the call: :class:`ConnectorRejected` for
a 4xx other than 408 and 429 (the request was at fault), :class:`ConnectorError` otherwise, with the start of
the body.

Credentials are scrubbed before anything is cut: the body is read up to ``max_response_bytes`` plus the
longest form of a credential (so one straddling the limit is seen whole), scrubbed, and only then cut, to
``max_response_bytes`` or to the error snippet, by ``Redactor.cut``, which also drops any trailing fragment
of a credential at the cut. The agent chooses its request's size and so where an echo falls; a cut made
before scrubbing would leave the part of a credential in front of it unrecognised.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from executor.connectors.base import (
    Call,
    ConnectorConfigError,
    ConnectorContext,
    ConnectorError,
    ConnectorRejected,
    ConnectorTimeout,
    config_error,
)
from executor.secrets import Secret, SecretError, SecretRef
from pdp.policy.catalog import CatalogViolation, resolve
from pdp.policy.duration import DurationText, parse_duration

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
DEFAULT_RESPONSE_HEADERS = ("content-type", "location", "etag", "retry-after")
ERROR_BODY_CHARS = 500

# RFC 9110 token characters.
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# Headers the connector or the HTTP layer own; a configured value would silently fight them.
_RESERVED_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "content-type", "idempotency-key"}
)


class HeaderCredential(SecretRef):
    """A credential reference plus how it is written into its header (``template``, "{}" marks the value)."""

    template: str = "{}"

    @field_validator("template")
    @classmethod
    def _one_placeholder(cls, template: str) -> str:
        if template.count("{}") != 1:
            raise ValueError('template must contain "{}" exactly once (where the credential goes)')
        if "\r" in template or "\n" in template:
            raise ValueError("template must not contain line breaks")
        return template


class HttpSection(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    timeout: DurationText = "10s"
    max_response_bytes: int = Field(default=1024 * 1024, gt=0)
    response_headers: tuple[str, ...] = DEFAULT_RESPONSE_HEADERS
    headers: dict[str, HeaderCredential] = Field(default_factory=dict)
    verify_tls: bool = True

    @field_validator("response_headers", mode="before")
    @classmethod
    def _list(cls, value: Any) -> Any:
        # YAML gives a list; strict mode would only take a tuple.
        return tuple(value) if isinstance(value, list) else value

    @field_validator("response_headers")
    @classmethod
    def _lowercase(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        for name in names:
            if not _HEADER_NAME.match(name):
                raise ValueError(f"{name!r} is not a header name")
        return tuple(name.lower() for name in names)

    @field_validator("headers", mode="before")
    @classmethod
    def _referenced(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            for name, item in value.items():
                if not isinstance(item, Mapping):
                    raise ValueError(
                        f"header {name}: credentials are referenced, never inline: use {{env: NAME}} or {{file: PATH}}"
                    )
                if not isinstance(name, str) or not _HEADER_NAME.match(name):
                    raise ValueError(f"{name!r} is not a header name")
                if name.lower() in _RESERVED_HEADERS:
                    raise ValueError(f"header {name} is set by the connector and cannot be configured")
        return value


def is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


class HttpConnector:
    """Thread-safe: the state is fixed after construction and ``httpx.Client`` may be shared by threads."""

    def __init__(self, section: Mapping[str, Any], context: ConnectorContext) -> None:
        self._tool = context.tool.name
        self._redactor = context.redactor
        try:
            config = HttpSection.model_validate(dict(section))
        except ValidationError as exc:
            raise config_error(self._tool, exc) from None
        self._timeout_text = config.timeout
        self._timeout = parse_duration(config.timeout).total_seconds()
        self._max_bytes = config.max_response_bytes
        self._response_headers = config.response_headers
        self._headers: dict[str, Secret] = {}
        self._secrets: list[Secret] = []
        for name, ref in config.headers.items():
            try:
                raw = ref.resolve(context.base_dir, context.environ)
            except SecretError as exc:
                raise ConnectorConfigError(f"tool {self._tool}: headers.{name}: {exc}") from None
            if any(c in raw.reveal() for c in "\r\n\x00"):
                raise ConnectorConfigError(f"tool {self._tool}: headers.{name}: the credential contains a line break")
            full = Secret(ref.template.replace("{}", raw.reveal()))
            self._headers[name] = full
            self._secrets.extend(s for s in (raw, full) if s not in self._secrets)
        self._redactor.add(self._secrets)
        self._client = httpx.Client(
            verify=config.verify_tls,
            follow_redirects=False,
            trust_env=False,
            timeout=httpx.Timeout(self._timeout),
        )

    def __repr__(self) -> str:
        return f"HttpConnector(tool={self._tool!r}, headers={sorted(self._headers)!r})"

    def secrets(self) -> list[Secret]:
        return list(self._secrets)

    def close(self) -> None:
        self._client.close()

    def execute(self, call: Call) -> dict[str, Any]:
        url, target, method = self._target(call)
        deadline = time.monotonic() + self._timeout
        headers = {name: secret.reveal() for name, secret in self._headers.items()}
        headers["Idempotency-Key"] = call.proposal_id
        content: bytes | None = None
        if method in BODY_METHODS:
            try:
                content = json.dumps(dict(call.params), ensure_ascii=False, allow_nan=False).encode("utf-8")
            except (TypeError, ValueError) as exc:
                raise ConnectorRejected(f"{self._tool}: params are not JSON: {exc}") from None
            headers["Content-Type"] = "application/json"
        try:
            # httpcore sends the "target" extension as the request target byte for byte.
            extensions = {"target": target}
            with self._client.stream(method, url, headers=headers, content=content, extensions=extensions) as response:
                # Past the limit by the longest credential form: one straddling the limit is scrubbed, not cut.
                body, more = self._read(response, deadline, self._max_bytes + self._redactor.overlap)
        except httpx.TimeoutException:
            raise ConnectorTimeout(f"{self._tool}: no response within {self._timeout_text}") from None
        except httpx.HTTPError as exc:
            # The exception's own text can quote the URL or request; its class and the host say enough.
            raise ConnectorError(f"{self._tool}: {exc.__class__.__name__} talking to {url.host}") from None
        content_type = response.headers.get("content-type", "")
        text = body.decode("utf-8", errors="replace")
        if response.status_code >= 400:
            snippet = self._redactor.cut(text, ERROR_BODY_CHARS, more=more).text
            message = f"HTTP {response.status_code}: {snippet}" if snippet else f"HTTP {response.status_code}"
            # A 4xx refuses this request; 408, 429 and 5xx say the target is struggling (the breaker counts those).
            if response.status_code < 500 and response.status_code not in (408, 429):
                raise ConnectorRejected(message)
            raise ConnectorError(message)
        kept, truncated = self._redactor.cut(text, self._max_bytes, more=more, unit="bytes")
        parsed: Any = kept
        if not truncated and kept and is_json(content_type):
            try:
                parsed = json.loads(kept)
            except ValueError:  # not JSON, or a scrubbed credential broke it
                parsed = kept
        return {
            "status": response.status_code,
            "headers": {name: response.headers[name] for name in self._response_headers if name in response.headers},
            "body": parsed,
            "truncated": truncated,
        }

    def _target(self, call: Call) -> tuple[httpx.URL, bytes, str]:
        """The URL, the request target and the method, refused unless they are exactly what the catalog allowed."""
        checked = resolve({call.tool.name: call.tool}, call.tool.name, call.operation, call.resource)
        if isinstance(checked, CatalogViolation):
            raise ConnectorRejected(f"{self._tool}: {checked.message}")
        method = call.operation.upper()
        if method not in METHODS:
            raise ConnectorRejected(
                f"{self._tool}: operation {call.operation!r} is not an HTTP method this connector sends"
            )
        try:
            url = httpx.URL(call.resource)
        except httpx.InvalidURL:
            raise ConnectorRejected(f"{self._tool}: resource {call.resource!r} is not a valid URL") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ConnectorRejected(f"{self._tool}: resource {call.resource!r} is not an http(s) URL")
        # In the normal form an http(s) resource is "scheme://authority/path[?query]": the authority is what
        # the Host header carries and the rest is the request target, both as written. httpx must read the
        # same split; if it would send anything else, nothing is sent.
        authority, _, path = call.resource.partition("://")[2].partition("/")
        target = ("/" + path).encode("ascii")
        if url.netloc != authority.encode("ascii") or url.raw_path != target:
            raise ConnectorRejected(
                f"{self._tool}: resource {call.resource!r} would not be sent as written "
                f"(host {url.netloc!r}, target {url.raw_path!r})"
            )
        # A prefix without a trailing slash ("http://api.example") would also admit "http://api.example.evil";
        # the parsed origin must be the prefix's own.
        try:
            prefix = httpx.URL(call.tool.resource_prefix)
        except httpx.InvalidURL:
            prefix = None
        if (
            prefix is not None
            and prefix.host
            and (url.scheme, url.host, url.port) != (prefix.scheme, prefix.host, prefix.port)
        ):
            raise ConnectorRejected(f"{self._tool}: resource {call.resource!r} is not on the host of the tool's prefix")
        return url, target, method

    def _read(self, response: httpx.Response, deadline: float, limit: int) -> tuple[bytes, bool]:
        """At most ``limit`` bytes of the body, and whether there was more; gives up at the deadline."""
        if time.monotonic() > deadline:
            raise httpx.ReadTimeout("deadline passed")
        chunks: list[bytes] = []
        size = 0
        # No chunk size: httpx would buffer up to it, and the deadline is checked only between chunks.
        for chunk in response.iter_bytes():
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                return b"".join(chunks)[:limit], True
            # A server trickling bytes would reset the per-read timeout forever; the deadline is per call.
            if time.monotonic() > deadline:
                raise httpx.ReadTimeout("deadline passed")
        return b"".join(chunks), False
