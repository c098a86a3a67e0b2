"""The fast canonical-JSON path (C json on normalised data) must agree byte for byte with the exact encoder."""

from __future__ import annotations

import random
from typing import Any

from pdp.canonical import canonical_json, reference_canonical_json

# Values where C json and RFC 8785 disagree, or where key order by code point and UTF-16 differ.
TRICKY_FLOATS = [1e21, 1e16, 2.0**68, 123e-20, 1e-7, 0.000001, 5e-324, 0.1, 0.5, 100.0, -0.0, 1e300, 40.0]
CHARS = 'abZ_é\n"\\\u001f\u20ac\ufb33\U0001f600'


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    pick = rng.random()
    if depth > 3 or pick < 0.35:
        kind = rng.choice(["int", "float", "tricky", "str", "bool", "null"])
        if kind == "int":
            return rng.randint(-(10**9), 10**9)
        if kind == "float":
            return rng.uniform(-1e6, 1e6)
        if kind == "tricky":
            return rng.choice(TRICKY_FLOATS)
        if kind == "str":
            return "".join(rng.choice(CHARS) for _ in range(rng.randint(0, 6)))
        if kind == "bool":
            return rng.random() < 0.5
        return None
    if pick < 0.65:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {
        "".join(rng.choice(CHARS) for _ in range(rng.randint(1, 4))): _random_value(rng, depth + 1)
        for _ in range(rng.randint(0, 5))
    }


def test_fast_path_matches_the_exact_encoder() -> None:
    rng = random.Random(20261121)
    for _ in range(5000):
        value = _random_value(rng)
        assert canonical_json(value) == reference_canonical_json(value), value


def test_keys_that_sort_differently_in_utf16_take_the_exact_path() -> None:
    value = {"\ufb33": 1, "\U0001f600": 2, "\u20ac": 3}
    assert canonical_json(value) == '{"\u20ac":3,"\U0001f600":2,"\ufb33":1}'.encode()


def test_integral_floats_are_written_as_integers() -> None:
    assert (
        canonical_json({"cost": 40.0, "zero": 0.0, "big": 2.0**68})
        == b'{"big":295147905179352830000,"cost":40,"zero":0}'
    )
