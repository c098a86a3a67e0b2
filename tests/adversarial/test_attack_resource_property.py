"""Property: whatever the catalog admits reaches the target byte for byte and routes where its string says.

An agent controls every byte of a resource. For generated resources (valid and hostile characters, raw and
percent-encoded in either case, dot segments, separators, invisible Unicode, queries for a tool that takes
them), anything ``resolve`` admits must

(a) be sent by the real http connector as the request target exactly as written, to a raw socket target that
    records the request line and Host header as they arrived; and
(b) be routed by a decoding target (percent-decode, then remove dot segments, RFC 3986 §5.2.4) to the path
    the plain string says: decoding changes no segment boundary, removes no dot segment, reveals no invisible
    character, and each decoded segment has exactly one accepted spelling (the admitted one), so no two
    admitted strings reach the same path.

Before the fix ``…/protecte%64``, ``…/x%2F%2Fy`` and ``…/x%C2%A0`` were admitted, and (b) fails on them.
"""

from __future__ import annotations

import socketserver
import threading
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from executor.connectors.base import Call, ConnectorContext
from executor.connectors.http import HttpConnector
from pdp.policy.catalog import Kind, Tool, resolve

# Written raw in a path segment, never encoded (RFC 3986 unreserved, sub-delimiters but ";", ":" and "@").
RAW = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,=:@")
ENCODED_ASCII = '"<>[]^`{|}'
TEXT = ["é", "ß", "Ω", "中", "😀", "Å"]  # NFC, visible
HOSTILE_TEXT = ["\u0085", "\u00a0", "\u200b", "\u202e", "\u2028", "\ufeff", "\u3000", "e\u0301", "\u0000", "\t"]
SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@dataclass
class RawTarget:
    """A TCP server that records each request line and Host header as the bytes it received, and the path a
    decoding router would serve: percent-decoded as UTF-8, then dot segments removed."""

    lines: list[bytes] = field(default_factory=list)
    hosts: list[bytes] = field(default_factory=list)
    routed: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0


def remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4, as written there."""
    source, out = path, ""
    while source:
        if source.startswith("../"):
            source = source[3:]
        elif source.startswith("./"):
            source = source[2:]
        elif source.startswith("/./"):
            source = "/" + source[3:]
        elif source == "/.":
            source = "/"
        elif source.startswith("/../"):
            source = "/" + source[4:]
            out = out[: out.rfind("/")] if "/" in out else ""
        elif source == "/..":
            source = "/"
            out = out[: out.rfind("/")] if "/" in out else ""
        elif source in (".", ".."):
            source = ""
        else:
            start = 1 if source.startswith("/") else 0
            end = source.find("/", start)
            end = len(source) if end == -1 else end
            out, source = out + source[:end], source[end:]
    return out


def route(target: bytes) -> str:
    path = target.split(b"?", 1)[0].decode("ascii", errors="replace")
    try:
        return remove_dot_segments(unquote(path, errors="strict"))
    except UnicodeDecodeError:
        return "<not UTF-8>"


@pytest.fixture(scope="module")
def raw_target() -> Iterator[RawTarget]:
    state = RawTarget()

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            line = self.rfile.readline(65537).rstrip(b"\r\n")
            host = b""
            while True:
                header = self.rfile.readline(65537)
                if header in (b"\r\n", b"\n", b""):
                    break
                name, _, value = header.partition(b":")
                if name.strip().lower() == b"host":
                    host = value.strip()
            target = line.split(b" ")[1] if line.count(b" ") == 2 else b""
            with state.lock:
                state.lines.append(line)
                state.hosts.append(host)
                state.routed.append(route(target))
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n")
            self.wfile.write(b"Connection: close\r\n\r\n{}")

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def _tool(port: int, query: bool) -> Tool:
    prefix = f"http://127.0.0.1:{port}/api/"
    return Tool(name="web", type="http", resource_prefix=prefix, operations={"GET": Kind.READ}, query=query)


@pytest.fixture(scope="module")
def connectors(raw_target: RawTarget, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[bool, HttpConnector]]:
    base = tmp_path_factory.mktemp("connector")
    made = {
        query: HttpConnector({"timeout": "5s"}, ConnectorContext(_tool(raw_target.port, query), base, {}))
        for query in (False, True)
    }
    try:
        yield made
    finally:
        for connector in made.values():
            connector.close()


def percent(char: str) -> str:
    return "".join(f"%{octet:02X}" for octet in char.encode("utf-8"))


def canonical_segment(decoded: str) -> str:
    """The one accepted spelling of a decoded path segment (written from the rule, not from the code)."""
    return "".join(char if char in RAW else percent(char) for char in decoded)


def _encodings(char: str) -> st.SearchStrategy[str]:
    upper = percent(char)
    return st.sampled_from([char, upper, upper.lower(), upper.replace("%", "%25", 1)])


# Pieces an attacker combines: canonical ones and every hostile spelling we know of.
_PIECE = st.one_of(
    st.sampled_from(sorted(RAW)),
    st.sampled_from(["protected", "a", "..", ".", "/", "//", ";", "?", "#", "&", "=", "%", "%2", "\\", " ", "+"]),
    st.sampled_from([*ENCODED_ASCII, *TEXT, *HOSTILE_TEXT, "/", ".", "d", ";", "?", "#", "%", "&", "="]).flatmap(
        _encodings
    ),
    st.integers(0, 255).map(lambda octet: f"%{octet:02X}"),
    st.integers(0x80, 0xFF).map(lambda octet: f"%{octet:02x}"),
)
HOSTILE_TAILS = st.lists(_PIECE, min_size=1, max_size=12).map("".join)

# Canonical pieces only: a path of non-empty segments that are not dot segments, and a query of name=value pairs.
_CANONICAL_CHAR = st.one_of(st.sampled_from(sorted(RAW)), st.sampled_from([*ENCODED_ASCII, *TEXT]).map(percent))
_SEGMENT = st.lists(_CANONICAL_CHAR, min_size=1, max_size=6).map("".join).filter(lambda s: s not in (".", ".."))
_QUERY_CHAR = st.one_of(
    st.sampled_from(sorted(RAW - {"&", "="})),  # those two separate the pairs below
    st.sampled_from([*ENCODED_ASCII, *TEXT, "&", "=", "+"]).map(percent),
)
_PAIR = st.tuples(
    st.lists(_QUERY_CHAR, min_size=1, max_size=5).map("".join),
    st.lists(_QUERY_CHAR, min_size=0, max_size=5).map("".join),
).map("=".join)
CANONICAL_TAILS = st.tuples(
    st.lists(_SEGMENT, min_size=1, max_size=4).map("/".join),
    st.booleans(),
    st.one_of(st.none(), st.lists(_PAIR, min_size=1, max_size=3).map("&".join)),
).map(lambda t: t[0] + ("/" if t[1] else "") + ("" if t[2] is None else "?" + t[2]))


def _check_admitted(resource: str, query: bool, target: RawTarget, connectors: dict[bool, HttpConnector]) -> None:
    origin = f"http://127.0.0.1:{target.port}"
    sent = resource[len(origin) :].encode("ascii")  # admitted means ASCII
    with target.lock:
        before = len(target.lines)
    result = connectors[query].execute(
        Call(proposal_id="p", tool=_tool(target.port, query), operation="GET", resource=resource, params={})
    )
    assert result["status"] == 200
    with target.lock:
        line, host, routed = target.lines[before], target.hosts[before], target.routed[before]
    # (a) byte for byte on the wire
    assert line == b"GET " + sent + b" HTTP/1.1"
    assert host == f"127.0.0.1:{target.port}".encode()
    # (b) a decoding router serves the path the string says
    path = sent.split(b"?", 1)[0].decode("ascii")
    decoded = unquote(path, errors="strict")
    assert routed == decoded  # no dot segment appeared or vanished in decoding
    segments = path.split("/")
    assert decoded.split("/") == [unquote(s, errors="strict") for s in segments]  # no encoded "/"
    assert [canonical_segment(unquote(s)) for s in segments] == segments  # one spelling per segment
    assert unicodedata.is_normalized("NFC", decoded)
    visible = unquote(sent.decode("ascii"), errors="strict")
    hidden = [c for c in visible if c.isspace() or unicodedata.category(c)[0] in "CZ"]
    assert hidden == [], resource


@SETTINGS
@given(tail=HOSTILE_TAILS, query=st.booleans())
@example(tail="protecte%64", query=False)
@example(tail="x%2F%2Fy", query=False)
@example(tail="x%C2%A0", query=False)
@example(tail="x%3by", query=True)
@example(tail="x?q=%2e%2e", query=True)
def test_what_the_catalog_admits_is_sent_as_written_and_routed_as_written(
    raw_target: RawTarget, connectors: dict[bool, HttpConnector], tail: str, query: bool
) -> None:
    tool = _tool(raw_target.port, query)
    resource = tool.resource_prefix + tail
    if isinstance(resolve({"web": tool}, "web", "GET", resource), Kind):
        _check_admitted(resource, query, raw_target, connectors)


@SETTINGS
@given(tail=CANONICAL_TAILS)
def test_a_resource_in_the_normal_form_is_admitted_and_routed_as_written(
    raw_target: RawTarget, connectors: dict[bool, HttpConnector], tail: str
) -> None:
    tool = _tool(raw_target.port, query=True)
    resource = tool.resource_prefix + tail
    assert resolve({"web": tool}, "web", "GET", resource) is Kind.READ, resource
    _check_admitted(resource, True, raw_target, connectors)
    without = resolve({"web": _tool(raw_target.port, query=False)}, "web", "GET", resource)
    assert ("?" in resource) == (not isinstance(without, Kind))


def test_the_target_is_real(raw_target: RawTarget, connectors: dict[bool, HttpConnector], tmp_path: Path) -> None:
    """The oracle itself: the raw target sees what a plain HTTP client sends, and routes like a decoding server."""
    assert route(b"/api/a%2Fb/../c%64") == "/api/a/cd"
    tool = _tool(raw_target.port, False)
    _check_admitted(tool.resource_prefix + "caf%C3%A9/%7Bid%7D", False, raw_target, connectors)
