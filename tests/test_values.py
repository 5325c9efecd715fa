"""Values as PostgreSQL writes them (issue 13, items 3 and 7), against real PostgreSQL.

A listener gets each number with the very digits PostgreSQL's to_json gives
(0.0000000000, not 0E-10). The reference is always PostgreSQL itself: generated
values are written by the server and by cdc_hooks, then compared text for text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from click.testing import Result
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from receivers import InProcessRelay, Receiver, wait_until

from cdc_hooks import install as installer
from cdc_hooks import jsoncodec
from cdc_hooks.config import Config
from cdc_hooks.hooks import Hook, Registry
from cdc_hooks.match import Is

Conn = psycopg.Connection[Any]
Cli = Callable[..., Result]

DELIVERY = """
[delivery]
allow_private_networks = true
retry_schedule = [0.2]
timeout = 5
"""


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
