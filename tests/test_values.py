"""Values as PostgreSQL writes them (issue 13, items 3 and 7), against real PostgreSQL.

A listener gets each number with the very digits PostgreSQL's to_json gives
(0.0000000000, not 0E-10), and a custom event's Python values are written as a
table column of their type would be. The reference is always PostgreSQL itself:
generated values are written by the server and by cdc_hooks, then compared text
for text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

import psycopg
import pytest
from click.testing import Result
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from psycopg.types.json import Jsonb
from receivers import InProcessRelay, Receiver, wait_until

from cdc_hooks import install as installer
from cdc_hooks import jsoncodec
from cdc_hooks.config import Config
from cdc_hooks.errors import ListenerError
from cdc_hooks.match import Is
from cdc_hooks.registry import Hook, Registry

Conn = psycopg.Connection[Any]
Cli = Callable[..., Result]

DELIVERY = """
[delivery]
allow_private_networks = true
retry_schedule = [0.2]
timeout = 5
"""
ZONES = ["UTC", "Asia/Kolkata", "Europe/Amsterdam", "America/St_Johns", "Pacific/Chatham",
         "Australia/Lord_Howe"]


def examples(count: int) -> settings:
    """Settings of a property run inside a test, so its fixtures stay up across examples."""
    return settings(max_examples=count, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def to_json(conn: Conn, value: Any, cast: str = "", function: str = "to_json") -> str:
    """PostgreSQL's JSON of a value psycopg sends as its type (or cast: ::numeric)."""
    query = psycopg.sql.SQL("SELECT {}(%s{})::text").format(
        psycopg.sql.Identifier(function), psycopg.sql.SQL(cast))
    row = conn.execute(query, (value,)).fetchone()
    assert row is not None
    return str(row[0])


# Numbers: text from PostgreSQL, through loads and dumps ---------------------------

# numeric's whole range: up to 131072 digits before the point, 16383 after.
numerics = st.one_of(
    st.decimals(allow_nan=True, allow_infinity=True),
    st.builds(lambda sign, digits, exponent: Decimal((sign, tuple(int(d) for d in str(digits)),
                                                      exponent)),
              st.integers(0, 1), st.integers(0, 10**40), st.integers(-16300, 6000)),
    st.sampled_from([Decimal(t) for t in ("0E-10", "0.0000001000", "1E-8", "1E-20", "-0", "-0.00",
                                           "1E+300", "1E+5000", "NaN", "Infinity", "-Infinity")]),
).map(lambda d: Decimal("NaN") if d.is_nan() else d)  # PostgreSQL has no -NaN nor sNaN
floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [0.0, -0.0, 1e-20, 1e-5, 1e15, 1e16, 100.0, 5e-324, 1.7976931348623157e308,
     2.644426109936601e16, 6.753665788837374e16]) | st.integers(-1074, 1023).map(lambda e: 2.0**e)
reals = st.floats(width=32) | st.sampled_from([-0.0, 1e-20, 1.5e-5, 3.4e38])
# A json column keeps the number as it was typed.
typed_numbers = st.from_regex(r"-?(0|[1-9][0-9]{0,30})(\.[0-9]{1,30})?([eE][+-]?[0-9]{1,3})?",
                              fullmatch=True)


def test_numbers_read_and_written_keep_postgresql_text(conn: Conn) -> None:
    @examples(300)
    @given(st.one_of(numerics.map(lambda d: (d, "::numeric")),
                     numerics.filter(lambda d: d.is_finite()).map(lambda d: (str(d), "::jsonb")),
                     floats.map(lambda f: (f, "::float8")), reals.map(lambda f: (f, "::real")),
                     typed_numbers.map(lambda t: (t, "::json"))))
    def check(case: tuple[Any, str]) -> None:
        text = to_json(conn, *case)
        decoded = jsoncodec.loads(text)
        assert jsoncodec.dumps_decoded(decoded) == text
        assert jsoncodec.dumps(decoded) == text
        assert jsoncodec.dumps([{"v": decoded}]) == f'[{{"v":{text}}}]'

    check()


def test_a_plain_decimal_is_written_as_postgresql_writes_the_numeric(conn: Conn) -> None:
    @examples(300)
    @given(numerics.filter(lambda d: d.is_finite()))
    def check(value: Decimal) -> None:
        assert jsoncodec.dumps(value) == jsoncodec.dumps_decoded(value) == to_json(conn, value,
                                                                                   "::numeric")

    check()
    with pytest.raises(ValueError, match="beyond PostgreSQL numeric's range"):
        jsoncodec.dumps(Decimal("1E+131072"))
    with pytest.raises(ValueError, match="is not a JSON number"):
        jsoncodec.dumps(Decimal("NaN"))


