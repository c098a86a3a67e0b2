"""Properties of the two text guards: the CLI's escapes (pdp/cli/terminal.py) and the page's markers
(pdp/admin/reveal.py), and of identity keys (pdp/identity/names.py). Pure functions; no I/O."""

from __future__ import annotations

import json
import unicodedata

from hypothesis import given
from hypothesis import strategies as st

from pdp.admin.reveal import reveal
from pdp.cli.terminal import layout_safe, visible
from pdp.identity.names import check_id, identity_key

UNSAFE = ("Cc", "Cf", "Zl", "Zp", "Cs", "Cn")
# Any code point, surrogates included (they reach Python from a database as lone surrogates at worst).
TEXT = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF))


def unsafe(text: str, keep: str = "") -> list[str]:
    return [c for c in text if c not in keep and unicodedata.category(c) in UNSAFE]


@given(TEXT)
def test_visible_leaves_nothing_a_terminal_acts_on(text: str) -> None:
    assert unsafe(visible(text)) == []
    assert unsafe(layout_safe(text), keep="\n\t") == []
    assert visible(text).count("\n") == 0


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | TEXT, lambda inner: st.lists(inner) | st.dictionaries(TEXT, inner)
    )
)
def test_escaped_json_is_still_json_with_the_same_value(value: object) -> None:
    for indent in (None, 2):
        text = json.dumps(value, ensure_ascii=False, indent=indent)
        guarded = layout_safe(text)
        assert unsafe(guarded, keep="\n\t") == []
        assert json.loads(guarded) == json.loads(text)


@given(TEXT)
def test_reveal_marks_every_hidden_character(text: str) -> None:
    shown = reveal(text)
    assert unsafe(shown, keep="\n\t") == []
    assert shown.count("⟦U+") - text.count("⟦U+") == len(unsafe(text, keep="\n\t"))


@given(TEXT)
def test_identity_keys_are_stable_and_canonical_names_are_their_own_key(text: str) -> None:
    key = identity_key(text)
    assert identity_key(key) == key
    try:
        check_id("id", text)
    except Exception:
        return
    assert key == text
