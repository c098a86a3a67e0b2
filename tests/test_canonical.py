"""Canonical JSON (RFC 8785, JCS): the bytes every audit hash, action digest and signature is taken over.

The vectors are the RFC's own (Appendix B for numbers, §3.2.2/§3.2.3 for strings and key order), so a
third-party verifier written to the RFC agrees with ours byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from decimal import Decimal
from typing import Any

import pytest

from pdp.canonical import canonical_json, digest, digest_of, loads, reference_canonical_json


def _double(bits: str) -> float:
    value: float = struct.unpack(">d", bytes.fromhex(bits))[0]
    return value


# --- numbers -------------------------------------------------------------------------------------------

NUMBERS = [
    (0.0, "0"),
    (-0.0, "0"),
    (0, "0"),
    (1e-7, "1e-7"),
    (1e21, "1e+21"),
    (333333333.3333333, "333333333.3333333"),
    (1e23, "1e+23"),
    (5e-324, "5e-324"),
    (-5e-324, "-5e-324"),
    (1.7976931348623157e308, "1.7976931348623157e+308"),
    (-1.7976931348623157e308, "-1.7976931348623157e+308"),
    (9007199254740992.0, "9007199254740992"),
    (-9007199254740992.0, "-9007199254740992"),
    (9007199254740992, "9007199254740992"),
    (-9007199254740992, "-9007199254740992"),
    (2.0**68, "295147905179352830000"),
    (0.000001, "0.000001"),
    (123e-20, "1.23e-18"),
    (1.0, "1"),
    (-1.5, "-1.5"),
    (100.0, "100"),
    (4.50, "4.5"),
    (2e-3, "0.002"),
    (1e30, "1e+30"),
    (1e-27, "1e-27"),
    (0.1, "0.1"),
    (1e20, "100000000000000000000"),
]

# RFC 8785 Appendix B: IEEE 754 bit patterns and their JCS form.
APPENDIX_B = [
    ("0000000000000000", "0"),
    ("8000000000000000", "0"),
    ("0000000000000001", "5e-324"),
    ("8000000000000001", "-5e-324"),
    ("7fefffffffffffff", "1.7976931348623157e+308"),
    ("ffefffffffffffff", "-1.7976931348623157e+308"),
    ("4340000000000000", "9007199254740992"),
    ("c340000000000000", "-9007199254740992"),
    ("4430000000000000", "295147905179352830000"),
    ("44b52d02c7e14af5", "9.999999999999997e+22"),
    ("44b52d02c7e14af6", "1e+23"),
    ("44b52d02c7e14af7", "1.0000000000000001e+23"),
    ("444b1ae4d6e2ef4e", "999999999999999700000"),
    ("444b1ae4d6e2ef4f", "999999999999999900000"),
    ("444b1ae4d6e2ef50", "1e+21"),
    ("3eb0c6f7a0b5ed8c", "9.999999999999997e-7"),
    ("3eb0c6f7a0b5ed8d", "0.000001"),
    ("41b3de4355555553", "333333333.3333332"),
    ("41b3de4355555554", "333333333.33333325"),
    ("41b3de4355555555", "333333333.3333333"),
    ("41b3de4355555556", "333333333.3333334"),
    ("41b3de4355555557", "333333333.33333343"),
    ("becbf647612f3696", "-0.0000033333333333333333"),
    ("43143ff3c1cb0959", "1424953923781206.2"),
]


@pytest.mark.parametrize(("value", "expected"), NUMBERS, ids=[e for _, e in NUMBERS])
def test_numbers_are_written_as_ecmascript_writes_them(value: float, expected: str) -> None:
    assert canonical_json(value) == expected.encode()
    assert canonical_json([value]) == f"[{expected}]".encode()


@pytest.mark.parametrize(("bits", "expected"), APPENDIX_B, ids=[b for b, _ in APPENDIX_B])
def test_rfc8785_appendix_b_number_vectors(bits: str, expected: str) -> None:
    assert canonical_json(_double(bits)) == expected.encode()


def test_the_output_parses_back_to_the_same_double() -> None:
    for bits, _ in APPENDIX_B:
        value = _double(bits)
        assert float(json.loads(canonical_json(value))) == value


@pytest.mark.parametrize(
    "value",
    [math.nan, math.inf, -math.inf, _double("7fffffffffffffff"), _double("7ff0000000000000")],
    ids=["nan", "inf", "-inf", "nan-bits", "inf-bits"],
)
def test_nan_and_infinity_are_refused(value: float) -> None:
    with pytest.raises(ValueError):
        canonical_json(value)
    with pytest.raises(ValueError):
        canonical_json({"cost": [1, value]})


@pytest.mark.parametrize(
    "value",
    [2**53 + 1, -(2**53) - 1, 2**64 + 1, -(2**68) + 3, 10**300, 2**1024, -(2**1100)],
    ids=["2^53+1", "-2^53-1", "2^64+1", "-2^68+3", "10^300", "2^1024", "-2^1100"],
)
def test_integers_no_double_equals_are_refused(value: int) -> None:
    """A double cannot hold them: writing the nearest one would silently change the number."""
    with pytest.raises(ValueError, match="does not fit a double exactly"):
        canonical_json(value)
    with pytest.raises(ValueError):
        canonical_json({"n": value})


# Integers beyond 2**53 that a double holds exactly are that double (RFC 8785 parses every number as one).
EXACT_BIG_INTEGERS = [
    (2**53 + 2, "9007199254740994"),
    (-(2**53) - 2, "-9007199254740994"),
    (10**16, "10000000000000000"),
    (2**64, "18446744073709552000"),
    (-(2**68), "-295147905179352830000"),
    (10**21, "1e+21"),
    (2**1023, "8.98846567431158e+307"),
]


@pytest.mark.parametrize(("value", "expected"), EXACT_BIG_INTEGERS, ids=[e for _, e in EXACT_BIG_INTEGERS])
def test_integers_a_double_holds_are_written_as_that_double(value: int, expected: str) -> None:
    assert canonical_json(value) == canonical_json(float(value)) == expected.encode()
    assert (
        canonical_json({"n": [value]}) == reference_canonical_json({"n": [value]}) == f'{{"n":[{expected}]}}'.encode()
    )


@pytest.mark.parametrize(
    "value",
    [1e16, float(2**53 + 2), 1e300, 1.5e308, 5e-324, -0.0, 0.1, 2.0**68, 1e21, 123456789012345680000.0],
    ids=repr,
)
def test_canonicalising_what_the_database_gives_back_is_idempotent(value: float) -> None:
    """JSONB keeps the digits a double was written with and gives integral ones back as integers; the
    canonical form of what comes back is the canonical form of what went in, or an error, never another."""
    written = canonical_json({"n": value})
    jsonb = '{"n": ' + format(Decimal(repr(value)), "f") + "}"  # PostgreSQL's numeric prints plain digits
    for read_back in (json.loads(written), json.loads(json.dumps({"n": value})), json.loads(jsonb)):
        try:
            again = canonical_json(read_back)
        except ValueError:  # e.g. 1e300 read back as a 301-digit integer: refused, not changed
            continue
        assert again == written
    assert canonical_json(loads(written)) == written  # loads always reads back what was written


def test_loads_reads_canonical_text_back_into_the_values_it_was_written_from() -> None:
    text = canonical_json(
        {"big": 1e16, "huge": 2.0**68, "small": 42, "f": 0.5, "e": 1e300, "s": "é", "l": [None, True]}
    )
    value = loads(text)
    assert value == {"big": 1e16, "huge": 2.0**68, "small": 42, "f": 0.5, "e": 1e300, "s": "é", "l": [None, True]}
    assert type(value["big"]) is float and type(value["small"]) is int
    assert canonical_json(value) == text


@pytest.mark.parametrize("text", ["NaN", "[Infinity]", "-Infinity", "1" + "0" * 400, '{"a":', "", "[1,]"])
def test_loads_refuses_what_is_not_canonical_json_of_doubles(text: str) -> None:
    with pytest.raises(ValueError):
        loads(text)


def test_integers_up_to_2_53_are_exact() -> None:
    assert canonical_json([2**53, -(2**53), 2**53 - 1, 42, -7]) == (
        b"[9007199254740992,-9007199254740992,9007199254740991,42,-7]"
    )


def test_booleans_are_literals_not_numbers() -> None:
    assert canonical_json([True, False, None, 1, 0]) == b"[true,false,null,1,0]"


# --- strings -------------------------------------------------------------------------------------------


def test_rfc8785_string_example() -> None:
    value = json.loads(r'"\u20ac$\u000F\u000aA' + "'" + r'\u0042\u0022\u005c\\\"\/"')
    assert canonical_json(value) == '"€$\\u000f\\nA\'B\\"\\\\\\\\\\"/"'.encode()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("\x00", r'"\u0000"'),
        ("\x1f", r'"\u001f"'),
        ("\x0b", r'"\u000b"'),
        ("\x0f", r'"\u000f"'),
        ("\b\t\n\f\r", r'"\b\t\n\f\r"'),
        ('"', r'"\""'),
        ("\\", r'"\\"'),
        ("/", '"/"'),
        ("\x7f", '"\x7f"'),
        ("é€😀", '"é€😀"'),
        ("\u2028\u2029", '"\u2028\u2029"'),
        ("<script>&'", '"<script>&\'"'),
    ],
    ids=["nul", "us", "vt", "si", "short-escapes", "quote", "backslash", "slash", "del", "non-ascii", "ls-ps", "html"],
)
def test_string_escaping(value: str, expected: str) -> None:
    """Only `"`, `\\` and control characters are escaped (controls without a short form as lowercase
    \\u00xx); everything else, non-ASCII included, is written as UTF-8."""
    assert canonical_json(value) == expected.encode("utf-8")


def test_lone_surrogates_are_refused() -> None:
    """A lone surrogate is not Unicode text and has no UTF-8 form."""
    with pytest.raises(ValueError):
        canonical_json("\ud800")


def test_output_is_utf8() -> None:
    encoded = canonical_json({"ö": "😀"})
    assert encoded == '{"ö":"😀"}'.encode()
    assert encoded.decode("utf-8") == '{"ö":"😀"}'


# --- objects and arrays --------------------------------------------------------------------------------


def test_rfc8785_key_order_by_utf16_code_units() -> None:
    """§3.2.3: U+1F600 (surrogates D83D DE00) sorts before U+FB33 in UTF-16, after it by code point."""
    value = {
        "\u20ac": "Euro Sign",
        "\r": "Carriage Return",
        "\ufb33": "Hebrew Letter Dalet With Dagesh",
        "1": "One",
        "\U0001f600": "Emoji: Grinning Face",
        "\u0080": "Control",
        "\u00f6": "Latin Small Letter O With Diaeresis",
    }
    encoded = canonical_json(value)
    keys = list(json.loads(encoded))
    assert keys == ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]
    assert keys != sorted(value)  # code-point order would differ
    assert (
        encoded
        == (
            '{"\\r":"Carriage Return","1":"One","\u0080":"Control","ö":"Latin Small Letter O With Diaeresis",'
            '"€":"Euro Sign","😀":"Emoji: Grinning Face","\ufb33":"Hebrew Letter Dalet With Dagesh"}'
        ).encode()
    )


def test_rfc8785_sample_document() -> None:
    """The RFC's §3.2.2 example: nested values, literals, numbers, strings, no whitespace."""
    source = (
        '{"numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],'
        r' "string": "\u20ac$\u000F\u000aA' + "'" + r'\u0042\u0022\u005c\\\"\/",' + ' "literals": [null, true, false]}'
    )
    assert (
        canonical_json(json.loads(source))
        == (
            '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
            '"string":"€$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
        ).encode()
    )


