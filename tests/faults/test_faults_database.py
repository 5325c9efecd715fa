"""Database faults under a running relay: PostgreSQL restarted (a server the test
owns, never the shared one), the relay's connections killed with
pg_terminate_backend, and statements hitting a statement_timeout.

In each: nothing is lost, the relay recovers by itself, and while the fault
lasts it backs off instead of spinning (its CPU time and log lines are counted).
Recovery is measured with a probe: a row written the moment the fault ends,
for a listener of its own, and the time until it is delivered.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from faultkit import (
    FaultReceiver,
    World,
    answer,
    assert_row_order,
    check_delivered,
    cpu_seconds,
    delivery,
    record,
    scaled,
    stream_events,
)
from psycopg import sql
from receivers import OwnPostgres, RelayProcess, wait_until

pytestmark = pytest.mark.faults

class Probe:
    """A listener of its own hook (custom events): how soon the relay works again."""

    def __init__(self, world: World, receiver: FaultReceiver) -> None:
        self.world = world
        self.receiver = receiver
        world.add_listener(receiver.url("/probe"), hook="myhook")
        self.sent = 0

    def send(self) -> float:
        """Sends a probe event; returns how long until it was delivered."""
        self.sent += 1
        started = time.monotonic()
        self.world.conn.execute("SELECT cdc_hooks.send('myhook', json_build_object('n', %s)::jsonb)",
                                (self.sent,))
        self.receiver.wait_ok(self.sent, "/probe", timeout=120)
        return time.monotonic() - started


@contextmanager
def watched(relay: RelayProcess) -> Iterator[dict[str, float]]:
    """CPU seconds, wall seconds and log lines of the relay over the block."""
    cpu, wall, lines = cpu_seconds(relay.proc.pid), time.monotonic(), len(relay.log().splitlines())
    figures: dict[str, float] = {}
    yield figures
    figures["cpu"] = cpu_seconds(relay.proc.pid) - cpu
    figures["wall"] = time.monotonic() - wall
    figures["lines"] = len(relay.log().splitlines()) - lines


def assert_calm(figures: dict[str, float]) -> None:
    """The relay waited out the fault: no busy loop, and no more log lines than
    retries with a doubling backoff (two lines each at most) can make."""
    assert figures["cpu"] < 0.5 * figures["wall"], figures
    retries = 2 + math.log2(max(figures["wall"], 1.0) / 0.5)
    assert figures["lines"] <= 2 * retries + 2, figures


def settle(world: World, receiver: FaultReceiver, events: int) -> None:
    wait_until(lambda: world.settled() and len(receiver.ok_hits("/hook")) >= events,
               timeout=180, interval=0.2, message="everything delivered")


def test_postgres_restarted_mid_stream(own_world, own_postgres: OwnPostgres, relays):
    world = own_world
    rows, restarts, outage = scaled(1000, 5000), scaled(1, 3), 2.0
    world.setup(delivery(timeout=0.5))
    receiver = world.receiver()
    receiver.on("/hook", answer(delay=0.01))
    world.add_listener(receiver.url())
    probe = Probe(world, receiver)
    relay = relays(world)
    events = world.stream(rows // 2)
    recoveries, calm = [], []
    for i in range(restarts):
        receiver.wait_ok(min(events, (i + 1) * events // (restarts + 1)), "/hook")
        with watched(relay) as figures:
            own_postgres.stop("immediate" if i % 2 else "fast")  # a crash, then a clean stop
            world.conn.close()
            time.sleep(outage)  # an outage, not a blink: the relay must notice and wait
            own_postgres.start()
        calm.append(figures)
        world.conn = psycopg.connect(world.dsn, autocommit=True)
        recoveries.append(probe.send())
    events += 2 * (rows - rows // 2)
    for start in range(rows // 2 + 1, rows + 1, 100):
        world.insert(start, min(rows, start + 99))
        world.move(start, min(rows, start + 99))
    settle(world, receiver, events)

    lost, duplicates = check_delivered(receiver.hits("/hook"), stream_events(rows))
    assert lost == 0
    assert relay.running, relay.log()
    for figures in calm:
        assert_calm(figures)
    log = relay.log()
    assert log.count("unavailable") == restarts and log.count("reachable again") == restarts, log
    assert "Traceback" not in log
    assert_row_order(receiver.hits("/hook"))
    world.assert_no_leaks()
    record("PostgreSQL restarted mid-stream", f"{restarts} x restart ({outage:g} s down; fast and "
           "immediate stop), own server", events=events, faults=restarts, lost=lost,
           duplicates=duplicates, recovery=max(recoveries),
           notes=f"relay CPU while down {max(f['cpu'] / f['wall'] for f in calm):.0%} of one core, "
                 f"{max(int(f['lines']) for f in calm)} log lines per outage")


def relay_backends(world: World, *spared: int | None) -> list[int]:
    """Backends of the database but the test's own (the relay's, its maintenance's)."""
    mine = [pid for pid in (world.conn.info.backend_pid, world.notifies.pid, *spared) if pid]
    return [r[0] for r in world.conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        " AND backend_type = 'client backend' AND pid <> ALL(%s)", (mine,))]


def terminate(world: World, pids: list[int]) -> int:
    return sum(1 for (done,) in world.conn.execute(
        "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) pid", (pids,)) if done)


