"""durian's matching classes, deepmatch, and their JSON form.

JSON form (storage, REST API, CLI): a plain value means Is; an object with one
``$``-prefixed key is a matcher (``{"$startswith": "J"}``); any other object
is a nested match into a json column (``{"profile": {"city": "NYC"}}``).

String matchers (Startswith, Endswith, Contains, Like) match strings only: a
number, null, list or object never matches them. Like is a regular-expression
*search* run by RE2, in time linear in the input, so a subscriber's hostile
pattern cannot stall the relay.

A match is bounded (rules_from_json checks it, so every interface and the relay
do): at most MAX_DEPTH levels of JSON objects and arrays, MAX_MATCHERS field
rules and MAX_BYTES encoded. Evaluating it for every event stays cheap, and a
listing can always show it.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any as AnyValue
from typing import ClassVar

import re2

from . import jsoncodec
from .errors import MatchError


class Matcher:
    """Base of the matching classes; ``op`` is the JSON operator name."""

    op: ClassVar[str]

    def __init__(self, pattern: AnyValue = None) -> None:
        self.pattern = pattern

    def __call__(self, value: AnyValue) -> bool:
        raise NotImplementedError

    def to_json(self) -> dict[str, AnyValue]:
        return {"$" + self.op: self.pattern}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, type(self)) and type(other) is type(self) and other.pattern == self.pattern

    def __hash__(self) -> int:
        return hash((self.op, repr(self.pattern)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pattern!r})"


class Any_(Matcher):
    """Matches anything, even a field that is not sent at all."""

    op = "any"

    def __init__(self, pattern: None = None) -> None:
        super().__init__(None)

    def __call__(self, value: AnyValue) -> bool:
        return True

    def __repr__(self) -> str:
        return "Any()"


class Is(Matcher):
    """Strict equality: 1 is not "1", True is not 1."""

    op = "is"

    def __call__(self, value: AnyValue) -> bool:
        return strict_equal(self.pattern, value)


class _StringMatcher(Matcher):
    def __init__(self, pattern: str) -> None:
        if not isinstance(pattern, str):
            raise MatchError(f"{self.op} needs a string pattern, not {type(pattern).__name__}")
        super().__init__(pattern)


class Startswith(_StringMatcher):
    op = "startswith"

    def __call__(self, value: AnyValue) -> bool:
        return isinstance(value, str) and value.startswith(self.pattern)


class Endswith(_StringMatcher):
    op = "endswith"

    def __call__(self, value: AnyValue) -> bool:
        return isinstance(value, str) and value.endswith(self.pattern)


class Contains(_StringMatcher):
    op = "contains"

    def __call__(self, value: AnyValue) -> bool:
        return isinstance(value, str) and self.pattern in value


class Like(_StringMatcher):
    """A regular-expression search (not a full match), run by RE2."""

    op = "like"

    def __init__(self, pattern: str) -> None:
        super().__init__(pattern)
        try:
            self._regex = re2.compile(pattern, options=_RE2_OPTIONS)
        except re2.error as exc:
            reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(
                exc.args[0], bytes) else str(exc)
            raise MatchError(f"like pattern {pattern!r} does not compile: {reason}") from None
        except UnicodeEncodeError:  # RE2 takes UTF-8: a lone surrogate cannot be encoded
            raise MatchError(f"like pattern {pattern!r} is not valid Unicode") from None

    def __call__(self, value: AnyValue) -> bool:
        if not isinstance(value, str):
            return False
        try:
            return self._regex.search(value) is not None
        except UnicodeEncodeError:  # a lone surrogate: not text RE2 can read, so no match
            return False


# Subscribers' bad patterns are reported as MatchError; RE2 need not log them too.
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False


# The seed's name for the matcher that matches anything.
Any = Any_

MATCHERS: dict[str, type[Matcher]] = {
    cls.op: cls for cls in (Any_, Is, Startswith, Endswith, Contains, Like)
}

Rules = Mapping[str, AnyValue]

MAX_DEPTH = jsoncodec.MAX_DEPTH  # levels of JSON objects and arrays in a match
MAX_MATCHERS = 256  # field rules (matchers and plain values) in a match
MAX_BYTES = 64 * 1024  # a match's JSON, UTF-8 encoded


def strict_equal(expected: AnyValue, actual: AnyValue) -> bool:
    """Equality without Python's cross-type leniency (True == 1, 1 == "1" is already False)."""
    if isinstance(expected, bool) or isinstance(actual, bool):
        return type(expected) is type(actual) and expected == actual
    if isinstance(expected, int | float | Decimal) and isinstance(actual, int | float | Decimal):
        return Decimal(str(expected)) == Decimal(str(actual))
    if isinstance(expected, dict) and isinstance(actual, dict):
        return expected.keys() == actual.keys() and all(
            strict_equal(v, actual[k]) for k, v in expected.items()
        )
    if isinstance(expected, list | tuple) and isinstance(actual, list | tuple):
        return len(expected) == len(actual) and all(
            strict_equal(a, b) for a, b in zip(expected, actual, strict=True)
        )
    return type(expected) is type(actual) and expected == actual