def test_loads_refuses_what_is_not_json() -> None:
    for text in ("NaN", "[Infinity]", '{"a": -Infinity}', "{nope"):
        with pytest.raises(ValueError):
            jsoncodec.loads(text)


# Numbers end to end: what a listener gets is to_json's text, byte for byte ---------

NUMBERS = """
[[hooks]]
name = "numbers"
table = "numbers"
provides = ["n", "n10", "f", "r", "jb", "js"]
""" + DELIVERY
NUMBER_COLUMNS = ("n", "n10", "f", "r", "jb", "js")
INSERT_NUMBERS = """
INSERT INTO numbers (n, n10, f, r, jb, js)
SELECT n::numeric, n10::numeric, f::float8, r::real, jb::jsonb, js::json
FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[])
     AS u(n, n10, f, r, jb, js)
RETURNING id
"""
POSTGRES_JSON = """
SELECT id, coalesce(to_json(n)::text, 'null'), coalesce(to_json(n10)::text, 'null'),
       coalesce(to_json(f)::text, 'null'), coalesce(to_json(r)::text, 'null'),
       coalesce(to_json(jb)::text, 'null'), coalesce(to_json(js)::text, 'null'), n10 = 0
FROM numbers WHERE id = ANY(%s)
"""


def _maybe(values: st.SearchStrategy[Any]) -> st.SearchStrategy[str | None]:
    return st.none() | values.map(str)


number_rows = st.tuples(
    _maybe(numerics),
    _maybe(st.decimals(min_value=-(10**19), max_value=10**19, allow_nan=False)
           | st.sampled_from([Decimal("0"), Decimal("-0"), Decimal("0.00000000001"), Decimal("NaN")])),
    _maybe(floats.map(repr)), _maybe(reals.map(repr)),
    _maybe(numerics.filter(lambda d: d.is_finite())), _maybe(typed_numbers),
)


@pytest.fixture
def numbers_relay(conn: Conn, make_config: Callable[..., Config], cli: Cli,
                  receiver: Receiver) -> Iterator[Config]:
    conn.execute("CREATE TABLE numbers (id bigserial PRIMARY KEY, n numeric, n10 numeric(30, 10), "
                 "f float8, r real, jb jsonb, js json)")
    config = make_config(NUMBERS)
    installer.install(config)
    registry = Registry()
    registry.configure(config)
    Hook("numbers", registry=registry).listener(url=receiver.url("/all")).save()
    # A number in a match compares by value: 0 matches 0.0000000000.
    Hook("numbers", registry=registry).listener(url=receiver.url("/zero")).match(
        n10=Is(Decimal("0"))).save()
    relay = InProcessRelay(config).start()
    yield config
    relay.stop()


def test_a_listener_gets_each_number_as_to_json_writes_it(conn: Conn, receiver: Receiver,
                                                         numbers_relay: Config) -> None:
    zeros: set[int] = set()

    @examples(25)
    @given(st.lists(number_rows, min_size=1, max_size=4))
    @example([("1E+5000", "0", "-0.0", "-0.0", "1E-8", "-0")])  # more digits than Python's int reads
    def check(rows: list[tuple[str | None, ...]]) -> None:
        columns = [list(column) for column in zip(*rows, strict=True)]
        ids = [r[0] for r in conn.execute(INSERT_NUMBERS, columns).fetchall()]
        expected = {row[0]: row[1:7] for row in conn.execute(POSTGRES_JSON, (ids,)).fetchall()}
        zeros.update(row[0] for row in conn.execute(POSTGRES_JSON, (ids,)).fetchall() if row[7])
        bodies = _bodies_by_key(receiver, "/all", max(ids))
        for row_id in ids:
            data = ",".join(f'"{c}":{t}' for c, t in zip(NUMBER_COLUMNS, expected[row_id], strict=True))
            assert f'"data":{{{data}}}' in bodies[row_id]

    check()
    total = conn.execute("SELECT count(*) FROM numbers").fetchone()[0]  # type: ignore[index]
    wait_until(lambda: _settled(conn), message="every delivery made")
    assert len(receiver.received("/all")) == total
    assert set(_bodies_by_key(receiver, "/zero", 0)) == zeros


