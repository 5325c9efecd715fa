"""The circuit breaker: the relay's view of the shared circuits (pure logic), and
the queries that keep each listener's circuit row (real PostgreSQL). The relay's
use of them, end to end, is in test_relay.py."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from cdc_hooks import install as installer
from cdc_hooks.config import Config, DeliveryConfig
from cdc_hooks.db import Database, RelayStore
from cdc_hooks.relay.circuit import FIRST_PAUSE, MAX_PAUSE, PROBE_RECHECK, Circuits, verdict

# The view: rows as circuit_states / record_circuits return them ------------------


@dataclass
class R:  # what tally reads of a relay.Result
    listener_id: int
    verdict: str | None
    delivery_id: int = 0
    error: str | None = None
    code: int | None = 500


def row(listener_id: int, seconds: float | None, *, failures: int = 0, probe_held: bool = False,
        live: bool = True, transition: str | None = None) -> tuple[Any, ...]:
    return (listener_id, seconds, probe_held, failures, "HTTP 500", 1.0, live, transition)


def test_a_success_of_a_closed_circuit_without_failures_writes_nothing() -> None:
    circuits = Circuits(3)
    rows, new = circuits.tally([R(1, "answered"), R(2, "answered", code=200)])
    assert (rows, new) == ([], [])


def test_a_batch_counts_requests_failures_and_failures_after_the_last_answer() -> None:
    circuits = Circuits(3)
    batch = [R(1, "failed", error="timed out"), R(1, "answered"), R(1, "failed", code=502),
             R(1, "failed"), R(2, None), R(3, "answered")]
    rows, new = circuits.tally(batch)
    assert rows == [[1, 4, 3, 2, None, "HTTP 500"]] and new == [1]  # 2: not sent; 3: no circuit
    circuits.note([row(3, None, failures=1)], now=0.0)  # 3 has failures lately: counted
    assert circuits.tally([R(3, "answered")]) == ([[3, 1, 0, 0, None, None]], [])


def test_open_holds_the_listener_until_this_relay_takes_the_probe() -> None:
    circuits = Circuits(3)
    changed = circuits.note([row(1, 2.0, failures=5, transition="opened")], now=10.0)
    circuit = circuits.get(1)
    assert changed == [(1, circuit, "opened")] and circuit is not None
    assert circuit.admits() == "hold"
    assert circuits.due_probes(11.0, {1}) == [] and circuits.next_change(11.0) == 1.0
    assert circuits.due_probes(12.0, {1}) == [1]
    circuits.taken({1}, [1], now=12.0)
    assert circuit.admits() == "probe"
    circuit.probe = 42  # sent
    assert circuit.admits() == "hold" and circuits.due_probes(99.0, {1}) == []
    rows, _ = circuits.tally([R(1, "failed", delivery_id=42)])
    assert rows == [[1, 1, 1, 1, "failed", "HTTP 500"]] and not circuit.probing
    circuits.taken({1}, [1], now=20.0)
    circuit.probe = 43
    assert circuits.tally([R(1, None, delivery_id=43)]) == ([], [])  # never sent: not a probe
    assert not circuit.probing


def test_a_probe_held_elsewhere_or_with_nothing_to_send_is_asked_for_again_later() -> None:
    circuits = Circuits(3)
    circuits.note([row(1, 0.0, failures=5), row(2, 0.0, failures=5)], now=100.0)
    circuits.taken(set(), [1], now=105.0)  # another relay holds it
    assert circuits.due_probes(105.0, {1, 2}) == [2]
    assert circuits.due_probes(105.0 + PROBE_RECHECK, {1}) == [1]
    circuits.taken({2}, [2], now=105.0)
    assert circuits.unsent_probes() == [2]
    circuits.give_back([2], now=105.0)
    assert circuits.get(2).admits() == "hold" and circuits.due_probes(105.0, {2}) == []


def test_its_own_failures_at_the_threshold_hold_sends_until_recorded() -> None:
    circuits = Circuits(3)
    for told in ("failed", "failed", "answered", "failed", "failed"):
        circuits.saw(1, told)
    assert not circuits.suspect(1)
    circuits.saw(1, "failed")
    assert circuits.suspect(1)
    circuits.recorded([[1, 3, 1, 2, None, "HTTP 500"]])  # 2 of them on record
    circuits.note([row(1, None, failures=2)], now=0.0)
    assert circuits.suspect(1)  # 2 on record, 1 not yet
    circuits.recorded([[1, 1, 1, 1, None, "HTTP 500"]])
    circuits.note([row(1, None, failures=3)], now=0.0)  # the record says: closed still
    assert not circuits.suspect(1)


def test_a_complete_load_forgets_circuits_that_closed_elsewhere() -> None:
    circuits = Circuits(3)
    circuits.note([row(1, 3.0, failures=5), row(2, None, failures=1)], now=0.0)
    changed = circuits.note([row(2, None, failures=2)], now=1.0, complete=True)
    assert [(i, t) for i, _, t in changed] == [(1, None)] and circuits.get(1) is None
    assert circuits.note([row(2, None, live=False)], now=2.0) == [] and circuits.get(2) is None


def test_what_a_request_tells_of_its_receiver() -> None:
    assert verdict(None, retryable=True) == "failed"  # no answer: timeout, refused, TLS
    assert verdict(503, retryable=True) == "failed"
    assert verdict(None, retryable=False) is None  # refused by the network policy: not sent
    assert verdict(404, retryable=True) == "answered"  # an answer: the receiver is up
    assert verdict(200, retryable=True) == "answered"


# The shared row: record_circuits, take_probes ------------------------------------

SETTINGS = {"threshold": 3, "rate": 0.5, "window": 30.0, "first_pause": FIRST_PAUSE,
            "max_pause": MAX_PAUSE}


@pytest.fixture
def dsn(make_config: Any) -> str:
    config: Config = make_config("")
    installer.install(config)
    assert config.dsn
    return config.dsn


def record(dsn: str, *batches: list[list[Any]], settings: dict[str, float] = SETTINGS
           ) -> list[list[tuple[Any, ...]]]:
    """Each batch recorded by a relay of its own, all at once; rows returned per batch."""

    async def one(batch: list[list[Any]]) -> list[tuple[Any, ...]]:
        store = await RelayStore.connect(dsn)
        try:
            return await store.record_circuits(batch, [r[0] for r in batch], settings)
        finally:
            await store.close()

    async def every() -> list[list[tuple[Any, ...]]]:
        return list(await asyncio.gather(*(one(b) for b in batches)))

    return asyncio.run(every())


def state(dsn: str, listener_id: int = 1) -> tuple[Any, ...]:
    with psycopg.connect(dsn) as conn:
        found = conn.execute("SELECT failures, requests, failed, open_until IS NOT NULL, pause"
                             " FROM cdc_hooks.circuits WHERE listener_id = %s",
                             (listener_id,)).fetchone()
    assert found is not None
    return found


def failures(n: int, listener_id: int = 1) -> list[Any]:
    return [listener_id, n, n, n, None, "HTTP 500"]


def test_relays_open_it_after_the_threshold_in_total(dsn: str) -> None:
    record(dsn, [failures(1)], [failures(1)])
    assert state(dsn) == (2, 2, 2, False, 0.0)
    (opened,), = record(dsn, [failures(1)])
    assert opened[7] == "opened" and 0 < opened[1] <= FIRST_PAUSE
    assert state(dsn) == (3, 3, 3, True, FIRST_PAUSE)
    (late,), = record(dsn, [failures(1)])  # sent before it opened: no longer pause
    assert late[7] is None and state(dsn)[3:] == (True, FIRST_PAUSE)


def test_many_relays_at_once_add_up(dsn: str) -> None:
    record(dsn, *[[failures(1, listener_id)] for listener_id in (1, 2) for _ in range(5)],
           settings={**SETTINGS, "threshold": 100})
    assert state(dsn, 1)[:3] == state(dsn, 2)[:3] == (5, 5, 5)


def test_a_low_failure_rate_keeps_it_closed(dsn: str) -> None:
    record(dsn, [failures(1)])
    record(dsn, [[1, 4, 0, 0, None, None]])  # four answers
    (opened,), = record(dsn, [failures(3)])  # three in a row, 4 of 8 requests: 50%
    assert opened[7] == "opened"
    with psycopg.connect(dsn) as conn:
        conn.execute("DELETE FROM cdc_hooks.circuits")
    record(dsn, [failures(1)])
    record(dsn, [[1, 5, 0, 0, None, None]])
    (kept,), = record(dsn, [failures(3)])  # 4 of 9
    assert kept[7] is None and state(dsn)[:4] == (3, 9, 4, False)


def test_a_failed_probe_doubles_the_pause_and_an_answer_closes_it(dsn: str) -> None:
    record(dsn, [failures(3)])
    pauses = []
    for _ in range(8):
        (reopened,), = record(dsn, [[1, 1, 1, 1, "failed", "timed out"]])
        assert reopened[7] == "reopened"
        pauses.append(state(dsn)[4])
    assert pauses[:3] == [2 * FIRST_PAUSE, 4 * FIRST_PAUSE, 8 * FIRST_PAUSE]
    assert pauses[-1] == MAX_PAUSE
    (closed,), = record(dsn, [[1, 2, 1, 0, None, "timed out"]])  # an answer, from any request
    assert closed[7] == "closed" and closed[1] is None
    assert state(dsn)[0] == 0 and state(dsn)[3:] == (False, 0.0)


def test_one_relay_takes_the_probe(dsn: str) -> None:
    with Database.connect(dsn) as db:
        db.conn.execute("INSERT INTO cdc_hooks.deliveries (event_id, listener_id) VALUES (1, 1)")
    record(dsn, [failures(3)])
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE cdc_hooks.circuits SET open_until = now()")

    async def take() -> set[int]:
        store = await RelayStore.connect(dsn)
        try:
            return await store.take_probes([1], 10.0)
        finally:
            await store.close()

    async def race() -> list[set[int]]:
        return list(await asyncio.gather(*(take() for _ in range(4))))

    assert sorted(map(len, asyncio.run(race()))) == [0, 0, 0, 1]
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT probe_until > now() FROM cdc_hooks.circuits").fetchone() == (True,)


def test_defaults() -> None:
    delivery = DeliveryConfig()
    assert (delivery.circuit_breaker, delivery.circuit_failure_rate, delivery.circuit_window) == (
        5, 0.5, 30.0)
