"""What schema version 14 keeps in fewer bytes: an event's body without its
envelope, which SQL's cdc_hooks.event_body puts back byte for byte (so that a
delivery claimed later, the API and the pages show exactly what dispatch sent),
and a first attempt that delivered on its delivery instead of the attempt log."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdc_hooks import install as installer
from cdc_hooks import jsoncodec
from cdc_hooks.db import InstalledHook, query
from cdc_hooks.relay.events import Event, expand

PERSON = InstalledHook("person", "public", "person", ("insert", "update", "delete", "truncate"),
                       ("name", "doc"), ("id",), ())
MYHOOK = InstalledHook("myhook", None, None, (), ("message",), (), ())
AT = datetime(2026, 12, 3, 19, 11, 42, 305262, tzinfo=UTC)


def events(kind: str, payload: dict[str, Any], at: datetime = AT, max_bytes: int = 1 << 20,
           hook: InstalledHook | None = PERSON) -> list[Event]:
    return list(expand(7, hook, kind, jsoncodec.dumps_decoded(payload), at, max_bytes))


def rebuilt(conn: psycopg.Connection[Any], event: Event) -> str:
    row = conn.execute("SELECT cdc_hooks.event_body(%s, %s, %s, %s, %s::json)",
                       (event.id, event.hook, event.kind, event.occurred_at, event.stored)).fetchone()
    assert row is not None
    return str(row[0])


@pytest.fixture
def installed(conn: psycopg.Connection[Any], make_config: Any) -> psycopg.Connection[Any]:
    installer.install(make_config('[[hooks]]\nname = "myhook"\nprovides = ["message"]\n'))
    conn.execute("SET TimeZone = 'America/St_Johns'")  # -03:30: the body's time is in UTC anyway
    return conn


CASES = {
    "insert": ("insert", {"new": {"id": [1], "name": ["Ann"], "doc": [None]}}),
    "update with changes and a new key": (
        "update", {"new": {"id": [2], "name": ["Bo"], "doc": [{"a": [1.50, "é\u2028"]}]},
                   "old": {"id": [1], "name": ["Bob"], "doc": [None]}}),
    "delete": ("delete", {"old": {"id": [3], "name": ["Cy"], "doc": [None]}}),
    "truncate": ("truncate", {}),
    "custom": ("myhook", {"data": {"message": "hi \"there\""}}),
}
HOOKS = {"myhook": MYHOOK}


@pytest.mark.parametrize("case", CASES)
def test_the_stored_body_is_the_body_without_its_envelope(installed, case):
    kind, payload = CASES[case]
    (event,) = events(kind, payload, hook=HOOKS.get(kind, PERSON))
    assert event.stored.startswith('{"key":') and len(event.stored) < len(event.body)
    assert rebuilt(installed, event) == event.body
    body = jsoncodec.loads(event.body)
    assert list(body)[:6] == ["id", "hook", "event", "created", "occurred_at", "key"]
    assert body["occurred_at"] == "2026-12-03T19:11:42.305262+00:00"


def test_markers_are_stored_the_same_way(installed):
    (event,) = events("insert", {"new": {"id": [1], "name": ["x" * 500], "doc": [None]}},
                      max_bytes=300)
    assert jsoncodec.loads(event.body)["truncated"] == {"reason": "size", "bytes": len(
        events("insert", {"new": {"id": [1], "name": ["x" * 500], "doc": [None]}})[0].body)}
    assert rebuilt(installed, event) == event.body


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(at=st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1),
                       timezones=st.builds(lambda m: timezone(timedelta(minutes=m)),
                                           st.integers(-14 * 60, 14 * 60))),
       whole_second=st.booleans())
def test_any_time_of_an_event_comes_back_as_dispatch_wrote_it(installed, at, whole_second):
    at = at.replace(microsecond=0) if whole_second else at
    (event,) = events("insert", {"new": {"id": [1], "name": ["Ann"], "doc": [None]}}, at=at)
    assert rebuilt(installed, event) == event.body


def test_a_body_kept_whole_before_version_14_is_returned_as_it_is(installed):
    whole = '{"id":"evt_1000","hook":"person","event":"insert","created":true,"key":{"id":1}}'
    assert installed.execute("SELECT cdc_hooks.event_body(1000, 'person', 'insert', now(), %s::json)",
                             (whole,)).fetchone() == (whole,)


def test_only_a_first_attempt_that_delivered_on_record_stays_off_the_attempt_log(installed):
    conn = installed
    ids = [row[0] for row in conn.execute(
        "INSERT INTO cdc_hooks.deliveries (event_id, listener_id, attempts, claimed_by)"
        " SELECT g, 1, a, 7 FROM unnest(ARRAY[1, 1, 2, 1]) WITH ORDINALITY AS x (a, g)"
        " RETURNING id").fetchall()]
    first, failed, lost, later = ids
    conn.execute("UPDATE cdc_hooks.deliveries SET attempts = 2 WHERE id = %s", (later,))
    conn.execute(query("record_results"), {"results": jsoncodec.dumps_decoded([
        [first, 1, "delivered", None, 200, None, 5.5, "ok", 7],  # 7: the claiming relay session
        [failed, 1, "pending", 5, 500, "HTTP 500", 6.5, "no", 7],
        [lost, 1, "delivered", None, 200, None, 7.5, "ok", 7],  # claimed again since: attempt 2
        [later, 2, "delivered", None, 204, None, 8.5, None, 7]])})
    assert conn.execute("SELECT delivery_id, status_code, duration_ms FROM cdc_hooks.attempts"
                        " ORDER BY delivery_id").fetchall() == [
        (failed, 500, 6.5), (lost, 200, 7.5), (later, 204, 8.5)]
    assert conn.execute("SELECT id, status, first_try_ms, first_try_response, next_attempt_at IS NULL"
                        " FROM cdc_hooks.deliveries WHERE status <> 'pending' ORDER BY id").fetchall() == [
        (first, "delivered", 5.5, "ok", True), (later, "delivered", None, None, True)]
    assert conn.execute("SELECT status_code, duration_ms, response FROM cdc_hooks.attempt_log"
                        " WHERE delivery_id = %s", (first,)).fetchall() == [(200, 5.5, "ok")]
