"""The redactor scrubs credentials in every covered form, through nested values, log lines and tracebacks, and
cuts text leaving no piece of one."""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
from credential_pieces import leaked

from executor.redaction import REDACTED, RedactingFilter, Redactor, fold
from executor.secrets import Secret

TOKEN = 's3cr3t/t0ken+with space&"quote"é'
OTHER = "another-credential-value"


@pytest.fixture
def redactor() -> Redactor:
    return Redactor([Secret(TOKEN), Secret(OTHER)])


@pytest.mark.parametrize(
    "encoded",
    [
        pytest.param(TOKEN, id="raw"),
        pytest.param(quote(TOKEN, safe=""), id="url-quoted"),
        pytest.param(json.dumps(TOKEN)[1:-1], id="json-escaped"),
        pytest.param(base64.b64encode(TOKEN.encode()).decode(), id="base64"),
        pytest.param(base64.b64encode(TOKEN.encode()).decode().rstrip("="), id="base64-unpadded"),
    ],
)
def test_each_encoding_is_scrubbed(redactor: Redactor, encoded: str) -> None:
    assert encoded != REDACTED
    assert redactor.text(f"before {encoded} after") == f"before {REDACTED} after"


def test_every_occurrence_of_every_secret_is_scrubbed(redactor: Redactor) -> None:
    assert redactor.text(f"{OTHER}:{TOKEN} / {OTHER}") == f"{REDACTED}:{REDACTED} / {REDACTED}"


def test_a_secret_inside_a_json_document_is_scrubbed(redactor: Redactor) -> None:
    document = json.dumps({"echo": {"authorization": f"Bearer {TOKEN}"}})
    scrubbed = redactor.text(document)
    assert TOKEN not in json.loads(scrubbed)["echo"]["authorization"]
    assert json.loads(scrubbed) == {"echo": {"authorization": f"Bearer {REDACTED}"}}


def test_the_longest_form_wins_over_a_secret_it_contains() -> None:
    short, long = "credential-one", "credential-one-and-more"
    assert Redactor([Secret(short), Secret(long)]).text(f"x{long}y") == f"x{REDACTED}y"


def test_values_are_scrubbed_through_nested_structures_keys_included(redactor: Redactor) -> None:
    value = {
        "headers": {f"x-{OTHER}": [f"Bearer {TOKEN}", ("tuple", TOKEN)]},
        "status": 500,
        "ok": False,
        "ratio": 1.5,
        "missing": None,
    }
    assert redactor.value(value) == {
        "headers": {f"x-{REDACTED}": [f"Bearer {REDACTED}", ("tuple", REDACTED)]},
        "status": 500,
        "ok": False,
        "ratio": 1.5,
        "missing": None,
    }


def test_values_are_scrubbed_string_by_string_whatever_they_hold(redactor: Redactor) -> None:
    # The strings are scrubbed as one text: no match may span two of them, and a NUL inside one changes nothing.
    halves = [OTHER[:12], OTHER[12:]]
    assert redactor.value(halves) == halves
    assert redactor.value({"a\x00": f"x\x00{OTHER}", "b": [OTHER]}) == {"a\x00": f"x\x00{REDACTED}", "b": [REDACTED]}
    with_nul = Redactor([Secret("nul\x00in-the-credential")])
    assert with_nul.value(["nul", "in-the-credential", "nul\x00in-the-credential"]) == [
        "nul",
        "in-the-credential",
        REDACTED,
    ]


def test_an_empty_redactor_changes_nothing() -> None:
    empty = Redactor([])
    value = {"a": ["b", ("c", 1)], "text": "nothing to hide [REDACTED]"}
    assert empty.text("plain text") == "plain text"
    assert empty.value(value) == value
    assert not empty


def test_repr_shows_no_secret(redactor: Redactor) -> None:
    assert TOKEN not in repr(redactor)
    assert OTHER not in repr(redactor)


