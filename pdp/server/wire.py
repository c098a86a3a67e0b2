"""Naming the field behind a request protobuf refused to parse.

protobuf rejects invalid UTF-8 in string fields with a bare "Error parsing message". Agents deserve
to know which field was bad, so this walks the wire format of the failed bytes and finds it.
"""

from __future__ import annotations

from typing import Any

# field number -> (name, "string" | nested schema); schemas for Struct recurse through Value.
Schema = dict[int, tuple[str, Any]]

_VALUE: Schema = {}
_STRUCT: Schema = {1: ("", {1: ("key", "string"), 2: ("", _VALUE)})}
_LIST: Schema = {1: ("", _VALUE)}
_VALUE.update({3: ("", "string"), 5: ("", _STRUCT), 6: ("", _LIST)})
_MAP_ENTRY: Schema = {1: ("key", "string"), 2: ("value", "string")}
ACTION: Schema = {
    1: ("tool", "string"),
    2: ("operation", "string"),
    3: ("resource", "string"),
    4: ("params", _STRUCT),
    6: ("labels", _MAP_ENTRY),
}
PROPOSE_REQUEST: Schema = {
    1: ("action", ACTION),
    2: ("justification", "string"),
    3: ("idempotency_key", "string"),
    4: ("session_id", "string"),
}
GET_PROPOSAL_REQUEST: Schema = {1: ("proposal_id", "string")}

_MAX_DEPTH = 64


class _Truncated(Exception):
    pass


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _Truncated
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _walk(data: bytes, schema: Schema, path: str, depth: int) -> str | None:
    if depth > _MAX_DEPTH:
        return path or "request"
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = _varint(data, pos)
            continue
        if wire_type == 1:
            pos += 8
            continue
        if wire_type == 5:
            pos += 4
            continue
        if wire_type != 2:
            return path or "request"
        length, pos = _varint(data, pos)
        chunk = data[pos : pos + length]
        if len(chunk) != length:
            raise _Truncated
        pos += length
        if number not in schema:
            continue
        name, kind = schema[number]
        here = ".".join(p for p in (path, name) if p)
        if kind == "string":
            try:
                chunk.decode("utf-8")
            except UnicodeDecodeError:
                return here or path
        else:
            found = _walk(chunk, kind, here, depth + 1)
            if found is not None:
                return found
    return None


def bad_field(data: bytes, schema: Schema) -> str:
    """The dotted path of the first field that cannot be decoded, or "request" if it is not UTF-8 related."""
    try:
        return _walk(data, schema, "", 0) or "request"
    except _Truncated:
        return "request"
