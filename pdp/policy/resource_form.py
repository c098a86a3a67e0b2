"""The one normal form a resource must already be in, so the string a policy reads is the one a target routes on.

A policy compares strings; clients, proxies and servers parse URLs. Every way of writing one thing twice
(``%64`` for ``d``, ``%7b`` for ``%7B``, ``%2F`` for ``/``), every part a client drops or a router skips
(``#…``, ``?…``) and every character a reader cannot see (controls, bidi controls, zero-width and no-break
spaces) would let an agent name, under a spelling no rule expects, a resource a rule denies. So there is
exactly one accepted spelling of each resource, and anything else is refused with a sentence saying how to
write it; nothing is normalised on the agent's behalf (the audit log records what the agent sent).

The form (RFC 3986 §6.2.2, made strict):

- ASCII only; raw, a character is an unreserved one (``A-Z a-z 0-9 - . _ ~``), a sub-delimiter other than
  ``;`` (``! $ & ' ( ) * + , =``), ``:``, ``@`` or ``/``; ``[`` and ``]`` only in the authority.
- ``%`` always starts ``%XX`` with two uppercase hex digits. Only what cannot be written raw may be encoded:
  ``" < > [ ] ^ ` { | }`` and UTF-8 text. Never an unreserved character, a sub-delimiter, ``:``, ``@``,
  ``/``, ``\\``, ``%``, ``;``, ``?``, ``#``, whitespace or a control. In a query, ``%26`` (``&``), ``%3D``
  (``=``) and ``%2B`` (``+``) are also accepted: there the raw characters are separators, so the encoded ones
  mean something else.
- Encoded octets of 0x80 and above are valid UTF-8 that decodes to NFC text without whitespace, controls,
  format characters (bidi controls, zero-width characters, byte-order marks) or separators.
- No fragment; a query only where the tool's catalog entry says ``query: true``, then non-empty, with no
  empty ``&`` parameters.
- No ``.`` or ``..`` segments, no empty segments (``//``), no ``;`` path parameters, no ``user@``.
- With an authority (``scheme://…``): a lowercase scheme and no percent-encoding in the authority; for http
  and https also a lowercase host that is a DNS name, a dotted-quad IPv4 address or a compressed IPv6
  address, a port written only when it is not the scheme's default, and a path that starts with ``/``.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Written raw and never encoded: a decoding target would read the encoded form as the raw one.
_RAW = _UNRESERVED | frozenset("!$&'()*+,=:@/")
# Printable ASCII that only an encoded form may carry.
_ENCODED_ONLY = frozenset('"<>[]^`{|}')
# In a query these raw characters separate parameters, names and values (and "+" is a space to form
# parsers), so the encoded forms carry data and mean something else.
_QUERY_ENCODED = frozenset("&=+")
_DEFAULT_PORTS = {"http": "80", "https": "443"}
_SCHEME = re.compile(r"[a-z][a-z0-9+.\-]*")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9\-]{0,61}[a-z0-9])?")
# What inet_aton would read as an IPv4 address: all-numeric (decimal, octal, hex) parts.
_NUMERIC_LABEL = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)")
_DECIMAL_OCTET = re.compile(r"(?:0|[1-9][0-9]{0,2})")
_PORT = re.compile(r"[1-9][0-9]{0,4}")
# Fast paths for the common case; the slower checks below give the reason.
_ALL_RAW = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,=:@/]*")
_AUTHORITY_RAW = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,=:\[\]]*")
_DOT_SEGMENT = re.compile(r"(?:^|/)\.{1,2}(?:/|$)")


def problem(resource: str, *, query: bool) -> str | None:
    """Why ``resource`` is not in the normal form, phrased to follow "resource '…'", or None.

    ``query``: whether the tool takes a query string (its catalog entry sets ``query: true``).
    """
    if not resource.isascii():
        position, char = next((i, c) for i, c in enumerate(resource) if not c.isascii())
        encoded = "".join(f"%{octet:02X}" for octet in char.encode("utf-8"))
        return (
            f"contains the raw non-ASCII character U+{ord(char):04X} at position {position}: write non-ASCII "
            f"text percent-encoded as UTF-8 ({encoded}); whitespace, control and format characters are "
            "refused in any form"
        )
    if re.search(r"[\x00-\x20\x7f\\]", resource):
        return "contains whitespace, control characters or backslashes"
    if "#" in resource:
        return "has a fragment (#…): a client never sends it, so it cannot name what is touched; leave it out"
    head, separator, text = resource.partition("?")
    if separator and not query:
        return (
            "has a query (?…), and this tool takes none (its catalog entry does not set query: true); "
            "name the resource by its path alone"
        )
    authority, path = _split(head)
    if authority is not None:
        found = _authority_problem(head, authority, path)
        if found:
            return found
    found = _path_problem(path)
    if found:
        return found
    if separator:
        return _query_problem(text)
    return None


def _split(head: str) -> tuple[str | None, str]:
    """The authority (None without ``scheme://``) and what follows it; without an authority, all is path."""
    scheme, separator, rest = head.partition("://")
    if not separator or not _SCHEME.fullmatch(scheme.lower()):
        return None, head
    authority, slash, path = rest.partition("/")
    return authority, slash + path


def _authority_problem(head: str, authority: str, path: str) -> str | None:
    scheme = head.partition("://")[0]
    if scheme != scheme.lower():
        return f"writes its scheme {scheme!r} in uppercase; write {scheme.lower()!r}"
    if not authority:
        return "contains an empty path segment (//)"  # an empty authority: "scheme:///…"
    if "@" in authority:
        return "names a user in its authority (user@host)"
    if "%" in authority:
        return "percent-encodes part of its authority (host and port are written plainly)"
    if not _AUTHORITY_RAW.fullmatch(authority):
        return _raw_problem(next(c for c in authority if c not in _RAW and c not in "[]"))
    if scheme in _DEFAULT_PORTS:
        return _http_authority_problem(scheme, authority, path)
    return None


def _http_authority_problem(scheme: str, authority: str, path: str) -> str | None:
    """One spelling of an http(s) origin: what a client connects to and sends as ``Host``."""
    port: str | None
    if authority.startswith("["):
        literal, _, after = authority[1:].partition("]")
        if after and not after.startswith(":"):
            return f"has an authority {authority!r} that is not [IPv6]:port"
        port = after[1:] if after else None
        try:
            canonical = ipaddress.IPv6Address(literal).compressed
        except ValueError:
            return f"has a host [{literal}] that is not an IPv6 address"
        if literal != canonical:
            return f"writes the IPv6 host [{literal}] uncompressed or in uppercase; write [{canonical}]"
    else:
        host, colon, port_text = authority.partition(":")
        port = port_text if colon else None
        found = _host_problem(host)
        if found:
            return found
    if port is not None:
        if not _PORT.fullmatch(port) or int(port) > 65535:
            return f"has a port {port!r} that is not a number from 1 to 65535 without leading zeros"
        if port == _DEFAULT_PORTS[scheme]:
            return f"writes {scheme}'s default port :{port}; leave it out"
    if not path.startswith("/"):
        return f"has no path after its host; write {scheme}://{authority}/"
    return None


def _host_problem(host: str) -> str | None:
    if host != host.lower():
        return f"writes its host {host!r} with uppercase letters; write {host.lower()!r}"
    labels = host.split(".")
    if all(_NUMERIC_LABEL.fullmatch(label) for label in labels):
        if len(labels) == 4 and all(_DECIMAL_OCTET.fullmatch(part) and int(part) <= 255 for part in labels):
            return None
        return f"has a numeric host {host!r} that is not a dotted-quad IPv4 address (write a.b.c.d in decimal)"
    if not all(_LABEL.fullmatch(label) for label in labels):
        return f"has a host {host!r} that is not a DNS name (letters, digits and hyphens, no empty label)"
    return None


def _path_problem(path: str) -> str | None:
    if _DOT_SEGMENT.search(path):
        return "contains dot segments"
    if "//" in path:
        return "contains an empty path segment (//)"
    if ";" in path:
        return "contains path parameters (;)"
    return _characters_problem(path, encoded_ok=frozenset())


def _query_problem(text: str) -> str | None:
    if not text:
        return "has an empty query (a ? with nothing after it); leave the ? out"
    if "?" in text:
        return "has a second ? in its query"
    if ";" in text:
        return "has a ; in its query; separate parameters with &"
    if "" in text.split("&"):
        return "has an empty query parameter (&& or an & at either end)"
    if re.search(r"(?:^|/)\.{1,2}(?:/|$|&)", text):
        return "contains dot segments"
    return _characters_problem(text, encoded_ok=_QUERY_ENCODED)


def _characters_problem(text: str, *, encoded_ok: frozenset[str]) -> str | None:
    """Raw characters and percent-encodings of a path or query, and the text they decode to."""
    if _ALL_RAW.fullmatch(text):
        return None
    octets = bytearray()
    i = 0
    while i < len(text):
        char = text[i]
        if char != "%":
            if char not in _RAW:
                return _raw_problem(char)
            octets.append(ord(char))
            i += 1
            continue
        digits = text[i + 1 : i + 3]
        if not re.fullmatch(r"[0-9A-Fa-f]{2}", digits):
            return f"contains a % that does not start a percent-encoded octet (%XX) at position {i}"
        if digits != digits.upper():
            return f"writes %{digits} with lowercase hex digits; write %{digits.upper()}"
        octet = int(digits, 16)
        if octet < 0x80:
            found = _encoded_ascii_problem(f"%{digits}", chr(octet), encoded_ok)
            if found:
                return found
        octets.append(octet)
        i += 3
    try:
        decoded = octets.decode("utf-8")
    except UnicodeDecodeError:
        return "percent-encodes octets that are not UTF-8 text"
    for char in decoded:
        if not char.isascii() and unicodedata.category(char)[0] in "CZ":
            name = unicodedata.name(char, "unnamed")
            return (
                f"percent-encodes U+{ord(char):04X} ({name}), a whitespace, control, format or separator "
                "character, which a reader cannot see"
            )
    if not unicodedata.is_normalized("NFC", decoded):
        return "percent-encodes text that is not in Unicode NFC; encode the composed form (é is %C3%A9)"
    return None


def _encoded_ascii_problem(encoding: str, char: str, encoded_ok: frozenset[str]) -> str | None:
    if char in _UNRESERVED:
        return f"percent-encodes {char!r} as {encoding}; write {char!r} itself"
    if char == "%":
        return f"is percent-encoded twice ({encoding} encodes '%')"
    if char in "/\\;?#":
        return f"percent-encodes {char!r} as {encoding}, never accepted: a target may decode it into a delimiter"
    if ord(char) <= 0x20 or char == "\x7f":
        return f"percent-encodes whitespace or a control character ({encoding})"
    if char in encoded_ok or char in _ENCODED_ONLY:
        return None
    return f"percent-encodes {char!r} as {encoding}; write {char!r} itself"


def _raw_problem(char: str) -> str:
    if char == ";":
        return "contains path parameters (;)"
    return f"contains {char!r}, which is written percent-encoded: %{ord(char):02X}"
