"""dumps_decoded (orjson, the relay's hot path) writes what dumps (simplejson) writes,
for every value loads can make: the body a listener gets does not depend on which."""

from __future__ import annotations

import json
from datetime import date
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from cdc_hooks import jsoncodec
from cdc_hooks.jsoncodec import dumps, dumps_decoded, dumps_rows, loads

json_numbers = st.integers() | st.decimals(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    st.none() | st.booleans() | json_numbers | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_the_same_text_as_dumps(value: object) -> None:
    decoded = loads(dumps(value))
    assert dumps_decoded(decoded) == dumps(decoded)


def test_numbers_keep_their_digits() -> None:
    decoded = loads('{"a": 12.50, "b": 1E+400, "c": -0.0, "d": 123456789012345678901234567890}')
    assert dumps_decoded(decoded) == '{"a":12.50,"b":1E+400,"c":-0.0,"d":123456789012345678901234567890}'
    assert dumps_decoded([Decimal("0.1")]) == "[0.1]"


def test_dumps_rows_is_json_and_takes_what_orjson_refuses() -> None:
    rows = [(1, 2, "k\u00e9y", True, False), (3, 4, None, False, True)]
    assert json.loads(dumps_rows(rows)) == [list(row) for row in rows]
    lone = "\udc80"  # orjson refuses a lone surrogate; the statement still gets JSON
    assert json.loads(dumps_rows([[1, lone]])) == [[1, lone]]


@given(json_values)
def test_dumps_spaced_reads_back_as_the_same_value(value: object) -> None:
    decoded = loads(dumps(value))
    assert loads(jsoncodec.dumps_spaced(decoded)) == decoded


def test_dumps_spaced_is_spaced_and_keeps_digits() -> None:
    assert jsoncodec.dumps_spaced(loads('{"a": 1E-8, "b": [0.10, "\u00e9"]}')) == \
        '{"a": 1E-8, "b": [0.10, "\u00e9"]}'
    assert jsoncodec.dumps_spaced({"n": Decimal("1E-8"), "when": date(2026, 1, 2)}) == \
        '{"n": 0.00000001, "when": "2026-01-02"}'