def deepmatch(rules: Rules, data: Mapping[str, AnyValue]) -> bool:
    """True if data satisfies every rule; nested dicts match recursively."""
    for key, rule in rules.items():
        if isinstance(rule, Matcher):
            if isinstance(rule, Any_):
                continue
            if key not in data or not rule(data[key]):
                return False
        elif isinstance(rule, Mapping):
            value = data.get(key)
            if not isinstance(value, Mapping) or not deepmatch(rule, value):
                return False
        elif key not in data or not strict_equal(rule, data[key]):
            return False
    return True


def rules_from_json(raw: AnyValue) -> dict[str, AnyValue]:
    """Parses the JSON form into rules of Matchers; raises MatchError naming the field
    or the limit exceeded."""
    check_bounds(raw)
    rules = _rules_from_json(raw, "")
    matchers = _count_matchers(rules)
    if matchers > MAX_MATCHERS:
        raise MatchError(f"match has {matchers} field rules, more than the limit of {MAX_MATCHERS}")
    return rules


def check_bounds(raw: AnyValue) -> None:
    """Refuses a match nested more than MAX_DEPTH levels deep or over MAX_BYTES encoded
    (before anything recurses into it)."""
    if jsoncodec.deeper_than(raw, MAX_DEPTH):
        raise MatchError(f"match is {jsoncodec.TOO_DEEP}")
    try:
        size = len(jsoncodec.dumps(raw).encode())
    except (TypeError, ValueError) as exc:
        raise MatchError(f"match values must be JSON-encodable: {exc}") from None
    if size > MAX_BYTES:
        raise MatchError(f"match is {size} bytes as JSON, more than the limit of {MAX_BYTES}")


def _count_matchers(rules: Rules) -> int:
    return sum(_count_matchers(rule) if isinstance(rule, Mapping) else 1 for rule in rules.values())


def _rules_from_json(raw: AnyValue, path: str) -> dict[str, AnyValue]:
    if not isinstance(raw, Mapping):
        raise MatchError(f"match{' at ' + path if path else ''} must be an object")
    rules: dict[str, AnyValue] = {}
    for key, value in raw.items():
        field = f"{path}.{key}" if path else key
        if not isinstance(key, str) or not key or key.startswith("$"):
            raise MatchError(f'match field "{field}": expected a field name')
        rules[key] = _rule_from_json(value, field)
    return rules


def _rule_from_json(value: AnyValue, field: str) -> AnyValue:
    if isinstance(value, Mapping):
        keys = list(value)
        if len(keys) == 1 and isinstance(keys[0], str) and keys[0].startswith("$"):
            return matcher_from_json(keys[0][1:], value[keys[0]], field)
        if any(isinstance(k, str) and k.startswith("$") for k in keys):
            raise MatchError(f'match field "{field}": a matcher object has exactly one $ key')
        return _rules_from_json(value, field)
    return Is(value)


def matcher_from_json(op: str, pattern: AnyValue, field: str) -> Matcher:
    cls = MATCHERS.get(op)
    if cls is None:
        raise MatchError(
            f'match field "{field}": unknown operator "{op}" (expected {", ".join(MATCHERS)})'
        )
    if cls is Any_ and pattern is not None:
        raise MatchError(f'match field "{field}": any takes no value (use null)')
    try:
        return cls(pattern)
    except MatchError as exc:
        raise MatchError(f'match field "{field}": {exc}') from None


def rules_to_json(rules: Rules) -> dict[str, AnyValue]:
    """The JSON form of rules (inverse of rules_from_json)."""
    out: dict[str, AnyValue] = {}
    for key, rule in rules.items():
        if isinstance(rule, Is) and not isinstance(rule.pattern, Mapping):
            out[key] = rule.pattern
        elif isinstance(rule, Matcher):
            out[key] = rule.to_json()
        elif isinstance(rule, Mapping):
            out[key] = rules_to_json(rule)
        else:
            out[key] = rule
    return out