def _bodies_by_key(receiver: Receiver, path: str, last_id: int) -> dict[int, str]:
    """The bodies on path by their key's id, once the event of row last_id arrived."""
    def arrived() -> dict[int, str] | None:
        found = {int(re.search(r'"key":\{"id":(\d+)\}', text).group(1)): text  # type: ignore[union-attr]
                 for text in (r.body.decode() for r in receiver.received(path))}
        return found if last_id in found or not last_id else None
    return wait_until(arrived, message=f"the event of row {last_id}")  # type: ignore[no-any-return]


def _settled(conn: Conn) -> bool:
    row = conn.execute("SELECT (SELECT count(*) FROM cdc_hooks.outbox) + (SELECT count(*) "
                       "FROM cdc_hooks.deliveries WHERE status = 'pending')").fetchone()
    return row is not None and row[0] == 0


# Python values of a custom event: as to_json writes a column of their type --------


def test_temporal_values_are_written_as_to_json_writes_them(conn: Conn) -> None:
    offsets = st.sampled_from([timezone(timedelta(minutes=m)) for m in (0, 120, -330, 345, -60)])
    zones = st.sampled_from([ZoneInfo(z) for z in ZONES]) | offsets
    values = st.one_of(
        # Up to 2037: later, Python's zoneinfo may place a DST change where
        # PostgreSQL does not (Pacific/Chatham, 2046-09-30).
        st.datetimes(min_value=datetime(1, 1, 3), max_value=datetime(2037, 12, 31),
                     timezones=st.none() | zones),
        st.dates(), st.times(timezones=st.none() | offsets), st.timedeltas())

    @examples(300)
    @given(values, st.sampled_from(ZONES))
    def check(value: Any, session_zone: str) -> None:
        conn.execute(psycopg.sql.SQL("SET TIME ZONE {}").format(psycopg.sql.Literal(session_zone)))
        expected = to_json(conn, value)
        assert jsoncodec.dumps_postgres({"v": value}, conn.info.timezone) == f'{{"v":{expected}}}'

    check()


def test_numbers_of_a_custom_event_are_written_as_to_jsonb_writes_them(conn: Conn) -> None:
    # cdc_hooks.send takes jsonb, which writes every number positionally.
    @examples(300)
    @given(st.one_of(floats.map(lambda f: (f, "::float8")), numerics.map(lambda d: (d, "::numeric")),
                     st.integers().map(lambda i: (i, "::numeric"))))
    def check(case: tuple[Any, str]) -> None:
        value, cast = case
        sent = jsoncodec.dumps_postgres({"v": value}, UTC)
        row = conn.execute("SELECT (%s::jsonb -> 'v')::text", (sent,)).fetchone()
        assert row is not None and row[0] == to_json(conn, value, cast, function="to_jsonb")

    check()


TYPED = """
CREATE TABLE typed (
    id int PRIMARY KEY, b bytea, d date, i interval, n numeric, u uuid, at timestamptz[],
    ft float8[], nn numeric[], tm time, ts timestamp, tz timetz, big numeric, doc jsonb,
    flag bool, grid int[], none text, text text, words text[]
)
"""
# Names in jsonb's key order (shorter first): a custom event's data object, which
# cdc_hooks.send takes as jsonb, then has the same order as the table's.
TYPED_COLUMNS = ["b", "d", "i", "n", "u", "at", "ft", "nn", "tm", "ts", "tz", "big", "doc", "flag",
                 "grid", "none", "text", "words"]
TYPED_HOOKS = f"""
[[hooks]]
name = "typed"
table = "typed"
provides = {TYPED_COLUMNS}

[[hooks]]
name = "custom"
provides = {TYPED_COLUMNS}
""" + DELIVERY
VALUES: dict[str, Any] = {
    "b": b"\x00\xffx",
    "d": date(99, 1, 1),
    "i": timedelta(days=-1, seconds=5, microseconds=120),
    "n": Decimal("0E-10"),
    "u": UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
    "at": [datetime(2026, 11, 24, 3, 19, 58, 42769, tzinfo=UTC), datetime(1880, 1, 1, tzinfo=UTC),
           datetime(2026, 1, 1, 0, 0, 0, 500000, tzinfo=timezone(timedelta(hours=-3)))],
    "ft": [0.1, 1.5, -2.0, float("nan"), float("inf"), float("-inf")],
    "nn": [Decimal("0.0000001000"), Decimal("1E-8"), Decimal("-0.00"), Decimal("1E+30"),
           Decimal("NaN"), Decimal("Infinity"), Decimal(12345678901234567890123)],
    "tm": time(3, 19, 58, 42000),
    "ts": datetime(2026, 11, 24, 3, 19, 58, 500000),
    "tz": time(3, 19, 58, tzinfo=timezone(timedelta(hours=5, minutes=30))),
    "big": 2**70,
    "doc": {"b": [1, "x", None], "a": {"deep": True}},
    "flag": False,
    "grid": [[1, 2], [3, None]],
    "none": None,
    "text": 'tab\t"quoted" \\ é \U0001f600 \u2028 \x1f',
    "words": ["a", "b c"],
}


