"""Matchers, deepmatch, their JSON form and the --match option (pure logic, no database)."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc_hooks import jsoncodec
from cdc_hooks.errors import MatchError
from cdc_hooks.match import (
    Any,
    Contains,
    Endswith,
    Is,
    Like,
    Startswith,
    deepmatch,
    match_options_to_json,
    parse_match_option,
    rules_from_json,
    rules_from_python,
    rules_to_json,
)

# Values a matcher may meet in event data: whatever JSON decodes to.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.decimals(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)
OTHER_VALUES = [None, 0, 1, 1.5, Decimal("2.50"), True, False, [], ["Joe"], {}, {"name": "Joe"},
                b"Joe", ("J",)]
ALL_MATCHERS = [Any(), Is("Joe"), Is(1), Startswith("J"), Endswith("e"), Contains("o"),
                Like("^J.e$")]


# The seed's examples ---------------------------------------------------------

def test_name_joe() -> None:
    assert deepmatch({"name": "Joe"}, {"name": "Joe", "address": "NYC"})
    assert deepmatch({"name": Is("Joe")}, {"name": "Joe"})
    assert not deepmatch({"name": "Joe"}, {"name": "Joey"})
    assert not deepmatch({"name": "Joe"}, {"address": "NYC"})


def test_startswith_j() -> None:
    rules = {"name": Startswith("J")}
    assert deepmatch(rules, {"name": "Joe"})
    assert deepmatch(rules, {"name": "Jane"})
    assert not deepmatch(rules, {"name": "joe"})
    assert not deepmatch(rules, {"name": "Bob"})


def test_empty_rules_match_everything() -> None:
    assert deepmatch({}, {})
    assert deepmatch({}, {"name": "anyone"})


def test_any_matches_even_a_missing_field() -> None:
    assert deepmatch({"name": Any()}, {})
    assert deepmatch({"name": Any()}, {"name": None})
    assert deepmatch({"name": Any(), "age": 3}, {"age": 3})


@pytest.mark.parametrize("matcher", [Is("x"), Startswith(""), Endswith(""), Contains(""),
                                     Like("")])
def test_other_matchers_fail_on_a_missing_field(matcher: object) -> None:
    assert not deepmatch({"name": matcher}, {"other": "x"})


def test_endswith_contains() -> None:
    assert Endswith("son")("Jackson")
    assert not Endswith("son")("Jacksonville")
    assert Contains("ack")("Jackson")
    assert not Contains("ACK")("Jackson")


@pytest.mark.parametrize(("pattern", "value"), [
    (1, "1"), ("1", 1), (True, 1), (1, True), (False, 0), (0, False), (None, 0), (None, ""),
    ([1], ["1"]), ({"a": 1}, {"a": "1"}), ({"a": 1}, {"a": 1, "b": 2}), ([1, 2], [2, 1]),
])
def test_is_is_strict(pattern: object, value: object) -> None:
    assert not Is(pattern)(value)


@pytest.mark.parametrize(("pattern", "value"), [
    (1, 1), ("1", "1"), (True, True), (None, None), (1, Decimal("1.0")), (Decimal("0.1"), 0.1),
    ([1, "a"], [1, "a"]), ({"a": [True]}, {"a": [True]}),
])
def test_is_equal(pattern: object, value: object) -> None:
    assert Is(pattern)(value)


def test_nested_dicts_match_json_columns() -> None:
    rules = rules_from_json({"name": {"$startswith": "J"}, "profile": {"city": "NYC"}})
    assert deepmatch(rules, {"name": "Joe", "profile": {"city": "NYC", "zip": "10001"}})
    assert not deepmatch(rules, {"name": "Joe", "profile": {"city": "LA"}})
    assert not deepmatch(rules, {"name": "Joe", "profile": "NYC"})
    assert not deepmatch(rules, {"name": "Joe", "profile": None})
    assert not deepmatch(rules, {"name": "Joe"})
    deeper = rules_from_json({"a": {"b": {"c": {"$like": "^x+$"}}}})
    assert deepmatch(deeper, {"a": {"b": {"c": "xxx"}}})
    assert not deepmatch(deeper, {"a": {"b": {"c": "xy"}}})


def test_like_is_a_search_not_a_full_match() -> None:
    assert Like("oe")("Joe")
    assert Like("o")("Joe")
    assert Like("^J")("Joe")
    assert not Like("^oe")("Joe")
    assert Like("J.e$")("Hey Joe")
    assert Like("")("")


def test_like_runs_in_linear_time_on_a_catastrophic_pattern() -> None:
    # Python's re takes forever here; RE2 answers at once (pytest-timeout guards).
    assert not Like("(a+)+$")("a" * 100_000 + "!")
    assert not Like("(x+x+)+y")("x" * 50_000)
    assert Like("(a|aa)+b")("a" * 100_000 + "b")


@pytest.mark.parametrize("pattern", ["(", "[a-", "(a)\\1", "(?=a)", "\ud800"])
def test_like_rejects_bad_or_unsupported_patterns(pattern: str) -> None:
    with pytest.raises(MatchError, match="like pattern"):
        Like(pattern)


@pytest.mark.parametrize("cls", [Startswith, Endswith, Contains, Like])
@pytest.mark.parametrize("pattern", [None, 1, ["J"], {"a": 1}, True])
def test_string_matchers_need_a_string_pattern(cls: type, pattern: object) -> None:
    with pytest.raises(MatchError):
        cls(pattern)


# Other value types ------------------------------------------------------------

@pytest.mark.parametrize("matcher", ALL_MATCHERS)
@pytest.mark.parametrize("value", OTHER_VALUES)
def test_matchers_never_raise_on_other_types(matcher: object, value: object) -> None:
    result = matcher(value)  # type: ignore[operator]
    assert isinstance(result, bool)
    if isinstance(matcher, Startswith | Endswith | Contains | Like):
        assert result is False  # string matchers match strings only


def is_text(value: object) -> bool:
    return isinstance(value, str)


def is_number(value: object) -> bool:
    return isinstance(value, int | float | Decimal) and not isinstance(value, bool)


# What each of ALL_MATCHERS must answer, written plainly (Like: Python's re on the same pattern).
REFERENCE = [
    lambda v: True,
    lambda v: is_text(v) and v == "Joe",
    lambda v: is_number(v) and Decimal(str(v)) == 1,
    lambda v: is_text(v) and v.startswith("J"),
    lambda v: is_text(v) and v.endswith("e"),
    lambda v: is_text(v) and "o" in v,
    lambda v: is_text(v) and re.fullmatch("J.e", v) is not None and not "\ud800" <= v[1] <= "\udfff",
]


@given(json_values)
def test_matchers_agree_with_a_plain_reference(value: object) -> None:
    assert [matcher(value) for matcher in ALL_MATCHERS] == [check(value) for check in REFERENCE]
    assert deepmatch({"a": {"b": "c"}}, {"a": value}) == (
        isinstance(value, dict) and is_text(value.get("b")) and value["b"] == "c")
    assert deepmatch({"a": {"b": "c"}, "d": Like("x")}, {"a": value, "d": value}) is False  # dict and str


def test_like_on_text_that_is_not_valid_unicode_does_not_match() -> None:
    assert Like("a")("\ud800a") is False


# JSON form --------------------------------------------------------------------

def test_json_form() -> None:
    raw = {
        "name": {"$startswith": "J"}, "tail": {"$endswith": "e"}, "mid": {"$contains": "o"},
        "re": {"$like": "^J"}, "any": {"$any": None}, "age": 30, "exact": {"$is": "x"},
        "obj": {"$is": {"city": "NYC"}}, "profile": {"city": "NYC", "zip": {"$like": "^1"}},
        "tags": ["a", "b"], "none": None,
    }
    rules = rules_from_json(raw)
    assert rules["name"] == Startswith("J")
    assert rules["tail"] == Endswith("e")
    assert rules["mid"] == Contains("o")
    assert rules["re"] == Like("^J")
    assert rules["any"] == Any()
    assert rules["age"] == Is(30)
    assert rules["exact"] == Is("x")
    assert rules["obj"] == Is({"city": "NYC"})
    assert rules["profile"] == {"city": Is("NYC"), "zip": Like("^1")}
    assert rules["tags"] == Is(["a", "b"])
    assert rules["none"] == Is(None)
    back = rules_to_json(rules)
    assert back == {**raw, "exact": "x"}  # {"$is": plain} comes back as the plain value
    assert rules_from_json(back) == rules


def test_is_with_an_object_keeps_its_matcher_form() -> None:
    # A plain object would read back as a nested match: {"$is": {...}} must stay.
    rules = {"profile": Is({"city": "NYC"})}
    assert rules_to_json(rules) == {"profile": {"$is": {"city": "NYC"}}}
    assert deepmatch(rules, {"profile": {"city": "NYC"}})
    assert not deepmatch(rules, {"profile": {"city": "NYC", "zip": "1"}})


def test_rules_from_python_normalises_plain_values() -> None:
    rules = rules_from_python({"name": "Joe", "n": Startswith("J"), "p": {"c": 1}})
    assert rules == {"name": Is("Joe"), "n": Startswith("J"), "p": {"c": Is(1)}}
    with pytest.raises(MatchError, match="JSON"):
        rules_from_python({"when": object()})


@pytest.mark.parametrize(("raw", "message"), [
    ([], "must be an object"),
    ("name", "must be an object"),
    ({"": 1}, "expected a field name"),
    ({"$like": "x"}, "expected a field name"),
    ({"name": {"$like": "x", "other": 1}}, "exactly one \\$ key"),
    ({"name": {"$like": "x", "$is": "y"}}, "exactly one \\$ key"),
    ({"name": {"$regex": "x"}}, 'unknown operator "regex"'),
    ({"name": {"$any": 1}}, "any takes no value"),
    ({"name": {"$like": "("}}, 'match field "name"'),
    ({"p": {"city": {"$startswith": 5}}}, 'match field "p.city"'),
])
def test_json_form_errors_name_the_field(raw: object, message: str) -> None:
    with pytest.raises(MatchError, match=message):
        rules_from_json(raw)


json_form = st.recursive(
    json_values.filter(lambda v: not isinstance(v, dict)) | st.sampled_from([
        {"$any": None}, {"$startswith": "J"}, {"$endswith": "e"}, {"$contains": ""},
        {"$like": "^a|b$"}, {"$is": {"a": 1}}, {"$is": {"$like": "x"}},
    ]),
    lambda inner: st.dictionaries(st.text(min_size=1, max_size=5).filter(
        lambda k: not k.startswith("$")), inner, max_size=4),
    max_leaves=10,
)


@given(st.dictionaries(st.text(min_size=1, max_size=5).filter(lambda k: not k.startswith("$")),
                       json_form, max_size=5))
def test_json_round_trip(raw: dict[str, object]) -> None:
    rules = rules_from_json(raw)
    again = rules_to_json(rules)
    assert canonical(rules_to_json(rules_from_json(again))) == canonical(again)
    # Through JSON text, as listeners are stored: numbers come back as Decimal.
    stored = jsoncodec.loads(jsoncodec.dumps(again))
    assert canonical(rules_to_json(rules_from_json(stored))) == canonical(again)


def canonical(value: object) -> object:
    """A form compared strictly: True is not 1, 1.0 is 1 (JSON numbers have no type)."""
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        return (type(value).__name__, value)
    return ("number", Decimal(str(value)).normalize())


@given(json_values)
def test_rules_from_json_parses_or_raises_match_error(raw: object) -> None:
    try:
        rules = rules_from_json(raw)
    except MatchError as exc:
        assert str(exc).startswith("match"), str(exc)  # names the match (and the field, below)
        return
    assert rules_from_json(rules_to_json(rules)) == rules  # written back, it reads the same
    assert isinstance(deepmatch(rules, {}), bool)


@given(st.dictionaries(st.text(max_size=3), st.dictionaries(
    st.sampled_from(["$any", "$is", "$like", "$startswith", "$x", "$", "a"]), json_values,
    max_size=2), max_size=3))
def test_matcher_objects_parse_or_raise_match_error(raw: dict[str, object]) -> None:
    try:
        rules_from_json(raw)
    except MatchError as exc:  # the refusal names the first field refused on its own
        refused = [field for field in raw if refuses({field: raw[field]})]
        assert refused and str(exc).startswith(f'match field "{refused[0]}"'), (str(exc), refused)
        return
    assert not any(refuses({field: rule}) for field, rule in raw.items())


def refuses(raw: dict[str, object]) -> bool:
    try:
        rules_from_json(raw)
    except MatchError:
        return True
    return False


# --match option ---------------------------------------------------------------

@pytest.mark.parametrize(("option", "path", "rule"), [
    ("name=Joe", ["name"], "Joe"),
    ("name=", ["name"], ""),
    ("name=startswith:J", ["name"], {"$startswith": "J"}),
    ("name=endswith:e", ["name"], {"$endswith": "e"}),
    ("name=contains:o", ["name"], {"$contains": "o"}),
    ("name=like:^J.*e$", ["name"], {"$like": "^J.*e$"}),
    ("name=is:like:x", ["name"], {"$is": "like:x"}),
    ("name=any:", ["name"], {"$any": None}),
    ("url=http://x/y", ["url"], "http://x/y"),  # not an operator: the plain string
    ("name=is:regex:^J", ["name"], {"$is": "regex:^J"}),
    ("at=10:30", ["at"], "10:30"),  # no word before the colon: text
    ("name=a.b:c", ["name"], "a.b:c"),
    ("name=:x", ["name"], ":x"),
    ("expr=a=b", ["expr"], "a=b"),
    ("age:=30", ["age"], {"$is": 30}),
    ("price:=1.10", ["price"], {"$is": Decimal("1.10")}),
    ("flag:=true", ["flag"], {"$is": True}),
    ("gone:=null", ["gone"], {"$is": None}),
    ("tags:=[1, \"a\"]", ["tags"], {"$is": [1, "a"]}),
    ("note:=\"a=b\"", ["note"], {"$is": "a=b"}),
    ("profile.city=NYC", ["profile", "city"], "NYC"),
    ("a.b.c:=1", ["a", "b", "c"], {"$is": 1}),
])
def test_parse_match_option(option: str, path: list[str], rule: object) -> None:
    assert parse_match_option(option) == (path, rule)


@pytest.mark.parametrize(("option", "message"), [
    ("name", "expected FIELD=VALUE"),
    ("", "expected FIELD=VALUE"),
    ("=Joe", "empty field name"),
    ("a..b=1", "empty field name"),
    ("a.=1", "empty field name"),
    ("age:=thirty", "not JSON"),
    ("age:=", "not JSON"),
    ("p:={\"city\": \"NYC\"}", "FIELD.SUBFIELD"),
    ("name=any:x", "any takes no value"),
    # A word before the colon that is no operator would match the text, silently.
    ("name=regex:^J", r'unknown operator "regex" \(did you mean "like"\? operators: any, is, '
                      r"startswith, endswith, contains, like; to match the text itself: "
                      r"name=is:regex:\^J\)"),
    ("name=prefix:J", 'did you mean "startswith"'),
    ("name=eq:Joe", 'unknown operator "eq" .*did you mean "is"'),
    ("name=sounds_like:x", r'unknown operator "sounds_like" \(operators: '),
    ("name=startwith:J", 'did you mean "startswith"'),
    ("name=StartsWith:J", 'did you mean "startswith"'),
    ("link=mailto:joe@x", r"link=is:mailto:joe@x\)"),  # a scheme without //: is: says text
])
def test_parse_match_option_errors(option: str, message: str) -> None:
    with pytest.raises(MatchError, match=message):
        parse_match_option(option)


def test_match_options_combine() -> None:
    combined = match_options_to_json(
        ["name=startswith:J", "profile.city=NYC", "profile.zip:=10001", "age:=30"])
    assert combined == {"name": {"$startswith": "J"}, "age": {"$is": 30},
                        "profile": {"city": "NYC", "zip": {"$is": 10001}}}
    assert deepmatch(rules_from_json(combined), {
        "name": "Joe", "age": 30, "profile": {"city": "NYC", "zip": 10001}})
    assert match_options_to_json([]) == {}


@pytest.mark.parametrize(("options", "message"), [
    (["a=1", "a=2"], "matched twice"),
    (["a=1", "a.b=2"], "already matched as a value"),
    (["a=startswith:x", "a.b=2"], "already matched as a value"),
    (["a.b=1", "a.b=2"], "matched twice"),
    (["name=like:("], "does not compile"),
])
def test_match_options_conflicts(options: list[str], message: str) -> None:
    with pytest.raises(MatchError, match=message):
        match_options_to_json(options)


@given(st.text())
def test_parse_match_option_fuzz(option: str) -> None:
    try:
        path, rule = parse_match_option(option)
    except MatchError as exc:
        assert str(exc).startswith(f"--match {option!r}: "), str(exc)  # names the option
        return
    assert option.startswith(".".join(path)) and all(path)  # the field is the option's own
    assert jsoncodec.loads(jsoncodec.dumps(rule)) == rule  # the rule is JSON, stored as such


@given(st.lists(st.one_of(
    st.text(max_size=12),
    st.builds(lambda f, op, v: f"{f}={op}{v}",
              st.sampled_from(["a", "a.b", "b", ""]),
              st.sampled_from(["", "like:", "any:", "is:", "startswith:", "x:"]),
              st.text(max_size=6)),
    st.builds(lambda f, v: f"{f}:={v}", st.sampled_from(["a", "a.b", "c"]),
              st.sampled_from(["1", "null", "[", "{}", "\"s\"", "tru", "1e999", "[1,{}]"])),
), max_size=4))
def test_match_options_to_json_fuzz(options: list[str]) -> None:
    try:
        match = match_options_to_json(options)
    except MatchError as exc:  # names the option refused, or the match as a whole
        assert any(str(exc).startswith(f"--match {option!r}: ") for option in options) or \
            str(exc).startswith("match"), str(exc)
        return
    for option in options:  # each option's field is in the match, as its own path
        node: object = match
        for part in parse_match_option(option)[0]:
            assert isinstance(node, dict) and part in node, (option, match)
            node = node[part]
