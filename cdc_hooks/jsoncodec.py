"""JSON for event data, the one door: numbers keep PostgreSQL's digits.

PostgreSQL writes a numeric positionally with every digit of its scale
(0.0000000000), a float8 in its shortest form (1e-20), a json column as it was
typed. loads keeps each number that is not a short integer as a JsonNumber, a
Decimal that remembers its text, and every dumps writes that text back: a
number leaves as it came, never in Decimal's own form (0E-10, 1E-8). A plain
Decimal is written as PostgreSQL writes a numeric (format 'f').

dumps_postgres writes Python values (a custom event's) as PostgreSQL writes a
column of the type psycopg gives each.

Nesting is bounded: the parsers and encoders recurse, so JSON nested deeper than
Python's recursion limit raises TooDeep (a ValueError) instead of RecursionError,
and JSON that users give (a match, a send payload) may nest at most MAX_DEPTH levels.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from datetime import date, datetime, time, timedelta, tzinfo
from decimal import Context, Decimal
from enum import Enum
from fractions import Fraction
from typing import Any
from uuid import UUID

import orjson
import simplejson

MAX_DEPTH = 32  # levels of objects and arrays in JSON users give: a match, a send payload
TOO_DEEP = f"nested more than {MAX_DEPTH} levels deep (the limit)"
ENCODE_DEPTH = 254  # levels orjson encodes (and the REST API can show): an event body's limit


class TooDeep(ValueError):
    """JSON nested deeper than a limit (or than the parser can recurse)."""


NUMERIC_MAX_DIGITS = 131072  # before the point: numeric's limit
NUMERIC_MAX_SCALE = 16383  # after it


class JsonNumber(Decimal):
    """A JSON number as it was written: a Decimal to compare and compute with,
    its own text in JSON (and in str)."""

    __slots__ = ("text",)
    text: str

    def __new__(cls, text: str) -> JsonNumber:
        number = Decimal.__new__(cls, text)
        number.text = text
        return number

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"JsonNumber({self.text!r})"

    def __reduce__(self) -> tuple[type[JsonNumber], tuple[str]]:
        return JsonNumber, (self.text,)


def _integer(text: str) -> int | JsonNumber:
    # An int would lose -0's sign (float8's negative zero), Python reads at
    # most 4300 digits, orjson writes at most 64 bits: those stay text.
    if len(text) < 19 and text != "-0":
        return int(text)
    return JsonNumber(text)


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = simplejson.JSONDecoder(parse_float=JsonNumber, parse_int=_integer,
                                  parse_constant=_not_json)


def loads(text: str | bytes) -> Any:
    """Raises ValueError for text that is not JSON (NaN and Infinity are not), TooDeep
    for JSON nested too deeply to read."""
    try:
        return _DECODER.decode(text.decode("utf-8") if isinstance(text, bytes) else text)
    except RecursionError:
        raise TooDeep("nested too deeply to read") from None


def loads_given(text: str | bytes) -> Any:
    """loads, for JSON a user gives: TooDeep beyond MAX_DEPTH levels."""
    try:
        value = loads(text)
        if not deeper_than(value, MAX_DEPTH):
            return value
    except TooDeep:
        pass
    raise TooDeep(TOO_DEEP)


def deeper_than(value: Any, limit: int) -> bool:
    """Whether value nests objects and arrays more than limit levels deep ({} is 1 level).
    Iterative, so a value of any depth is measured without recursion."""
    pending = [(value, 0)]
    while pending:
        node, depth = pending.pop()
        if isinstance(node, Mapping):
            children: Any = node.values()
        elif isinstance(node, list | tuple):
            children = node
        else:
            continue
        if depth == limit:
            return True
        pending.extend((child, depth + 1) for child in children)
    return False


def number_text(value: Any) -> str:
    """A number's JSON text: a JsonNumber's own, a Decimal's as PostgreSQL's numeric.
    TypeError for what is not a number, ValueError for what JSON cannot carry."""
    if isinstance(value, JsonNumber):
        return value.text
    if isinstance(value, Decimal):
        return numeric_text(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def numeric_text(value: Decimal) -> str:
    """As PostgreSQL writes the numeric: every digit of the scale, no exponent, no -0."""
    if not value.is_finite():
        raise ValueError(f"{value} is not a JSON number")
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)  # a finite Decimal's ('n', 'N', 'F': NaN and infinities)
    if value.adjusted() >= NUMERIC_MAX_DIGITS or -exponent > NUMERIC_MAX_SCALE:
        raise ValueError(f"{value} is beyond PostgreSQL numeric's range")
    text = format(value, "f")
    return text[1:] if not value and text.startswith("-") else text


def _raw_number(value: Any) -> simplejson.RawJSON:
    return simplejson.RawJSON(number_text(value))


# use_decimal off: simplejson would write a Decimal as str() does (1E-8).
_ENCODER = simplejson.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                                  use_decimal=False, default=_raw_number)
_PRETTY = simplejson.JSONEncoder(indent=2, ensure_ascii=False, allow_nan=False, use_decimal=False,
                                 default=_raw_number)


def dumps(value: Any) -> str:
    """Compact JSON; raises TypeError or ValueError for values JSON cannot carry,
    TooDeep for values nested too deeply to encode."""
    try:
        return _ENCODER.encode(value)
    except RecursionError:
        raise TooDeep("nested too deeply to encode") from None


def dumps_pretty(value: Any) -> str:
    """dumps, indented for reading."""
    return _PRETTY.encode(value)


def _number_or_text(value: Any) -> simplejson.RawJSON | str:
    try:
        return _raw_number(value)
    except TypeError:
        return str(value)


_SPACED = simplejson.JSONEncoder(ensure_ascii=False, allow_nan=False, use_decimal=False,
                                 default=_number_or_text)


def dumps_spaced(value: Any) -> str:
    """One line spaced for reading (", ", ": "), for people rather than the wire:
    numbers keep their text, what JSON cannot carry is shown as str()."""
    return _SPACED.encode(value)


def dumps_decoded(value: Any) -> str:
    """dumps, for values that loads made (numbers are int or JsonNumber, never a float,
    which orjson would write as null if not finite): orjson, the same text, several
    times faster (two per event on the relay's hot path; README, "Why aiohttp").
    What orjson cannot carry (an integer beyond 64 bits) goes through dumps; a value
    nested more than ENCODE_DEPTH levels deep raises TooDeep."""
    try:
        return orjson.dumps(value, default=_number_fragment).decode()
    except orjson.JSONEncodeError:
        if deeper_than(value, ENCODE_DEPTH):
            raise TooDeep(f"nested more than {ENCODE_DEPTH} levels deep") from None
        return dumps(value)


def _number_fragment(value: Any) -> orjson.Fragment:
    return orjson.Fragment(number_text(value))


def dumps_rows(rows: Any) -> str:
    """Rows of plain values (numbers, strings, booleans, None) as one JSON array,
    for a single statement parameter: psycopg dumps a large array parameter element
    by element in Python, orjson the whole batch in C. A string orjson refuses (a
    lone surrogate) goes through the standard library."""
    try:
        return orjson.dumps(rows).decode()
    except orjson.JSONEncodeError:
        return json.dumps(rows)


def storable_text(value: str) -> str:
    """Text PostgreSQL can store: valid UTF-8 without NUL (ValueError otherwise)."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    return value


# Python values as PostgreSQL writes them (custom events) ------------------------


class UnencodableValue(TypeError):
    """A value without a PostgreSQL JSON form; the message names where it is."""


def dumps_postgres(values: Mapping[str, Any], timezone: tzinfo) -> str:
    """values as JSON, each written as to_json writes a column of the type psycopg
    gives it: a float as float8, a Decimal as numeric, a datetime as timestamptz in
    the session's time zone (or timestamp if naive), date, time, timedelta as
    interval, UUID, bytes as bytea; lists and tuples as arrays, dicts as objects.
    Raises UnencodableValue naming the key and the type of a value that has no form,
    ValueError naming the key of one PostgreSQL cannot hold (text with NUL)."""
    return dumps(_object(values, "", timezone))


@functools.singledispatch
def _postgres(value: Any, where: str, timezone: tzinfo) -> Any:
    raise UnencodableValue(
        f'"{where}" is of type {type(value).__name__}, which has no JSON form (send str, int, float, '
        "Decimal, bool, None, datetime, date, time, timedelta, UUID, bytes, list, tuple or dict)")


@_postgres.register(type(None))
@_postgres.register(bool)
def _as_is(value: bool | None, where: str, timezone: tzinfo) -> bool | None:
    return value


@_postgres.register
def _text(value: str, where: str, timezone: tzinfo) -> str:
    try:
        return storable_text(str.__str__(value))  # a str Enum as its value
    except ValueError as exc:
        raise ValueError(f'"{where}" {exc}') from None


@_postgres.register
def _int(value: int, where: str, timezone: tzinfo) -> int:
    return int(value)  # an IntEnum as its number


@_postgres.register
def _enum(value: Enum, where: str, timezone: tzinfo) -> str:
    return value.name  # as psycopg passes it, for an enum column


_FLOAT_DIGITS = Context(prec=17)  # repr's shortest digits are at most 17


@_postgres.register
def _float(value: float, where: str, timezone: tzinfo) -> Any:
    # float8's digits, written positionally as to_jsonb writes a float8
    # (cdc_hooks.send takes jsonb, which writes every number so).
    if not math.isfinite(value):
        return _postgres(Decimal(value), where, timezone)
    return _postgres(float8_digits(value).normalize(_FLOAT_DIGITS), where, timezone)


def float8_digits(value: float) -> Decimal:
    """The digits PostgreSQL's float8out writes: the fewest that read back as value,
    as repr's, except that its Ryu never takes a decimal exactly halfway to the next
    float (2.6444261099366008e+16, where repr writes 2.644426109936601e+16)."""
    text = repr(value)
    if value:
        size = abs(Fraction(value))
        halfway = {size - (size - Fraction(math.nextafter(abs(value), 0))) / 2,
                   size + Fraction(math.ulp(value)) / 2}
        if abs(Fraction(text)) in halfway:  # then more digits, correctly rounded
            text = next(t for t in (f"{value:.{n}e}" for n in range(17))
                        if float(t) == value and abs(Fraction(t)) not in halfway)
    return Decimal(text)


@_postgres.register
def _decimal(value: Decimal, where: str, timezone: tzinfo) -> Any:
    if not value.is_finite():  # to_json writes NaN and the infinities as strings
        return "NaN" if value.is_nan() else str(value)
    try:
        return simplejson.RawJSON(number_text(value))
    except ValueError as exc:
        raise ValueError(f'"{where}": {exc}') from None


@_postgres.register
def _timestamp(value: datetime, where: str, timezone: tzinfo) -> str:
    if value.utcoffset() is None:  # naive: a timestamp (without time zone)
        return f"{value.date().isoformat()}T{_clock(value)}"
    try:
        local = value.astimezone(timezone)
    except OverflowError:
        raise ValueError(f'"{where}": {value} is out of range in time zone {timezone}') from None
    offset = local.utcoffset()
    assert offset is not None  # astimezone gives an aware datetime
    return f"{local.date().isoformat()}T{_clock(local)}{_offset(offset, hours_only=False)}"


@_postgres.register
def _date(value: date, where: str, timezone: tzinfo) -> str:
    return value.isoformat()


@_postgres.register
def _time(value: time, where: str, timezone: tzinfo) -> str:
    if value.tzinfo is None:
        return _clock(value)
    offset = value.utcoffset()
    if offset is None:  # a zone such as Europe/Paris: its offset depends on the date
        raise ValueError(f'"{where}": time {value} has a time zone without a fixed offset')
    return _clock(value) + _offset(offset, hours_only=True)


@_postgres.register
def _interval(value: timedelta, where: str, timezone: tzinfo) -> str:
    # IntervalStyle postgres, the default: "-1 days +23:59:59"
    parts = [f"{value.days} day{'' if value.days == 1 else 's'}"] if value.days else []
    if value.seconds or value.microseconds or not value.days:
        hours, rest = divmod(value.seconds, 3600)
        parts.append(("+" if value.days < 0 else "") + _clock(
            time(hours, rest // 60, rest % 60, value.microseconds)))
    return " ".join(parts)


@_postgres.register
def _uuid(value: UUID, where: str, timezone: tzinfo) -> str:
    return str(value)


@_postgres.register(bytes)
@_postgres.register(bytearray)
@_postgres.register(memoryview)
def _bytea(value: bytes | bytearray | memoryview, where: str, timezone: tzinfo) -> str:
    return "\\x" + bytes(value).hex()


@_postgres.register(list)
@_postgres.register(tuple)
def _array(value: list[Any] | tuple[Any, ...], where: str, timezone: tzinfo) -> list[Any]:
    return [_postgres(item, f"{where}[{i}]", timezone) for i, item in enumerate(value)]


@_postgres.register(Mapping)
def _object(value: Mapping[Any, Any], where: str, timezone: tzinfo) -> dict[str, Any]:
    for key in value:
        if not isinstance(key, str):
            owner = f'"{where}"' if where else "the payload"
            raise UnencodableValue(f"{owner} has the key {key!r}: object keys must be strings")
    return {key: _postgres(item, f"{where}.{key}" if where else key, timezone)
            for key, item in value.items()}


def _clock(value: datetime | time) -> str:
    """HH:MM:SS, and the fraction without trailing zeros, as PostgreSQL writes it."""
    text = f"{value.hour:02d}:{value.minute:02d}:{value.second:02d}"
    return f"{text}.{value.microsecond:06d}".rstrip("0") if value.microsecond else text


def _offset(offset: timedelta, *, hours_only: bool) -> str:
    """+05:30, +00:19:32; a timetz's whole hours as +02."""
    seconds = int(offset.total_seconds())
    hours, rest = divmod(abs(seconds), 3600)
    minutes, seconds_left = divmod(rest, 60)
    text = f"{'-' if seconds < 0 else '+'}{hours:02d}"
    if minutes or seconds_left or not hours_only:
        text += f":{minutes:02d}"
    return text + (f":{seconds_left:02d}" if seconds_left else "")
