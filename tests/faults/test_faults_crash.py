"""Relay crashes: `cdc-hooks run` SIGKILLed again and again while a stream drains.

A SIGKILL leaves no chance to clean up: deliveries the relay had claimed stay
claimed by its ended database session until the next relay takes them over
(at its start, and every TAKEOVER_EVERY seconds), then it sends them again. So a
request that reached the receiver but whose result was not yet recorded arrives
twice, with the same webhook-id and body; nothing else may be duplicated, and
nothing may be lost.
"""

from __future__ import annotations

import random
import threading
import time

import psycopg
import pytest
from faultkit import (
    World,
    answer,
    assert_row_order,
    check_delivered,
    delivery,
    record,
    scaled,
    stream_events,
)
from receivers import wait_until

from cdc_hooks.relay.relay import TAKEOVER_EVERY

pytestmark = pytest.mark.faults


def leased_deliveries(world: World) -> set[tuple[int, int]]:
    """(event id, listener id) of deliveries claimed and not recorded: leased far
    ahead (retries in this scenario are due within a second)."""
    return {(e, lid) for e, lid in world.conn.execute(
        "SELECT event_id, listener_id FROM cdc_hooks.deliveries WHERE status = 'pending'"
        " AND attempts > 0 AND next_attempt_at > now() + interval '10 seconds'")}


def test_relay_sigkilled_repeatedly_loses_nothing(world, relays):
    rows, kills = scaled(1000, 5000), scaled(2, 10)
    # At most 8 x 100 deliveries/s: the stream lasts through the kills.
    world.setup(delivery(timeout=0.5, retry_schedule=[0.2, 0.2, 0.2],
                         listener_concurrency=8))
    receiver = world.receiver()
    receiver.on("/hook", answer(delay=0.01))  # keeps requests in flight at each kill
    listener = world.add_listener(receiver.url())
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    intervals = [rng.uniform(0.5, 2.0) for _ in range(kills)]

    # Half the stream is there before the first relay; the rest is written
    # while the relay is being killed and restarted.
    world.stream(rows // 2)
    events = 2 * rows

    def write_the_rest() -> None:
        with psycopg.connect(world.dsn, autocommit=True) as conn:
            pace = sum(intervals) / (rows // 50)
            for start in range(rows // 2 + 1, rows + 1, 100):
                world.insert(start, min(rows, start + 99), conn=conn)
                time.sleep(pace)
                world.move(start, min(rows, start + 99), conn=conn)
                time.sleep(pace)

    writer = threading.Thread(target=write_the_rest)
    relay = relays(world)
    writer.start()
    stranded: set[tuple[int, int]] = set()
    delivered_at_kill = []
    for interval in intervals:
        time.sleep(interval)
        relay.kill()
        delivered_at_kill.append(len(receiver.ok_hits()))
        stranded |= leased_deliveries(world)
        relay = relays(world)  # each relay works 0.5-2 s, then dies
    restarted = time.monotonic()
    writer.join()
    wait_until(lambda: world.settled() and len(receiver.ok_hits()) >= events, timeout=180,
               interval=0.2, message="everything delivered after the last restart")
    recovery = time.monotonic() - restarted

    hits = receiver.hits()
    lost, duplicates = check_delivered(hits, stream_events(rows))
    assert lost == 0
    assert delivered_at_kill[0] < events, "the first kill came mid-stream"
    # Only deliveries claimed and not recorded at a kill may arrive twice.
    copies: dict[str, int] = {}
    for h in receiver.ok_hits():
        copies[h.webhook_id] = copies.get(h.webhook_id, 0) + 1
    twice = {w for w, n in copies.items() if n > 1}
    assert all(tuple(int(p) for p in w[4:].split("_")) in stranded for w in twice), \
        "a delivery not in flight at a kill was sent twice"
    assert duplicates <= len(stranded)
    assert_row_order(hits)
    assert {r[2] for r in world.deliveries(listener)} == {"delivered"}
    world.assert_no_leaks()
    record("Relay SIGKILLed while a stream drains",
           f"{kills} x SIGKILL, every 0.5-2 s (seed {seed}), writes continuing",
           events=events, faults=kills, lost=lost, duplicates=duplicates, recovery=recovery,
           notes=f"{len(stranded)} deliveries claimed but unrecorded at the kills, taken over by "
                 f"the next relay (at its start, then every {TAKEOVER_EVERY:g} s); per-row order kept")
