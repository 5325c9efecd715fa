"""Which of many matches an event satisfies, without evaluating each one.

A match holds when every one of its rules holds (match.deepmatch), so each match
is filed under one rule an index can find by the event's value: an exact value
(Is, or a plain value) by field path and value, else a prefix (Startswith) or a
suffix (Endswith) by field path. An event looks its values up at the filed paths;
the matches found are candidates, and a candidate with rules besides the one it is
filed under is checked with deepmatch. A match with no such rule (like, contains,
a list or object value, an empty object) is checked for every event; a match of
nothing but ``any`` holds for every event.

Exact values are keyed so that two keys are equal exactly when strict_equal says
the values are: strings by themselves, numbers as Decimal(str(n)) (1, 1.0 and
1.00 alike), booleans tagged apart from 1 and 0, null as None.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping
from decimal import Decimal
from typing import Any, Generic, NamedTuple, TypeVar

from .match import Any_, Endswith, Is, Matcher, Rules, Startswith, deepmatch

T = TypeVar("T")

Path = tuple[str, ...]
_MISSING = object()
_UNKEYED = object()  # a value no indexed exact value equals


class _Entry(NamedTuple):
    order: int  # position among the entries given: results keep that order
    item: Any
    rules: Rules | None  # None: the rule it is filed under is its whole match


class _Affixes:
    """Prefixes (or suffixes) of one field: by text, and their distinct lengths."""

    def __init__(self, suffix: bool) -> None:
        self.suffix = suffix
        self.by_text: dict[str, list[_Entry]] = defaultdict(list)
        self.lengths: list[int] = []

    def add(self, text: str, entry: _Entry) -> None:
        self.by_text[text].append(entry)

    def seal(self) -> None:
        self.lengths = sorted({len(text) for text in self.by_text})

    def find(self, value: str, out: list[_Entry]) -> None:
        size = len(value)
        for length in self.lengths:
            if length > size:
                break
            found = self.by_text.get(value[size - length:] if self.suffix else value[:length])
            if found:
                out.extend(found)


class _Field:
    """The matches filed under one field path."""

    def __init__(self) -> None:
        self.exact: dict[Hashable, list[_Entry]] = defaultdict(list)
        self.prefixes = _Affixes(suffix=False)
        self.suffixes = _Affixes(suffix=True)

    def seal(self) -> None:
        self.exact = dict(self.exact)
        self.prefixes.seal()
        self.suffixes.seal()

    def find(self, value: Any, out: list[_Entry]) -> None:
        if self.exact:
            key = exact_key(value)
            if key is not _UNKEYED:
                out.extend(self.exact.get(key, ()))
        if isinstance(value, str):
            self.prefixes.find(value, out)
            self.suffixes.find(value, out)


class MatchIndex(Generic[T]):
    """Items (listener ids) with their rules; matching(data) is the items whose rules
    deepmatch(rules, data) holds for, in the order they were given."""

    def __init__(self, entries: Iterable[tuple[T, Rules]]) -> None:
        self.entries = list(entries)  # as given: a caller may compare them to reuse the index
        self.items: list[T] = []
        self._always: list[_Entry] = []
        self._checked: list[_Entry] = []
        self._fields: dict[Path, _Field] = defaultdict(_Field)
        for order, (item, rules) in enumerate(self.entries):
            self.items.append(item)
            self._file(order, item, rules)
        for field in self._fields.values():
            field.seal()
        self._fields = dict(self._fields)

    def _file(self, order: int, item: T, rules: Rules) -> None:
        if all(isinstance(rule, Any_) for rule in rules.values()):
            self._always.append(_Entry(order, item, None))
            return
        filed = _best_rule(rules, ())
        if filed is None:
            self._checked.append(_Entry(order, item, rules))
            return
        path, rule = filed
        entry = _Entry(order, item, None if _is_whole(rules, path) else rules)
        field = self._fields[path]
        if isinstance(rule, Startswith):
            field.prefixes.add(rule.pattern, entry)
        elif isinstance(rule, Endswith):
            field.suffixes.add(rule.pattern, entry)
        else:
            field.exact[exact_key(_pattern(rule))].append(entry)

    def matching(self, data: Mapping[str, Any]) -> list[T]:
        candidates: list[_Entry] = []
        for path, field in self._fields.items():
            value = _find(data, path)
            if value is not _MISSING:
                field.find(value, candidates)
        found = [e for e in candidates if e.rules is None or deepmatch(e.rules, data)]
        found += self._always
        found += (e for e in self._checked if deepmatch(e.rules, data))  # type: ignore[arg-type]
        if len(found) > 1:
            found.sort()
        return [e.item for e in found]


def exact_key(value: Any) -> Any:
    """A hashable key equal for values strict_equal holds for, or _UNKEYED (a list,
    an object, NaN, a type JSON does not have)."""
    kind = type(value)
    if kind is str or value is None:
        return value
    if kind is bool:
        return (bool, value)
    if isinstance(value, int | float | Decimal):
        number = Decimal(str(value))
        return _UNKEYED if number.is_nan() else number
    return _UNKEYED


def _pattern(rule: Any) -> Any:
    return rule.pattern if isinstance(rule, Is) else rule


def _best_rule(rules: Rules, path: Path) -> tuple[Path, Any] | None:
    """The rule to file a match under: an exact value if it has one, else its longest
    prefix or suffix; None if it has neither."""
    best: tuple[Path, Any] | None = None
    best_rank = -1
    for key, rule in rules.items():
        if not isinstance(rule, Matcher) and isinstance(rule, Mapping):
            found = _best_rule(rule, (*path, key))
            if found is None:
                continue
            here, rank = found, _rank(found[1])
        else:
            here, rank = ((*path, key), rule), _rank(rule)
        if rank > best_rank:
            best, best_rank = here, rank
    return best


def _rank(rule: Any) -> int:
    if isinstance(rule, Startswith | Endswith):
        return len(rule.pattern)
    if isinstance(rule, Matcher) and not isinstance(rule, Is):
        return -1  # any, contains, like: not indexed
    if exact_key(_pattern(rule)) is _UNKEYED:
        return -1
    return 1 << 30  # an exact value: the fewest candidates


def _is_whole(rules: Rules, path: Path) -> bool:
    """Whether the rule at path is all the match asks (besides any)."""
    head, rest = path[0], path[1:]
    if any(key != head and not isinstance(rule, Any_) for key, rule in rules.items()):
        return False
    return not rest or _is_whole(rules[head], rest)


def _find(data: Mapping[str, Any], path: Path) -> Any:
    """The value at path as deepmatch reaches it (objects along the way), or _MISSING."""
    for key in path[:-1]:
        data = data.get(key)  # type: ignore[assignment]
        if not isinstance(data, Mapping):
            return _MISSING
    return data.get(path[-1], _MISSING)