def rules_from_python(rules: Mapping[str, AnyValue]) -> dict[str, AnyValue]:
    """Normalises rules given in Python (plain values, Matchers, dicts) via the JSON form."""
    if jsoncodec.deeper_than(rules, MAX_DEPTH):  # before rules_to_json recurses into it
        raise MatchError(f"match is {jsoncodec.TOO_DEEP}")
    raw = rules_to_json(rules)
    check_bounds(raw)  # also the patterns' depth, before encoding them
    return rules_from_json(jsoncodec.loads(jsoncodec.dumps(raw)))


def parse_match_option(option: str) -> tuple[list[str], AnyValue]:
    """Parses one CLI ``--match``: FIELD=VALUE, FIELD=OP:VALUE or FIELD:=JSON.

    Values are strings unless given as JSON with ``:=`` (``age:=30``); a dotted
    FIELD reaches into a json column. A VALUE that starts with a word and a colon
    must name an operator (``is:`` makes the rest text). Returns (path, JSON-form rule).
    """
    if ":=" in option and ("=" not in option or option.index(":=") < option.index("=")):
        field, _, text = option.partition(":=")
        try:
            value: AnyValue = jsoncodec.loads_given(text)
        except jsoncodec.TooDeep as exc:
            raise MatchError(f"--match {option!r}: the JSON is {exc}") from None
        except ValueError:
            raise MatchError(f"--match {option!r}: {text!r} is not JSON") from None
        if isinstance(value, Mapping):
            raise MatchError(f"--match {option!r}: use FIELD.SUBFIELD to match inside objects")
        rule: AnyValue = {"$is": value}
    elif "=" in option:
        field, _, text = option.partition("=")
        op, sep, rest = text.partition(":")
        if sep and op in MATCHERS:
            rule = {"$" + op: None if op == "any" else rest}
            if op == "any" and rest:
                raise MatchError(f"--match {option!r}: any takes no value")
        else:
            if sep:
                _refuse_unknown_operator(option, field, op, rest, text)
            rule = text
    else:
        raise MatchError(f"--match {option!r}: expected FIELD=VALUE, FIELD=OP:VALUE or FIELD:=JSON")
    path = field.split(".")
    if not all(path):
        raise MatchError(f"--match {option!r}: empty field name")
    return path, rule


# Words people try for an operator this module names otherwise.
_SYNONYMS = {"regex": "like", "regexp": "like", "re": "like", "match": "like",
             "prefix": "startswith", "starts": "startswith", "suffix": "endswith",
             "ends": "endswith", "has": "contains", "includes": "contains", "in": "contains",
             "eq": "is", "equals": "is", "exact": "is"}
_OPERATOR_WORD = re.compile(r"[A-Za-z_]+")


def _refuse_unknown_operator(option: str, field: str, op: str, rest: str, text: str) -> None:
    """FIELD=WORD:VALUE with WORD not an operator (regex, startwith, eq) would match the
    text "regex:..." itself, silently: refuse it. Text whose prefix is no word (10:30,
    a.b:c) or a URL scheme followed by // (http://x) is the text itself."""
    if not _OPERATOR_WORD.fullmatch(op) or rest.startswith("//"):
        return
    raise MatchError(f'--match {option!r}: unknown operator "{op}" ({operators_hint(op)}; '
                     f"to match the text itself: {field}=is:{text})")


def operators_hint(word: str) -> str:
    """'did you mean "like"? operators: any, is, ...' for a word that is not an operator."""
    near = _SYNONYMS.get(word.lower()) or next(
        iter(difflib.get_close_matches(word.lower(), list(MATCHERS), n=1, cutoff=0.8)), None)
    return (f'did you mean "{near}"? ' if near else "") + f"operators: {', '.join(MATCHERS)}"


def match_options_to_json(options: list[str]) -> dict[str, AnyValue]:
    """Combines several ``--match`` options into one JSON-form match, validated."""
    result: dict[str, AnyValue] = {}
    for option in options:
        path, rule = parse_match_option(option)
        node = result
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict) or any(k.startswith("$") for k in child):
                raise MatchError(f"--match {option!r}: field {part!r} is already matched as a value")
            node = child
        if path[-1] in node:
            raise MatchError(f"--match {option!r}: field {'.'.join(path)!r} is matched twice")
        node[path[-1]] = rule
    rules_from_json(result)
    return result