def test_connections_killed_with_pg_terminate_backend(world, relays):
    rows, rounds = scaled(1000, 5000), scaled(3, 10)
    world.setup(delivery(timeout=0.5))
    receiver = world.receiver()
    receiver.on("/hook", answer(delay=0.005))
    world.add_listener(receiver.url())
    probe = Probe(world, receiver)
    relay = relays(world)
    events = 2 * rows
    killed, recoveries, calm = 0, [], []
    with psycopg.connect(world.dsn, autocommit=True) as writer:
        spare = writer.info.backend_pid
        for i in range(rounds):
            part = range(i * rows // rounds + 1, (i + 1) * rows // rounds + 1)
            world.insert(part[0], part[-1], conn=writer)
            world.move(part[0], part[-1], conn=writer)
            receiver.wait_ok(len(receiver.ok_hits("/hook")) + 50, "/hook")  # mid-stream
            with watched(relay) as figures:
                killed += terminate(world, relay_backends(world, spare))
                recoveries.append(probe.send())
            calm.append(figures)
    settle(world, receiver, events)

    lost, duplicates = check_delivered(receiver.hits("/hook"), stream_events(rows))
    assert lost == 0
    assert killed >= rounds * 4, "each round killed the relay's connections"
    assert relay.running and "Traceback" not in relay.log(), relay.log()
    for figures in calm:
        assert figures["lines"] <= 5, figures
    assert_row_order(receiver.hits("/hook"))
    world.assert_no_leaks()
    record("Relay's connections killed", f"{rounds} x pg_terminate_backend of every relay "
           "connection, mid-stream", events=events, faults=killed, lost=lost,
           duplicates=duplicates, recovery=max(recoveries),
           notes="faults: connections killed; recovery: a change written at the kill, delivered")


def test_statement_timeout_hit(world, relays):
    """statement_timeout 500 ms for the relay's sessions, and the deliveries table
    locked for a while: every relay statement that touches it times out."""
    rows, hold = scaled(1000, 3000), float(scaled(3, 10))
    world.setup(delivery(timeout=0.5))
    receiver = world.receiver()
    receiver.on("/hook", answer(delay=0.005))
    world.add_listener(receiver.url())
    probe = Probe(world, receiver)
    database = sql.Identifier(world.scalar("SELECT current_database()"))
    world.conn.execute(sql.SQL("ALTER DATABASE {} SET statement_timeout = '500ms'").format(database))
    try:
        relay = relays(world)  # its sessions start with the timeout
        events = world.stream(rows // 2)
        receiver.wait_ok(events // 4, "/hook")
        with watched(relay) as figures, world.conn.transaction():
            world.conn.execute("LOCK TABLE cdc_hooks.deliveries IN ACCESS EXCLUSIVE MODE")
            with psycopg.connect(world.dsn, autocommit=True) as writer:  # the app writes on
                writer.execute("SET statement_timeout = 0")
                for start in range(rows // 2 + 1, rows + 1, 100):
                    world.insert(start, min(rows, start + 99), conn=writer)
                    world.move(start, min(rows, start + 99), conn=writer)
            time.sleep(hold)
        recovery = probe.send()
        events = 2 * rows
        settle(world, receiver, events)
        log = relay.log()
    finally:
        world.conn.execute(sql.SQL("ALTER DATABASE {} RESET statement_timeout").format(database))

    lost, duplicates = check_delivered(receiver.hits("/hook"), stream_events(rows))
    assert lost == 0
    assert "canceling statement due to statement timeout" in log, log
    assert relay.running and "Traceback" not in log, log
    assert_calm(figures)
    world.assert_no_leaks()
    record("Statement timeout hit", f"statement_timeout 500 ms, deliveries table locked {hold:g} s "
           "mid-stream", events=events, faults=1, lost=lost, duplicates=duplicates,
           recovery=recovery,
           notes=f"relay CPU during the lock {figures['cpu'] / figures['wall']:.0%} of one core, "
                 f"{int(figures['lines'])} log lines")



def test_backoff_starts_short_again_after_a_healthy_spell(world, in_process, caplog,
                                                        monkeypatch):
    """Outages hours apart each get the quick first retry: the backoff of an
    earlier outage must not carry over (it did: every outage after a few
    earlier ones waited MAX_BACKOFF before the first retry)."""
    from cdc_hooks.relay import relay as relay_module

    monkeypatch.setattr(relay_module, "MAX_BACKOFF", 2.0)  # a healthy spell: > 2 s connected
    world.setup(delivery(timeout=0.5))
    receiver = world.receiver()
    probe = Probe(world, receiver)
    caplog.set_level("INFO", logger="cdc_hooks.relay")
    in_process()
    probe.send()
    outages = 3
    for _ in range(outages):
        assert terminate(world, relay_backends(world)) >= 1
        probe.send()
        time.sleep(2.2)  # healthy for longer than the longest backoff
    waits = [float(m.group(1)) for m in (
        re.search(r"reachable again after ([\d.]+) s", r.getMessage()) for r in caplog.records) if m]
    assert len(waits) == outages, caplog.text
    # 0.5 s each (plus a connect); carried over, they would be 0.5, 1 and 2 s.
    assert max(waits) < 1.4, f"first retries waited {waits} s: the backoff carried over"
