"""Claims belong to a relay's database session (issue 14, item 1), and
listener_concurrency holds across relays (item 3): the statements of
sql/queries.sql on a real PostgreSQL, each relay session on a connection of its
own. The relays themselves under SIGKILL, killed sessions and three processes
are in tests/faults/test_faults_failover.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from receivers import wait_until

from cdc_hooks.config import Config, DeliveryConfig
from cdc_hooks.db import query
from cdc_hooks.relay.http import Target
from cdc_hooks.relay.relay import Listener, Relay
from cdc_hooks.signing import generate_secret

Conn = psycopg.Connection[Any]
HOOKS = '[[hooks]]\nname = "myhook"\nprovides = ["n"]\n'
LEASE = 60.0


@pytest.fixture
def hook_installed(installed: Callable[..., Config]) -> Config:
    return installed(HOOKS)


@pytest.fixture
def sessions(clean_db: str) -> Iterator[Callable[[], tuple[Conn, int]]]:
    """new() -> (connection, relay session id): a relay session of its own."""
    opened: list[Conn] = []

    def new() -> tuple[Conn, int]:
        session = psycopg.connect(clean_db, autocommit=True)
        opened.append(session)
        row = session.execute(query("register_relay_session")).fetchone()
        assert row is not None and row[1] is True
        return session, int(row[0])

    yield new
    for session in opened:
        session.close()


def add_listener(conn: Conn) -> int:
    row = conn.execute("INSERT INTO cdc_hooks.listeners (hook, url, secret) VALUES"
                       " ('myhook', 'http://127.0.0.1:9/', %s) RETURNING id",
                       (generate_secret(),)).fetchone()
    assert row is not None
    return int(row[0])


def pending_delivery(conn: Conn, listener: int, event: int = 1000) -> int:
    conn.execute("INSERT INTO cdc_hooks.events (id, hook, kind, body, occurred_at)"
                 " VALUES (%s, 'myhook', 'send', '{}', now())", (event,))
    row = conn.execute("INSERT INTO cdc_hooks.deliveries (event_id, listener_id, queued_behind)"
                       " VALUES (%s, %s, false) RETURNING id", (event, listener)).fetchone()
    assert row is not None
    return int(row[0])


def claim(conn: Conn, session: int, listener: int) -> list[tuple[Any, ...]]:
    return conn.execute(query("claim_deliveries"), {
        "listener_ids": [listener], "slots": [10], "total": 10, "lease": LEASE,
        "session": session}).fetchall()


def record(conn: Conn, session: int, delivery: int, attempt: int, code: int) -> None:
    conn.execute(query("record_results"), {"results": json.dumps(
        [[delivery, attempt, "delivered", None, code, None, 1.0, "ok", session]])})


def state(conn: Conn, delivery: int) -> tuple[Any, ...]:
    row = conn.execute("SELECT status, attempts, claimed_by, last_status,"
                       " next_attempt_at <= now() FROM cdc_hooks.deliveries WHERE id = %s",
                       (delivery,)).fetchone()
    assert row is not None
    return tuple(row)


def take_over(conn: Conn, session: int) -> tuple[int, int, int]:
    row = conn.execute(query("take_over_sessions"), {"session": session}).fetchone()
    assert row is not None
    return row[0], row[1], row[2]


def taken_over(conn: Conn, session: int) -> tuple[int, int, int]:
    """The first take-over that finds a session ended (its backend exits soon after
    its client closed the connection)."""
    return wait_until(lambda: (found := take_over(conn, session))[1] and found,
                      message="a take-over")


def test_an_ended_sessions_claims_are_due_at_once_and_its_results_fenced_off(
        conn, hook_installed, sessions):
    listener = add_listener(conn)
    delivery = pending_delivery(conn, listener)
    old, old_id = sessions()
    new, new_id = sessions()
    assert [r[0] for r in claim(old, old_id, listener)] == [delivery]
    assert state(conn, delivery) == ("pending", 1, old_id, None, False)
    assert take_over(new, new_id) == (2, 0, 0), "a live session keeps its claims"

    old.close()
    # Its backend is gone once the lock is free: the take-over makes the claim due
    # at once, keeping the attempt it spent.
    assert taken_over(new, new_id) == (1, 1, 1)
    assert state(conn, delivery) == ("pending", 1, None, None, True)
    assert conn.execute("SELECT array_agg(id) FROM cdc_hooks.relay_sessions").fetchone() == (
        [new_id],)

    assert [r[3] for r in claim(new, new_id, listener)] == [2]
    # The old relay, still running on another connection, answers late: neither its
    # result (its attempt, or even the new one's number) nor a release lands.
    record(conn, old_id, delivery, 1, 202)
    record(conn, old_id, delivery, 2, 202)
    conn.execute(query("release_deliveries"), {"ids": [delivery], "session": old_id})
    conn.execute(query("renew_leases"), {"ids": [delivery], "attempts": [2], "lease": 0,
                                         "session": old_id})
    assert state(conn, delivery) == ("pending", 2, new_id, None, False)
    assert conn.execute("SELECT count(*) FROM cdc_hooks.attempts WHERE delivery_id = %s",
                        (delivery,)).fetchone() == (2,), "the late results are in the log"
    record(conn, new_id, delivery, 2, 200)
    assert state(conn, delivery)[:4] == ("delivered", 2, None, 200)


def carry_over(conn: Conn, old: int, session: int) -> tuple[bool, int]:
    row = conn.execute(query("carry_over_session"), {"old": old, "session": session}).fetchone()
    assert row is not None
    return row[0], row[1]


def test_a_reconnecting_relay_carries_its_claims_over_unless_taken_over(
        conn, hook_installed, sessions):
    """A relay that lost its connection keeps what it claimed (its requests in
    flight are not sent again), but never what another relay took over."""
    listener = add_listener(conn)
    delivery = pending_delivery(conn, listener)
    old, old_id = sessions()
    claim(old, old_id, listener)
    old.close()
    new, new_id = sessions()
    assert wait_until(lambda: carry_over(new, old_id, new_id)[0],
                      message="the old session's lock free")
    assert state(conn, delivery) == ("pending", 1, new_id, None, False)
    assert take_over(new, new_id) == (1, 0, 0), "nothing left to take over"
    record(conn, new_id, delivery, 1, 200)  # the in-flight result, under the new session
    assert state(conn, delivery)[:4] == ("delivered", 1, None, 200)

    second = pending_delivery(conn, listener, 1001)
    lost, lost_id = sessions()
    claim(lost, lost_id, listener)
    lost.close()
    other, other_id = sessions()
    taken_over(other, other_id)
    again, again_id = sessions()
    assert carry_over(again, lost_id, again_id) == (False, 0)
    assert state(conn, second)[2] is None, "taken over: due for any relay, not carried"


def test_a_release_gives_back_the_attempt_only_in_the_claiming_session(
        conn, hook_installed, sessions):
    listener = add_listener(conn)
    delivery = pending_delivery(conn, listener)
    relay, relay_id = sessions()
    claim(relay, relay_id, listener)
    relay.execute(query("release_deliveries"), {"ids": [delivery], "session": relay_id})
    assert state(conn, delivery) == ("pending", 0, None, None, True)


def slots(conn: Conn, session: int, wants: dict[int, tuple[int, int]], cap: int) -> dict[int, int]:
    rows = conn.execute(query("take_slots"), {
        "session": session, "listener_ids": list(wants), "wants": [w for w, _ in wants.values()],
        "floors": [f for _, f in wants.values()], "cap": cap}).fetchall()
    return dict(rows)


def held(conn: Conn, listener: int) -> dict[int, int]:
    return dict(conn.execute("SELECT session_id, slots FROM cdc_hooks.listener_slots"
                             " WHERE listener_id = %s", (listener,)).fetchall())


def test_listener_slots_never_add_up_to_more_than_the_limit(conn, hook_installed, sessions):
    listener = add_listener(conn)
    (a, a_id), (b, b_id), (c, c_id) = sessions(), sessions(), sessions()
    # Three relays, listener_concurrency 2: an even share is 1, rounded up; the
    # third finds none left.
    assert slots(a, a_id, {listener: (1, 0)}, 2) == {listener: 1}
    assert slots(b, b_id, {listener: (1, 0)}, 2) == {listener: 1}
    assert slots(c, c_id, {listener: (1, 0)}, 2) == {listener: 0}
    assert held(conn, listener) == {a_id: 1, b_id: 1}
    # Wanting more than the share gets the share; giving up keeps what is in flight.
    assert slots(a, a_id, {listener: (2, 1)}, 2) == {listener: 1}
    assert slots(b, b_id, {listener: (0, 1)}, 2) == {listener: 1}
    assert slots(b, b_id, {listener: (0, 0)}, 2) == {listener: 0}
    assert slots(c, c_id, {listener: (1, 0)}, 2) == {listener: 1}
    assert held(conn, listener) == {a_id: 1, c_id: 1}
    # A session that ends gives its slots back with its take-over.
    a.close()
    taken_over(c, c_id)
    assert held(conn, listener) == {c_id: 1}
    # A listener removed takes its slots with it.
    conn.execute("DELETE FROM cdc_hooks.listeners WHERE id = %s", (listener,))
    assert held(conn, listener) == {}


def test_resuming_a_listener_leaves_its_claims_alone_whatever_their_lease(
        conn, hook_installed, sessions):
    """A claim's lease may be far out ([delivery] timeout 300 s: 2,730 s): resuming
    the listener must not give its attempt budget back under the request."""
    listener = add_listener(conn)
    delivery = pending_delivery(conn, listener)
    relay, relay_id = sessions()
    relay.execute(query("claim_deliveries"), {"listener_ids": [listener], "slots": [1],
                                              "total": 1, "lease": 2730.0, "session": relay_id})
    conn.execute(query("resume_listener_deliveries"), {"id": listener})
    assert state(conn, delivery)[:3] == ("pending", 1, relay_id)
    # A retry scheduled far out, not claimed, is due at once with a fresh budget.
    conn.execute("UPDATE cdc_hooks.deliveries SET claimed_by = NULL,"
                 " next_attempt_at = now() + interval '1 hour' WHERE id = %s", (delivery,))
    conn.execute(query("resume_listener_deliveries"), {"id": listener})
    assert state(conn, delivery) == ("pending", 0, None, None, True)


class SlotsOnRecord:
    """take_slots as the database answers it when the others leave nothing free:
    the floor (the relay's pure logic, without PostgreSQL)."""

    def __init__(self) -> None:
        self.asked: list[dict[int, tuple[int, int]]] = []

    async def take_slots(self, session: int, wants: dict[int, tuple[int, int]],
                         cap: int) -> dict[int, int]:
        self.asked.append(dict(wants))
        return {listener_id: floor for listener_id, (_, floor) in wants.items()}


def test_a_relay_gives_up_a_share_as_its_requests_in_flight_end() -> None:
    """A relay that held a listener's whole limit while busy kept it for good (its
    floor, the requests in flight, refilled as each ended): a second relay got none."""
    relay = Relay(Config(dsn="postgresql://x", delivery=DeliveryConfig(listener_concurrency=4)))
    relay.listeners = {7: Listener(7, "myhook", "http://x/", {}, Target("http://x/", b"k"), True)}
    relay._slots, relay._slots_held = {7: 4}, {7: 4}
    relay._in_flight[7] = 4
    relay._sessions = 2  # another relay came: the share is 2
    store = SlotsOnRecord()
    asyncio.run(relay._take_slots(store))  # type: ignore[arg-type]
    assert store.asked[-1] == {7: (2, 4)}, "on record for the 4 requests still in flight"
    assert (relay._slots, relay._slots_held, relay._slots_short) == ({7: 2}, {7: 4}, True)
    relay._in_flight[7] = 1  # admitted since: at most 2
    asyncio.run(relay._take_slots(store))  # type: ignore[arg-type]
    assert store.asked[-1] == {7: (2, 2)}
    assert (relay._slots, relay._slots_held, relay._slots_short) == ({7: 2}, {7: 2}, False)
