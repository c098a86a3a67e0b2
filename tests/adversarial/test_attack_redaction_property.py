"""Issue 10, finding 1, as a property of the redactor: for any credential, any text that embeds it in any of
the covered forms (case-changed and hex included) among arbitrary text, and any cut, what comes out holds no
8 characters of any form of the credential.

The cuts are the ones the executor makes: a limit on the scrubbed text (in characters or UTF-8 bytes), and
a text that is itself only the start of a longer one (a read limit), with its end anywhere.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from urllib.parse import quote, quote_plus

from credential_pieces import leaked, pieces
from hypothesis import assume, example, given, note, settings
from hypothesis import strategies as st

from executor.redaction import REDACTED, Redactor
from executor.secrets import Secret

# Letters whose case mapping is irregular (length-changing, context-dependent, or folding onto another letter),
# and a few ordinary non-ASCII ones.
UNICODE = (
    "\u00e9\u00c9\u00df\u1e9e\u0130\u0131\u03a3\u03c3\u03c2\u017f\u00b5\u039c\u03bc\u212a\u03a9\u03c9"
    "\u00f1\u00c5\u4e2d\u6587\U0001f642\u20ac"
)
PRINTABLE = "".join(chr(c) for c in range(32, 127))


def _inside(value: str, draw: st.DrawFn) -> str:
    """``value`` in the middle of a longer base64 text, starting 0 to 5 bytes in."""
    before = draw(st.binary(max_size=5))
    after = draw(st.binary(max_size=5))
    encode = draw(st.sampled_from([base64.b64encode, base64.urlsafe_b64encode]))
    return encode(before + value.encode() + after).decode()


def json_escaping(chars: str, upper: bool = False) -> Callable[[str], str]:
    """JSON as Go (<>&) or .NET (also '+`") write it, or with every punctuation character as \\u00XX."""

    def encode(value: str) -> str:
        out = []
        for char in value:
            if char in chars:
                code = f"{ord(char):04x}"
                out.append("\\u" + (code.upper() if upper else code))
            else:
                out.append(json.dumps(char)[1:-1])
        return "".join(out)

    return encode


PUNCTUATION = "".join(c for c in map(chr, range(0x21, 0x7F)) if not c.isalnum())

ENCODINGS: dict[str, Callable[[str], str]] = {
    "raw": lambda v: v,
    "quote": lambda v: quote(v, safe=""),
    "quote-slash": quote,
    "quote_plus": quote_plus,
    "json": lambda v: json.dumps(v)[1:-1],
    "json-unicode": lambda v: json.dumps(v, ensure_ascii=False)[1:-1],
    "json-go": json_escaping("<>&"),
    "json-dotnet": json_escaping("<>&'+`\"", upper=True),
    "json-punctuation": json_escaping(PUNCTUATION),
    "base64": lambda v: base64.b64encode(v.encode()).decode(),
    "base64-unpadded": lambda v: base64.b64encode(v.encode()).decode().rstrip("="),
    "base64url": lambda v: base64.urlsafe_b64encode(v.encode()).decode(),
    "base64url-unpadded": lambda v: base64.urlsafe_b64encode(v.encode()).decode().rstrip("="),
    "hex": lambda v: v.encode().hex(),
    "hex-upper": lambda v: v.encode().hex().upper(),
}


@st.composite
def echoed(draw: st.DrawFn, credential: str) -> str:
    """One occurrence of the credential as a target might echo it: maybe case-changed before it was encoded,
    encoded, and maybe case-changed again as text (wholly, or letter by letter)."""
    value = draw(st.sampled_from([credential, credential.upper(), credential.lower()]))
    encoding = draw(st.sampled_from([*ENCODINGS, "inside-base64"]))
    text = _inside(value, draw) if encoding == "inside-base64" else ENCODINGS[encoding](value)
    case = draw(st.sampled_from(["as-is", "upper", "lower", "mixed"]))
    if case == "upper":
        return text.upper()
    if case == "lower":
        return text.lower()
    if case == "mixed":
        flips = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
        return "".join(c.swapcase() if flip and c.isascii() else c for c, flip in zip(text, flips, strict=True))
    return text


credentials = st.text(alphabet=st.sampled_from(PRINTABLE + UNICODE), min_size=8, max_size=40)
fillers = st.text(alphabet=st.sampled_from(PRINTABLE + UNICODE + "\n\t"), max_size=40)


@st.composite
def bodies(draw: st.DrawFn) -> tuple[list[str], str]:
    """Two credentials, the second starting with the end of the first (so their echoes can overlap), and a text
    embedding them 1 to 3 times, alone or joined where they overlap, among filler that holds no piece of either."""
    credential = draw(credentials)
    partner = credential[len(credential) // 2 :] + draw(st.text(alphabet=st.sampled_from(PRINTABLE), min_size=8))
    both = [credential, partner]
    # The marker must not itself look like a credential, or every redaction would "leak" it.
    assume(not any(leaked(REDACTED, secret) for secret in both))
    joined = credential + partner[len(credential) - len(credential) // 2 :]
    occurrences = draw(st.lists(st.sampled_from([credential, partner, joined]).flatmap(echoed), min_size=1, max_size=3))
    between = draw(st.lists(fillers, min_size=len(occurrences) + 1, max_size=len(occurrences) + 1))
    for filler in between:
        assume(REDACTED not in filler and not any(leaked(filler, secret) for secret in both))
    text = between[0] + "".join(
        occurrence + filler for occurrence, filler in zip(occurrences, between[1:], strict=True)
    )
    return both, text


def assert_no_piece(output: str, secrets: list[str]) -> None:
    # A piece across a marker is filler on one side and the marker on the other: nothing of a credential.
    for segment in output.split(REDACTED):
        for secret in secrets:
            assert leaked(segment, secret) == [], (segment, secret)


SEEN = (
    ["tok-WhSFx0Ykq2aTkx9d1PD1gQ_4Dl9pnWzr", "1PD1gQ_4Dl9pnWzr-and-more"],
    '{"Authorization": "Bearer tok-WhSFx0Ykq2aTkx9d1PD1gQ_4Dl9pnWzr"}',
)


@settings(max_examples=400, deadline=None)
@given(case=bodies(), cut=st.floats(0, 1.1), edge=st.floats(0, 1), in_bytes=st.booleans())
@example(case=SEEN, cut=0.9, edge=1.0, in_bytes=False)  # the echo of the issue, cut 10 characters from its end
def test_no_piece_of_a_credential_survives_scrubbing_and_any_cut(
    case: tuple[list[str], str], cut: float, edge: float, in_bytes: bool
) -> None:
    secrets, text = case
    note(repr(case))
    redactor = Redactor([Secret(secret) for secret in secrets] + [Secret(f"Bearer {secrets[0]}")])
    limit = int(cut * (len(text.encode()) if in_bytes else len(text)))
    read = text[: int(edge * len(text))]  # what a read limit left of it
    for given_text, more in ((text, False), (read, len(read) < len(text))):
        output, _ = redactor.cut(given_text, limit, more=more, unit="bytes" if in_bytes else "chars")
        assert (len(output.encode()) if in_bytes else len(output)) <= limit
        assert_no_piece(output, secrets)
    assert_no_piece(redactor.text(text), secrets)
    assert all(pieces(secret) for secret in secrets)  # the check had something to look for
