"""durian's generated filter form: one row per provided column, a condition and a value.

Form fields are ``cond:<column>`` (one of CONDITIONS) and ``value:<column>``;
a nested match on a json column, which the rows cannot express, travels as
``keep:<column>`` (its JSON) so editing a listener never loses it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .. import jsoncodec
from ..errors import MatchError
from ..match import operators_hint

# (operator, label); "any" leaves the column out of the match.
CONDITIONS = (
    ("any", "anything"),
    ("is", "exact"),
    ("startswith", "starts with"),
    ("endswith", "ends with"),
    ("contains", "contains"),
    ("like", "matches regex"),
)
_OPERATORS = {op for op, _ in CONDITIONS}


@dataclass(frozen=True)
class FilterRow:
    column: str
    condition: str = "any"
    value: str = ""
    keep: str | None = None  # JSON of a nested match the row cannot show


def match_from_form(provides: Sequence[str], form: Mapping[str, str]) -> dict[str, Any]:
    """The JSON-form match the filled-in rows describe (validated later by the core)."""
    match: dict[str, Any] = {}
    for column in provides:
        kept = form.get(f"keep:{column}")
        if kept:
            match[column] = _json(kept, column)
            continue
        condition = form.get(f"cond:{column}", "any")
        if condition not in _OPERATORS:  # a script's post: the page offers only these
            raise MatchError(f'match field "{column}": unknown condition "{condition}" '
                             f"({operators_hint(condition)}; is: the value exactly)")
        if condition == "any":
            continue
        value = form.get(f"value:{column}", "")
        match[column] = exact_value(value) if condition == "is" else {"$" + condition: value}
    return match


def rows_from_form(provides: Sequence[str], form: Mapping[str, str]) -> list[FilterRow]:
    """The rows as filled in, to show the form again with an error."""
    return [FilterRow(c, form.get(f"cond:{c}", "any"), form.get(f"value:{c}", ""),
                      form.get(f"keep:{c}") or None) for c in provides]


def exact_value(text: str) -> Any:
    """An exact value: JSON if it reads as JSON (42, true, null, "42"), else the text itself."""
    if not _reads_as_json(text):
        return text
    value = jsoncodec.loads(text)
    # A JSON object would read as a nested match: keep it an exact comparison.
    return {"$is": value} if isinstance(value, dict | list) else value


def rows_from_match(provides: Sequence[str], match: Mapping[str, Any]) -> list[FilterRow]:
    """The rows that show a stored match, for editing."""
    return [_row(column, match[column]) if column in match else FilterRow(column)
            for column in provides]


def _row(column: str, rule: Any) -> FilterRow:
    if isinstance(rule, Mapping):
        keys = list(rule)
        if len(keys) == 1 and keys[0].startswith("$"):
            op, pattern = keys[0][1:], rule[keys[0]]
            if op == "any":
                return FilterRow(column)
            if op == "is":
                return FilterRow(column, "is", _exact_text(pattern))
            if op in _OPERATORS and isinstance(pattern, str):
                return FilterRow(column, op, pattern)
        return FilterRow(column, keep=jsoncodec.dumps(rule))
    return FilterRow(column, "is", _exact_text(rule))


def _exact_text(value: Any) -> str:
    """The text exact_value reads back as value."""
    if isinstance(value, str) and not _reads_as_json(value):
        return value
    return jsoncodec.dumps(value)


def _reads_as_json(text: str) -> bool:
    try:
        jsoncodec.dumps(jsoncodec.loads(text))  # simplejson reads NaN, which JSON cannot carry
    except ValueError:
        return False
    return True


def _json(text: str, column: str) -> Any:
    try:
        return jsoncodec.loads_given(text)
    except jsoncodec.TooDeep as exc:
        raise MatchError(f'match field "{column}": the kept nested match is {exc}') from None
    except ValueError:
        raise MatchError(f'match field "{column}": the kept nested match is not JSON') from None
