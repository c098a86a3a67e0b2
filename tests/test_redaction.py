"""The redactor scrubs credentials in every common encoding, through nested values, log lines and tracebacks."""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest

from executor.redaction import REDACTED, RedactingFilter, Redactor
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