@pytest.fixture
def logged(redactor: Redactor) -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(RedactingFilter(redactor))
    logger = logging.getLogger(f"test-redaction-{id(stream)}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield logger, stream
    finally:
        logger.removeHandler(handler)


def test_log_filter_scrubs_message_arguments(logged: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = logged
    logger.info("calling with %s and %r", TOKEN, {"key": OTHER})
    output = stream.getvalue()
    assert TOKEN not in output and OTHER not in output
    assert output == f"INFO calling with {REDACTED} and {{'key': '{REDACTED}'}}\n"


def test_log_filter_scrubs_traceback_text(logged: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = logged

    def fail(token: str) -> None:
        raise RuntimeError(f"upstream rejected {token}")

    try:
        fail(quote(TOKEN, safe=""))
    except RuntimeError:
        logger.exception("call failed")
    output = stream.getvalue()
    assert "Traceback (most recent call last)" in output
    assert f"RuntimeError: upstream rejected {REDACTED}" in output
    assert quote(TOKEN, safe="") not in output


def test_log_filter_with_an_empty_redactor_leaves_records_alone() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(RedactingFilter(Redactor([])))
    logger = logging.getLogger("test-redaction-empty")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        logger.warning("value %s", "visible")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == "value visible\n"


@pytest.mark.parametrize("prefix", ["", "u", "us", "user:"])
@pytest.mark.parametrize("encode", [base64.b64encode, base64.urlsafe_b64encode])
def test_a_secret_inside_a_longer_base64_text_is_scrubbed_at_any_offset(
    redactor: Redactor, prefix: str, encode: Any
) -> None:
    """An echoed `Authorization: Basic base64(user:secret)` or an encoded body: the secret sits mid-stream."""
    encoded = encode(f"{prefix}{OTHER}:and more".encode()).decode()
    scrubbed = redactor.text(f"Basic {encoded}")
    assert REDACTED in scrubbed
    # All but the few characters that mix the secret's edge bits with its neighbours' are gone.
    assert len(scrubbed) <= len(f"Basic {encoded}") - len(OTHER) * 4 // 3 + len(REDACTED) + 4


# --- transformed echoes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "encoded",
    [
        pytest.param(TOKEN.encode().hex(), id="hex"),
        pytest.param(TOKEN.encode().hex().upper(), id="hex-upper"),
        pytest.param(TOKEN.upper(), id="upper-cased"),
        pytest.param(TOKEN.lower(), id="lower-cased"),
        pytest.param(TOKEN.swapcase(), id="case-swapped"),
        pytest.param(quote(TOKEN, safe="").lower(), id="url-quoted-lower-case-escapes"),
        pytest.param(base64.b64encode(TOKEN.upper().encode()).decode(), id="base64-of-upper-cased"),
        pytest.param(base64.urlsafe_b64encode(TOKEN.encode()).decode().upper(), id="base64url-upper-cased"),
        pytest.param(quote(TOKEN), id="url-quoted-slash-kept"),
        pytest.param(quote_plus(TOKEN), id="url-quoted-plus"),
    ],
)
def test_transformed_echoes_are_scrubbed(redactor: Redactor, encoded: str) -> None:
    assert redactor.text(f"before {encoded} after") == f"before {REDACTED} after"


def test_case_is_ignored_also_where_lower_casing_changes_length_or_depends_on_context() -> None:
    # Capital I with dot lower-cases to two characters, capital sigma to one of two by position, sharp s
    # upper-cases to SS, long s to S.
    credential = "\u0130stanbul-\u039f\u0394\u039f\u03a3-stra\u00dfe-\u017fecret"
    redactor = Redactor([Secret(credential)])
    mixed = "istanbul-\u03bf\u03b4\u03bf\u03c3-stra\u00dfe-secret"
    for echoed in (credential, credential.upper(), credential.lower(), mixed):
        assert redactor.text(f"<{echoed}>") == f"<{REDACTED}>", echoed


def test_the_fold_is_one_character_for_one_and_context_free() -> None:
    """Positions in the folded text are positions in the text, so what is found there is replaced here."""
    for code in range(0x110000):
        char = chr(code)
        folded = fold(char)
        assert len(folded) == 1, hex(code)
        for cased in (char.upper(), char.lower()):
            if len(cased) == 1:
                assert fold(cased) == folded, hex(code)
    for text in (
        "\u0391\u03a3 \u0391\u03a3\u0391 \u03c3\u03c2",
        "\u0130I\u0131i",
        "Stra\u00dfe",
        "\u00b5\u03bc \u017fSs",
    ):
        assert fold(text) == "".join(fold(char) for char in text)


def test_overlapping_occurrences_are_all_scrubbed() -> None:
    # Replacing the first match and moving on would leave "abcdef" of the second credential.
    redactor = Redactor([Secret("0123456789"), Secret("6789abcdef")])
    assert redactor.text("x0123456789abcdefx") == f"x{REDACTED}x"


def test_adding_credentials_later_extends_the_same_redactor() -> None:
    shared = Redactor()
    assert not shared and shared.overlap == 0
    shared.add([Secret(OTHER)])
    shared.add([Secret(OTHER), Secret(TOKEN)])
    assert shared.text(f"{OTHER} {TOKEN}") == f"{REDACTED} {REDACTED}"
    assert shared.overlap >= len(TOKEN.encode().hex())


# --- cutting ----------------------------------------------------------------------------------------


def test_a_cut_anywhere_across_a_credential_leaves_no_piece_of_it(redactor: Redactor) -> None:
    for encoded in (OTHER, quote(OTHER, safe=""), base64.b64encode(OTHER.encode()).decode(), OTHER.encode().hex()):
        text = "header " + encoded + " trailer"
        for limit in range(len(text) + 1):
            cut = redactor.cut(text, limit)
            assert len(cut.text) <= limit
            assert leaked(cut.text, OTHER) == [], (encoded, limit, cut)
            assert cut.truncated == (limit < len(redactor.text(text)))


def test_a_credential_whole_before_the_cut_is_replaced_not_dropped(redactor: Redactor) -> None:
    assert redactor.cut(f"a {OTHER} ! c d e f", 14) == (f"a {REDACTED} !", True)
    # A character that could start a credential's form goes at the edge, even if it is not one.
    assert redactor.cut(f"a {OTHER} b c d e f", 14) == (f"a {REDACTED} ", True)


def test_a_text_that_is_itself_cut_is_trimmed_at_its_end(redactor: Redactor) -> None:
    # What a read limit leaves: the start of a credential, with nothing after it to recognise it by.
    read = f"body {OTHER[:12]}"
    assert redactor.cut(read, 1000, more=True) == ("body ", True)
    assert redactor.cut(read, 1000) == (read, False)


def test_the_trim_drops_only_a_possible_start_of_a_credential_and_never_a_marker(redactor: Redactor) -> None:
    assert redactor.trim("nothing to see!") == "nothing to see!"
    assert redactor.trim(f"value {OTHER[:3]}") == "value "
    assert redactor.trim(f"value {OTHER[:3].upper()}") == "value "
    assert redactor.trim(f"x {REDACTED}") == f"x {REDACTED}"


def test_a_cut_in_bytes_keeps_whole_characters(redactor: Redactor) -> None:
    text = "é" * 10 + OTHER
    cut = redactor.cut(text, 5, unit="bytes")
    assert cut == ("éé", True)
    assert redactor.cut(text, 1000, unit="bytes") == ("é" * 10 + REDACTED, False)


def test_an_empty_redactor_still_cuts() -> None:
    assert Redactor().cut("abcdef", 3) == ("abc", True)
    assert Redactor().cut("abc", 3) == ("abc", False)


def test_a_credential_that_began_inside_a_scrubbed_one_leaves_nothing_at_the_cut() -> None:
    # "6789" of the second credential is inside the first one's match; cut before its end, what shows of it
    # after the marker is its middle, which is not the start of any form.
    redactor = Redactor([Secret("0123456789"), Secret("6789abcdefghijkl")])
    assert redactor.cut("0123456789abcdefghij", 100, more=True) == (REDACTED, True)
    assert redactor.cut("0123456789abcdefghijkl!", 100) == (f"{REDACTED}!", False)
