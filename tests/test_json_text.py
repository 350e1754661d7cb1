"""The JSON every protocol reads: objects of real text only."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voxflow.transports.protocols.json_text import InvalidJson, check_text, loads_object

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(text, values, max_size=5))
def test_any_object_of_text_round_trips(obj):
    assert loads_object(json.dumps(obj)) == obj
    assert loads_object(json.dumps(obj).encode()) == obj


@given(st.dictionaries(text, values, max_size=3), st.sampled_from(["\ud800", "\udfff", "a\udc00b"]), st.booleans())
def test_a_lone_surrogate_anywhere_is_refused(obj, bad, as_key):
    obj = {**obj, **({bad: 1} if as_key else {"deep": [{"x": bad}]})}
    with pytest.raises(InvalidJson, match="surrogate"):
        loads_object(json.dumps(obj))  # ensure_ascii writes it as a \\ud800 escape
    parsed = loads_object(json.dumps(obj), strict_text=False)
    with pytest.raises(InvalidJson):
        check_text(parsed)


@pytest.mark.parametrize(
    "data", ["", "[1]", '"text"', "null", '{"a": NaN}', '{"a": Infinity}', "{", b"\xff{}", "[" * 100_000, '{"a": 1' + "0" * 5000 + "}"]
)
def test_what_is_not_a_json_object_of_text_is_refused(data):
    with pytest.raises(InvalidJson):
        loads_object(data)
