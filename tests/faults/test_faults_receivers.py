"""Receivers misbehaving, next to a healthy one.

Each bad receiver gets its own listener (matching a share of the events); a
healthy listener gets every event. The healthy listener's deliveries/s are
measured first without the bad listeners, then with them, in the same run:
the ratio is reported and only a generous floor is asserted (speed belongs to
bench/). Every event of a bad listener ends on record: delivered, or retried
per the schedule and dead-lettered (410 Gone: the listener is disabled and the
rest held), or held by the listener's open circuit (waiting for its probe without
spending an attempt: every attempt on record is a request made), never dropped.

The short form runs all the bad receivers at once (the global concurrency is
sized so that they cannot take every slot: that is what listener_concurrency
is for); the full form also runs each alone with the default concurrency.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from faultkit import (
    FULL,
    FaultReceiver,
    World,
    answer,
    assert_row_order,
    check_delivered,
    delivery,
    drip,
    endless,
    flaky,
    flaky_hanging,
    hang,
    peak_rss_mb,
    record,
    refusing_port,
    retry_after_once,
    scaled,
    self_signed_context,
)
from receivers import wait_until

pytestmark = pytest.mark.faults

TIMEOUT = 1.0
SCHEDULE = (0.3, 0.3)
ATTEMPTS = 1 + len(SCHEDULE)
# Generous floors: the healthy listener keeps at least this share of its speed alone (on a
# machine where relay, receivers and PostgreSQL share the CPUs, the bad listeners' retries,
# TLS handshakes and logs take their part of the relay's CPU).
HEALTHY_FLOOR = 0.25
HEALTHY_FLOOR_ALL_AT_ONCE = 0.15


@dataclass
class Bad:
    """A misbehaving receiver: its URL, what its deliveries must end as."""

    name: str
    injected: str
    url: str
    outcome: str  # 'dead' (retried per schedule), 'dead-at-once', 'delivered', 'retried', 'gone'
    error: str = ""  # a fragment every failed attempt's error has
    first_gap: float = 0.0  # seconds at least between the first two attempts
    listener: int = 0


class Cast:
    """The bad receivers of a run, built on demand (some need a port or a certificate)."""

    def __init__(self, world: World, healthy: FaultReceiver, tmp_path: Any) -> None:
        self.world = world
        self.healthy = healthy
        self.bad = world.receiver()
        self.tmp_path = tmp_path
        self._keep: list[Any] = []

    def make(self, name: str) -> Bad | None:
        builders: dict[str, Callable[[], Bad | None]] = {
            "500s": lambda: self._on("500s", "500 on 30% of requests", flaky(0.3, seed=7),
                                     "retried"),
            "hang": lambda: self._on("hang", f"answers after {TIMEOUT + 2.5:g} s (timeout "
                                     f"{TIMEOUT:g} s)", hang(TIMEOUT + 2.5), "dead", "timed out"),
            "slowloris": lambda: self._on("slowloris", "drips a byte every 0.1 s for 30 s",
                                          drip(0.1, 30), "dead", "timed out"),
            # Delivered on the first attempt but for a timeout of a relay busy with the rest.
            "endless": lambda: self._on("endless", "200 with an endless (8 GB) body", endless(),
                                        "delivered", "timed out"),
            "redirect": lambda: self._on("redirect", "302 to the healthy receiver", answer(
                302, headers={"Location": self.healthy.url("/stolen")}), "dead-at-once",
                "redirects are not followed"),
            "refused": self._refused,
            "tls-plain": lambda: Bad("tls-plain", "https:// to a plain-HTTP server",
                                     self.bad.url("/tls-plain", scheme="https"), "dead", ""),
            "tls-self-signed": self._self_signed,
            "gone": lambda: self._on("gone", "410 Gone", answer(410), "gone"),
            "429": lambda: self._on("429", "429 with Retry-After: 1 on each first attempt",
                                    retry_after_once(1), "retried", first_gap=1.0),
        }
        return builders[name]()

    def _on(self, name: str, injected: str, behaviour: Any, outcome: str, error: str = "",
            first_gap: float = 0.0) -> Bad:
        self.bad.on(f"/{name}", behaviour)
        return Bad(name, injected, self.bad.url(f"/{name}"), outcome, error, first_gap)

    def _refused(self) -> Bad:
        sock, port = refusing_port()
        self._keep.append(sock)
        return Bad("refused", "connection refused", f"http://127.0.0.1:{port}/", "dead",
                   "connection failed")

    def _self_signed(self) -> Bad | None:
        context = self_signed_context(self.tmp_path)
        if context is None:
            return None
        server = self.world.receiver(ssl_context=context)
        return Bad("tls-self-signed", "https:// with a self-signed certificate",
                   server.url("/self-signed"), "dead", "certificate")

    def close(self) -> None:
        for sock in self._keep:
            sock.close()


BAD_CASES = ["500s", "hang", "slowloris", "endless", "redirect", "refused", "tls-plain",
             "tls-self-signed", "gone", "429"]


def write_phase(world: World, first: int, rows: int, every: int) -> float:
    """rows inserts from id first, each `every`-th named b (the bad listeners' share);
    returns when the writing started. Vacuums first, as autovacuum would (test servers
    often run without it): otherwise the second phase pays for the first's dead index
    entries and the healthy listener seems slowed by the bad ones by 10-15% more."""
    world.conn.execute("VACUUM cdc_hooks.deliveries, cdc_hooks.events, cdc_hooks.outbox")
    started = time.monotonic()
    for start in range(first, first + rows, 100):
        world.conn.execute(
            "INSERT INTO person (id, name) SELECT i, CASE WHEN i %% %s = 0 THEN 'b' ELSE 'h' END || i"
            " FROM generate_series(%s::int, %s::int) i", (every, start, min(first + rows - 1, start + 99)))
    return started


def healthy_rate(world: World, healthy: FaultReceiver, started: float, first: int, rows: int
                 ) -> float:
    """Deliveries/s of the healthy listener (the first) for rows first.., from the first write."""
    wanted = set(range(first, first + rows))

    def arrived() -> list[Any] | None:
        # Counted before any body is parsed: the receivers share this process, and parsing
        # every body 20 times a second would slow them (and the figure) as hits pile up.
        if len(healthy.ok_hits("/healthy")) < first - 1 + rows:
            return None
        hits = [h for h in healthy.ok_hits("/healthy") if h.json["key"]["id"] in wanted]
        return hits if len({h.json["key"]["id"] for h in hits}) >= rows else None

    try:
        hits = wait_until(arrived, timeout=120, interval=0.05, message="healthy deliveries")
    except AssertionError:
        late = world.conn.execute(
            "SELECT status, attempts, last_error, next_attempt_at - now() FROM cdc_hooks.deliveries"
            " WHERE listener_id = 1 AND status <> 'delivered' LIMIT 5").fetchall()
        raise AssertionError(f"healthy deliveries missing; e.g. {late}") from None
    return rows / (max(h.done for h in hits) - started)


def check_bad(world: World, bad: Bad, events: int) -> dict[str, int]:
    """Every event of a bad listener is on record, ending as its case says."""
    rows = world.deliveries(bad.listener)
    attempts = world.attempts(bad.listener)
    # Once disabled on record (410), a listener gets no more deliveries: 'status' says so.
    assert len(rows) == events or (bad.outcome == "gone" and 0 < len(rows) <= events), \
        (bad.name, len(rows), events)
    figures = {"delivered": 0, "dead": 0, "held": 0, "waiting": 0, "failed_attempts": 0}
    circuit_open = world.circuit_open(bad.listener)
    for delivery_id, _, status, count, _, _ in rows:
        log = attempts.get(delivery_id, [])
        waiting = circuit_open and status == "pending"  # for the probe: attempts unspent
        # (a probe may be in flight: claimed, so counted, but not on record yet)
        assert len(log) == count or (waiting and len(log) == count - 1), (bad.name, delivery_id, log)
        failed = [a for a in log if a[1] is None or not 200 <= a[1] < 300]
        figures["failed_attempts"] += len(failed)
        assert not any((a[2] or "").startswith("not sent") for a in failed), (bad.name, failed)
        # On a busy machine any attempt may time out: it is retried like the case's own error.
        assert all(bad.error in (a[2] or "") or "timed out" in (a[2] or "") for a in failed), \
            (bad.name, failed)
        # Each attempt is recorded after it ends: the next came after the retry's delay.
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(log)]
        assert all(gap >= 0.8 * delay for gap, delay in zip(gaps, SCHEDULE, strict=False)), gaps
        assert not gaps or gaps[0] >= 0.95 * bad.first_gap, (bad.name, gaps)
        if waiting:
            assert count <= ATTEMPTS, (bad.name, status, count)
        elif bad.outcome == "dead":
            assert (status, count) == ("dead", ATTEMPTS), (bad.name, status, count)
        elif bad.outcome == "dead-at-once":  # not retried (but after a timeout)
            assert status == "dead" and bad.error in (log[-1][2] or ""), (bad.name, status, log)
        elif bad.outcome == "delivered":
            assert status == "delivered" and count <= ATTEMPTS, (bad.name, status, count, log)
        elif bad.outcome == "retried":  # delivered in the end, or dead after the whole schedule
            assert (status, count) in {("dead", ATTEMPTS)} | {("delivered", n)
                                                              for n in range(1, ATTEMPTS + 1)}
        else:  # gone: the first answers are dead letters, the rest held for a resume
            assert status == "pending" or (status, log[-1][1]) == ("dead", 410), (bad.name, log)
        figures["delivered" if status == "delivered" else "dead" if status == "dead"
                else "waiting" if waiting else "held"] += 1
    return figures


def run_cast(world: World, relays: Any, tmp_path: Any, cases: list[str], *, concurrency: int,
             rows: int, bad_events: int) -> tuple[float, dict[str, tuple[Bad, dict[str, int]]]]:
    """Healthy deliveries/s without, then with the bad listeners; checks each bad one."""
    world.setup(delivery(timeout=TIMEOUT, retry_schedule=SCHEDULE, concurrency=concurrency,
                         listener_concurrency=16))
    healthy = world.receiver()
    healthy.on("/healthy", answer(delay=0.002))
    world.add_listener(healthy.url("/healthy"))
    cast = Cast(world, healthy, tmp_path)
    relay = relays(world)
    every = rows // bad_events
    alone = healthy_rate(world, healthy, write_phase(world, 1, rows, every), 1, rows)
    bads = [b for b in (cast.make(name) for name in cases) if b is not None]
    for bad in bads:
        bad.listener = world.add_listener(bad.url, "--match", "name=startswith:b")
    accompanied = healthy_rate(world, healthy, write_phase(world, rows + 1, rows, every), rows + 1, rows)
    print(f"healthy deliveries/s alone {alone:.0f}, with {len(bads)} bad listeners {accompanied:.0f}")
    wait_until(world.settled, timeout=120, interval=0.2,
               message="every bad listener's events retried and settled")
    lost, duplicates = check_delivered(healthy.hits("/healthy"),
                                       {("insert", i) for i in range(1, 2 * rows + 1)})
    assert (lost, duplicates) == (0, 0)
    assert healthy.hits("/stolen") == [], "a redirect was followed"
    results = {bad.name: (bad, check_bad(world, bad, bad_events)) for bad in bads}
    if "endless" in results:
        per_request = cast.bad.pushed["/endless"] / max(1, len(cast.bad.hits("/endless")))
        assert per_request < 64 << 20, "the relay read far past its cap"
        assert peak_rss_mb(relay.proc.pid) < 400, peak_rss_mb(relay.proc.pid)
        responses = world.conn.execute(
            "SELECT max(length(a.response)) FROM cdc_hooks.attempt_log a JOIN cdc_hooks.deliveries d"
            " ON d.id = a.delivery_id WHERE d.listener_id = %s",
            (results["endless"][0].listener,)).fetchone()
        assert responses == (world.config.delivery.max_response_bytes,)  # type: ignore[union-attr]
        results["endless"][1]["pushed_mb_per_request"] = int(per_request / (1 << 20))
    if "gone" in results:
        gone = results["gone"][0]
        assert world.scalar("SELECT state FROM cdc_hooks.listeners WHERE id = %s",
                            gone.listener) == "disabled"
        status = world.cli("status")
        assert re.search(rf"^{gone.listener}\s.*disabled \(receiver answered 410 Gone\)",
                         status.stdout, re.MULTILINE), status.stdout
        assert len(cast.bad.hits("/gone")) <= 16, "sent on after the 410"
    assert relay.running and "Traceback" not in relay.log(), relay.log()
    cast.close()
    world.assert_no_leaks()
    return accompanied / alone, results


def note(bad: Bad, figures: dict[str, int], ratio: float) -> str:
    ends = ", ".join(f"{n} {k}" for k, n in figures.items()
                     if k in ("delivered", "dead", "held") and n)
    if figures["waiting"]:
        ends += f"{', ' if ends else ''}{figures['waiting']} waiting for the probe (circuit open)"
    extra = ""
    if "pushed_mb_per_request" in figures:
        extra = f"; at most {figures['pushed_mb_per_request']} MB pushed per request before the hang-up"
    if bad.outcome == "gone":
        extra = "; listener disabled, shown by `status`"
    if figures["failed_attempts"]:
        extra += f"; {figures['failed_attempts']} failed attempts, each a request"
    return f"{ends}{extra}; healthy listener at {ratio:.0%} of its speed alone"


def test_misbehaving_receivers_all_at_once(world, relays, tmp_path):
    rows, bad_events = scaled(1000, 4000), scaled(32, 100)
    ratio, results = run_cast(world, relays, tmp_path, BAD_CASES, concurrency=16 * (len(BAD_CASES) + 1),
                              rows=rows, bad_events=bad_events)
    for bad, figures in results.values():
        record(f"Receiver: {bad.name}", bad.injected, events=bad_events,
               faults=figures["failed_attempts"], lost=0, notes=note(bad, figures, ratio))
    record("Healthy listener beside all of them", f"{len(results)} bad listeners at once",
           events=2 * rows, faults=sum(f["failed_attempts"] for _, f in results.values()), lost=0,
           notes=f"deliveries/s with them: {ratio:.0%} of without (same run)")
    assert ratio > HEALTHY_FLOOR_ALL_AT_ONCE, ratio


@pytest.mark.skipif(not FULL, reason="full run only (CDC_HOOKS_FAULTS=full)")
@pytest.mark.parametrize("case", BAD_CASES)
def test_one_misbehaving_receiver_beside_a_healthy_one(world, relays, tmp_path, case):
    """Each bad receiver alone, with the default concurrency (64, 16 per listener)."""
    ratio, results = run_cast(world, relays, tmp_path, [case], concurrency=64, rows=4000,
                              bad_events=100)
    for bad, figures in results.values():
        record(f"Receiver alone: {bad.name}", bad.injected, events=100,
               faults=figures["failed_attempts"], lost=0, notes=note(bad, figures, ratio))
    assert ratio > HEALTHY_FLOOR, ratio


# A receiver failing a third of the requests --------------------------------------


def test_a_flaky_receiver_loses_nothing_to_dead_letters(world, relays):
    """Issue 14: a receiver failing 35% of the requests (500 on 30%, hanging past the
    timeout on 5%) through a schedule of 12 short retries. Once, its open circuit
    turned due deliveries into failed attempts without a request, and an event was
    a dead letter after 13 attempts; now the circuit trips on the failure rate too
    (a receiver answering most requests keeps it closed), and an open one defers."""
    events, retries = scaled(300, 2000), 12
    world.setup(delivery(timeout=TIMEOUT, retry_schedule=[0.2] * retries))
    receiver = world.receiver()
    receiver.on("/flaky", flaky_hanging(0.30, 0.05, TIMEOUT + 0.5, seed=14))
    listener = world.add_listener(receiver.url("/flaky"))
    relay = relays(world)
    world.insert(1, events)
    wait_until(lambda: world.scalar("SELECT count(*) FROM cdc_hooks.deliveries WHERE status ="
                                    " 'delivered'") == events, timeout=300, interval=0.2,
               message="every event delivered")
    world.wait_settled()
    rows = world.deliveries(listener)
    assert {r[2] for r in rows} == {"delivered"}, [r for r in rows if r[2] != "delivered"][:3]
    log = [a for attempts in world.attempts(listener).values() for a in attempts]
    assert not any((a[2] or "").startswith("not sent") for a in log)
    hits = receiver.hits("/flaky")
    assert len(log) == len(hits) == sum(r[3] for r in rows)  # every attempt a request
    lost, duplicates = check_delivered(hits, {("insert", i) for i in range(1, events + 1)})
    assert lost == 0
    assert relay.running and "Traceback" not in relay.log(), relay.log()
    failed = sum(1 for a in log if a[1] is None or not 200 <= a[1] < 300)
    record("Receiver: 35% failing", f"500 on 30% of requests, hangs past the {TIMEOUT:g} s timeout "
           f"on 5%; {retries} retries 0.2 s apart", events=events, faults=failed, lost=lost,
           duplicates=duplicates,
           notes=f"{events} delivered, 0 dead; at most {max(r[3] for r in rows)} attempts for an "
                 f"event, each a request; duplicates: answered after the timeout")
    world.assert_no_leaks()


# Receiver down for a long time, then back -------------------------------------


def test_receiver_down_long_then_back(world, relays):
    """A backlog piles up while the receiver is down (connections refused); once
    it is back, the backlog arrives in per-row order, never more requests at
    once than the listener's concurrency."""
    rows, updates, down = scaled(200, 1000), scaled(5, 10), float(scaled(3, 60))
    limit = 8
    # Retries every second or two at most: the backlog goes out soon after it is back.
    world.setup(delivery(timeout=TIMEOUT, retry_schedule=[0.5, 1, 2] + [2] * int(down),
                         listener_concurrency=limit))
    receiver = world.receiver()
    receiver.on("/hook", answer(delay=0.02))
    port = receiver.port
    listener = world.add_listener(receiver.url())
    receiver.stop_listening()  # down: connections refused
    relay = relays(world)
    started = time.monotonic()
    world.insert(1, rows)
    for n in range(updates - 1):
        world.conn.execute("UPDATE person SET address = %s", (f"v{n}",))
    events = rows * updates
    wait_until(lambda: world.scalar("SELECT count(*) FROM cdc_hooks.deliveries") == events,
               message="the backlog recorded")
    time.sleep(max(0.0, down - (time.monotonic() - started)))
    failed = world.scalar("SELECT count(*) FROM cdc_hooks.attempts")
    receiver.start(port)  # back
    back = time.monotonic()
    receiver.wait_ok(events, "/hook", timeout=300)
    drained = time.monotonic() - back
    world.wait_settled()

    hits = receiver.hits("/hook")
    expected = {("insert", i) for i in range(1, rows + 1)} | {("update", i) for i in range(1, rows + 1)}
    lost, duplicates = check_delivered(hits, expected)
    assert lost == 0 and len({h.json["id"] for h in hits if h.ok}) == events
    assert_row_order(hits)
    assert receiver.max_in_flight["/hook"] <= limit, receiver.max_in_flight
    assert {r[2] for r in world.deliveries(listener)} == {"delivered"}
    assert relay.running
    world.assert_no_leaks()
    record("Receiver down, then back", f"connections refused for {down:g} s while "
           f"{events:,} events queued", events=events, faults=failed, lost=lost,
           duplicates=duplicates, recovery=drained,
           notes=f"backlog delivered in per-row order; at most {receiver.max_in_flight['/hook']} "
                 f"requests at once (listener_concurrency {limit})")