def test_nested_objects_are_sorted_and_arrays_keep_their_order() -> None:
    value: dict[str, Any] = {"b": [3, {"z": 1, "a": 2}, 1], "a": {"d": {}, "c": []}, "": 0}
    assert canonical_json(value) == b'{"":0,"a":{"c":[],"d":{}},"b":[3,{"a":2,"z":1},1]}'
    assert canonical_json((1, "x")) == b'[1,"x"]'


def test_equal_documents_give_equal_bytes_whatever_the_insertion_order() -> None:
    one = {"tool": "tickets", "params": {"count": 40, "ids": [1, 2]}, "cost": 0.5}
    two = {"cost": 0.5, "params": {"ids": [1, 2], "count": 40}, "tool": "tickets"}
    assert canonical_json(one) == canonical_json(two)
    assert digest(one) == digest(two) == hashlib.sha256(canonical_json(one)).hexdigest()
    assert digest_of(canonical_json(one)) == digest(one)
    assert digest(one) != digest({**one, "cost": 0.25})


@pytest.mark.parametrize("value", [{1: "x"}, {"a": 1, 2: "b"}, {None: 1}], ids=["int", "mixed", "none"])
def test_non_string_keys_are_refused(value: dict[Any, Any]) -> None:
    with pytest.raises(TypeError):
        canonical_json(value)


@pytest.mark.parametrize("value", [b"bytes", {1, 2}, object()], ids=["bytes", "set", "object"])
def test_values_without_a_json_form_are_refused(value: object) -> None:
    with pytest.raises(TypeError):
        canonical_json({"x": value})