def test_a_custom_event_is_written_as_a_table_row_of_the_same_values(
        conn: Conn, make_config: Callable[..., Config], cli: Cli, receiver: Receiver) -> None:
    assert sorted(TYPED_COLUMNS, key=lambda c: (len(c), c)) == TYPED_COLUMNS
    conn.execute(TYPED)
    config = make_config(TYPED_HOOKS)
    installer.install(config)
    for hook in ("typed", "custom"):
        assert cli(config, "listeners", "add", hook, receiver.url(f"/{hook}")).exit_code == 0
    registry = Registry()
    registry.configure(config)
    relay = InProcessRelay(config).start()
    try:
        # Timestamps are written in the session's time zone, by either path.
        conn.execute("SET TIME ZONE 'Europe/Amsterdam'")
        conn.execute(psycopg.sql.SQL("INSERT INTO typed (id, {}) VALUES (1, {})").format(
            psycopg.sql.SQL(", ").join(map(psycopg.sql.Identifier, TYPED_COLUMNS)),
            psycopg.sql.SQL(", ").join(psycopg.sql.Placeholder() * len(TYPED_COLUMNS))),
            [Jsonb(v) if c == "doc" else v for c, v in VALUES.items()])
        custom = {**VALUES, "b": memoryview(VALUES["b"]), "grid": ((1, 2), (3, None))}
        Hook("custom", registry=registry).send(connection=conn, **custom)
        (table_row,) = receiver.wait_for(1, "/typed")
        (sent,) = receiver.wait_for(1, "/custom")
    finally:
        relay.stop()
    data = re.compile(rb'"data":(\{.*\})\}$')
    table_data = data.search(table_row.body).group(1)  # type: ignore[union-attr]
    assert data.search(sent.body).group(1) == table_data  # type: ignore[union-attr]
    assert b'"n":0.0000000000,' in table_data
    assert b'"at":["2026-11-24T04:19:58.042769+01:00","1880-01-01T00:19:32+00:19:32",' in table_data


def test_a_value_without_a_json_form_is_refused_naming_its_key(
        conn: Conn, make_config: Callable[..., Config]) -> None:
    config = make_config('[[hooks]]\nname = "custom"\nprovides = ["a", "b"]\n')
    installer.install(config)
    registry = Registry()
    registry.configure(config)
    hook = Hook("custom", registry=registry)
    refusals = {
        '"a" is of type set, which has no JSON form': {"a": {1}},
        '"b.x[1]" is of type object': {"b": {"x": [1, object()]}},
        '"b" has the key 1: object keys must be strings': {"b": {1: "one"}},
        '"a" must not contain NUL characters': {"a": "nul\x00"},
        '"a" must be valid Unicode text': {"a": "\udc80"},
        '"a": time 01:00:00 has a time zone without a fixed offset':
            {"a": time(1, tzinfo=ZoneInfo("Europe/Paris"))},
        '"b": 1E+131072 is beyond PostgreSQL numeric\'s range': {"b": Decimal("1E+131072")},
    }
    for needle, payload in refusals.items():
        with pytest.raises(ListenerError) as refused:
            hook.send(connection=conn, **payload)
        assert str(refused.value).startswith('send "custom": '), refused.value
        assert needle in str(refused.value)
    assert conn.execute("SELECT count(*) FROM cdc_hooks.outbox").fetchone() == (0,)


def test_cli_send_keeps_the_digits_of_a_json_number(conn: Conn, make_config: Callable[..., Config],
                                                    cli: Cli, receiver: Receiver) -> None:
    config = make_config('[[hooks]]\nname = "custom"\nprovides = ["a", "b", "c"]\n' + DELIVERY)
    installer.install(config)
    assert cli(config, "listeners", "add", "custom", receiver.url("/c")).exit_code == 0
    relay = InProcessRelay(config).start()
    try:
        result = cli(config, "send", "custom", "a:=0.00000001", "b:=0.0000001000", "c:=[1e-20]")
        assert result.exit_code == 0, result.output
        (got,) = receiver.wait_for(1, "/c")
    finally:
        relay.stop()
    assert b'"data":{"a":0.00000001,"b":0.0000001000,"c":[0.00000000000000000001]}' in got.body
