"""MatchIndex finds exactly the matches deepmatch holds for (pure logic, no database)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any as AnyValue

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc_hooks.jsoncodec import JsonNumber
from cdc_hooks.match import Any, Contains, Endswith, Is, Like, Startswith, deepmatch
from cdc_hooks.match_index import MatchIndex

# Few fields and few values, so that random matches and events often meet.
FIELDS = st.sampled_from(["a", "b", "c"])
TEXTS = st.sampled_from(["", "n", "n1", "n12", "1n", "x", "xn", "N1", "é", "\ud800"])
SCALARS = (st.none() | st.booleans() | TEXTS
           | st.sampled_from([0, 1, -1, 12, 1.0, -0.0, 0.5, float("nan"), float("inf"),
                              Decimal("1.00"), Decimal("0E-10"), Decimal("NaN"),
                              JsonNumber("1e0"), JsonNumber("12.0"), JsonNumber("-0")]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=2)
                      | st.dictionaries(FIELDS, inner, max_size=2), max_leaves=4)
MATCHERS = (st.builds(Is, VALUES) | st.builds(Startswith, TEXTS) | st.builds(Endswith, TEXTS)
            | st.builds(Contains, TEXTS) | st.builds(Like, st.sampled_from(["^n", "1$", "x|N"]))
            | st.just(Any()))
# Rules as the relay holds them (matchers, nested objects) and as Python may give them
# (plain values).
RULES = st.recursive(MATCHERS | SCALARS | st.lists(SCALARS, max_size=2),
                     lambda inner: st.dictionaries(FIELDS, inner, max_size=3), max_leaves=6
                     ).filter(lambda r: isinstance(r, dict))
EVENTS = st.dictionaries(FIELDS, VALUES, max_size=3)


def expected(matches: list[dict[str, AnyValue]], data: dict[str, AnyValue]) -> list[int]:
    return [i for i, rules in enumerate(matches) if deepmatch(rules, data)]


@settings(max_examples=1500, deadline=None)
@given(st.lists(RULES, max_size=8), st.lists(EVENTS, min_size=1, max_size=4))
def test_index_finds_what_deepmatch_finds(matches, events):
    index = MatchIndex(enumerate(matches))
    for data in events:
        assert index.matching(data) == expected(matches, data)


@pytest.mark.parametrize(("rule", "value"), [
    (Is(1), 1.0), (Is(1), Decimal("1.00")), (Is(1), JsonNumber("1e0")), (Is(0), -0.0),
    (Is(0), JsonNumber("-0")), (Is(1.5), Decimal("1.50")), (Is(None), None), (Is(True), True),
    (Is("n1"), "n1"), (Startswith(""), ""), (Startswith("n1"), "n12"), (Endswith("12"), "n12"),
    (Endswith(""), "x"), (Is([1, 2]), (1.0, 2)), (Is({"k": 1}), {"k": 1.0}),
])
def test_equal_values_are_found(rule, value):
    assert MatchIndex([("l", {"f": rule})]).matching({"f": value}) == ["l"]


@pytest.mark.parametrize(("rule", "value"), [
    (Is(1), True), (Is(True), 1), (Is(0), False), (Is("1"), 1), (Is(1), "1"), (Is(None), "null"),
    (Is(float("nan")), float("nan")), (Is(Decimal("NaN")), Decimal("NaN")),
    (Startswith("n"), 1), (Startswith(""), None), (Endswith("1"), ["n1"]), (Is("n1"), "N1"),
])
def test_unequal_values_are_not_found(rule, value):
    assert MatchIndex([("l", {"f": rule})]).matching({"f": value}) == []


def test_a_missing_field_matches_only_any():
    index = MatchIndex([("any", {"f": Any()}), ("null", {"f": Is(None)}), ("all", {}),
                        ("prefix", {"f": Startswith("")})])
    assert index.matching({}) == ["any", "all"]
    assert index.matching({"f": None}) == ["any", "null", "all"]


def test_every_rule_must_hold():
    index = MatchIndex([("both", {"name": "n1", "region": Is("eu")}),
                        ("name", {"name": "n1", "other": Any()})])
    assert index.matching({"name": "n1", "region": "eu"}) == ["both", "name"]
    assert index.matching({"name": "n1", "region": "us"}) == ["name"]
    assert index.matching({"region": "eu"}) == []


def test_nested_rules_need_objects_along_the_way():
    index = MatchIndex([("city", {"p": {"city": "NYC"}}), ("object", {"p": {}}),
                        ("any", {"p": {"x": Any()}})])
    assert index.matching({"p": {"city": "NYC"}}) == ["city", "object", "any"]
    assert index.matching({"p": {}}) == ["object", "any"]
    assert index.matching({"p": "NYC"}) == []
    assert index.matching({"p": None}) == []


def test_unindexed_rules_are_evaluated():
    index = MatchIndex([("like", {"name": Like("^n[0-9]$")}), ("contains", {"name": Contains("2")}),
                        ("list", {"tags": ["a"]})])
    assert index.matching({"name": "n2", "tags": ("a",)}) == ["like", "contains", "list"]
    assert index.matching({"name": "x"}) == []


def test_many_affixes_of_several_lengths():
    index = MatchIndex([(i, {"f": Startswith("n" + "1" * i)}) for i in range(5)]
                       + [(10 + i, {"f": Endswith("1" * i + "z")}) for i in range(3)])
    assert index.matching({"f": "n11"}) == [0, 1, 2]
    assert index.matching({"f": "n11z"}) == [0, 1, 2, 10, 11, 12]
    assert index.matching({"f": "z"}) == [10]


def test_results_keep_the_order_given():
    index = MatchIndex([(3, {"a": Like("x")}), (1, {"a": "x"}), (2, {}), (0, {"a": Startswith("")})])
    assert index.matching({"a": "x"}) == [3, 1, 2, 0]
    assert index.items == [3, 1, 2, 0]
