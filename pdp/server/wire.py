"""Naming the field behind a request protobuf refused to parse.

protobuf rejects invalid UTF-8 in string fields with a bare "Error parsing message". Agents deserve
to know which field was bad, so this walks the wire format of the failed bytes and finds it.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from pdp.v1 import pdp_pb2

# field number -> (name, "string" | nested schema)
Schema = dict[int, tuple[str, Any]]


def schema_of(descriptor: Descriptor, _memo: dict[str, Schema] | None = None) -> Schema:
    """The string and message fields of a message type, from its descriptor (so it follows the proto).

    Fields inside well-known types and map entries get no name of their own: a bad byte anywhere in
    ``action.params`` is reported as ``action.params``.
    """
    memo = {} if _memo is None else _memo
    if descriptor.full_name in memo:  # Struct -> Value -> Struct recurses
        return memo[descriptor.full_name]
    schema: Schema = {}
    memo[descriptor.full_name] = schema
    anonymous = descriptor.full_name.startswith("google.protobuf.") or descriptor.GetOptions().map_entry
    for field in descriptor.fields:
        name = "" if anonymous else field.name
        if field.type == FieldDescriptor.TYPE_STRING:
            schema[field.number] = (name, "string")
        elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type is not None:
            schema[field.number] = (name, schema_of(field.message_type, memo))
    return schema


PROPOSE_REQUEST = schema_of(pdp_pb2.ProposeRequest.DESCRIPTOR)
GET_PROPOSAL_REQUEST = schema_of(pdp_pb2.GetProposalRequest.DESCRIPTOR)

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
