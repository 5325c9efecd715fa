"""`cdc-hooks run --workers N` (relay/workers.py): N relay processes that deliver
together, stop together, and report through the first one's /metrics."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from ops import add_listener, scrape, value, wait_settled
from receivers import Reply, free_port, wait_until

from cdc_hooks import metrics
from cdc_hooks.config import Config, DeliveryConfig
from cdc_hooks.relay.workers import share

pytest_plugins = ["ops_fixtures"]  # fixtures: setup, receiver, start_relay


def workers(pid: int) -> list[int]:
    """The worker processes `run` (pid) spawned (not multiprocessing's resource tracker)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            command = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2:].split()[1]) == pid and b"spawn_main" in command:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return status[status.rindex(")") + 2] != "Z"


def relay_sessions(conn) -> int:
    return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND pid <> pg_backend_pid()").fetchone()[0]


def test_workers_deliver_once_each_and_metrics_count_every_worker(conn, setup, cli, receiver,
                                                                    start_relay):
    config = setup()
    listener = add_listener(cli, config, receiver.url("/ok"))
    port = free_port()
    relay = start_relay(config, "--workers", "2", "--metrics", f"127.0.0.1:{port}")
    assert relay.proc is not None
    wait_until(lambda: len(workers(relay.proc.pid)) == 1 and relay_sessions(conn) >= 8,
               message="a second worker with its own sessions")
    conn.execute("INSERT INTO person (name) SELECT 'p' || i FROM generate_series(1, 300) i")
    wait_settled(conn)
    assert len(receiver.received("/ok")) == 300
    assert len({r.webhook_id for r in receiver.received("/ok")}) == 300

    def delivered() -> float | None:
        samples = scrape(f"http://127.0.0.1:{port}/metrics")
        return value(samples, "cdc_hooks_deliveries_total", hook="person", listener=listener,
                     outcome="delivered")
    wait_until(lambda: delivered() == 300, message="300 delivered in the summed metrics")

    worker = workers(relay.proc.pid)[0]
    assert relay.terminate(timeout=20) == 0, relay.log()
    assert not alive(worker)
    assert "Traceback" not in relay.log()
    for number in (1, 2):  # each worker's lines say whose they are
        assert f"cdc_hooks.relay [worker {number}]: relay connected" in relay.log()


def test_workers_share_the_listener_limit(conn, setup, cli, receiver, start_relay):
    config = setup("listener_concurrency = 4\n")  # in [delivery]: for all relays together
    add_listener(cli, config, receiver.url("/slow"))
    receiver.set_default("/slow", Reply(200, delay=1.5))
    relay = start_relay(config, "--workers", "2")
    assert relay.proc is not None
    wait_until(lambda: workers(relay.proc.pid) and relay_sessions(conn) >= 8,
               message="the second worker connected")
    conn.execute("INSERT INTO person (name) SELECT 'p' || i FROM generate_series(1, 20) i")
    receiver.wait_for_arrivals(4)
    time.sleep(0.4)  # a fifth request could only start before the first ones end if over the limit
    assert receiver.arrivals == 4


def test_a_worker_that_dies_stops_the_command_with_status_1(setup, start_relay):
    relay = start_relay(setup(), "--workers", "2")
    assert relay.proc is not None
    wait_until(lambda: workers(relay.proc.pid), message="the second worker")
    os.kill(workers(relay.proc.pid)[0], signal.SIGKILL)
    assert relay.proc.wait(20) == 1
    assert "relay worker 2 exited with status -9: stopping the others" in relay.log()
    assert "Traceback" not in relay.log()


def test_workers_stop_when_the_first_is_killed(conn, setup, start_relay):
    relay = start_relay(setup(), "--workers", "2")
    assert relay.proc is not None
    wait_until(lambda: workers(relay.proc.pid) and relay_sessions(conn) >= 8,
               message="the second worker connected")
    worker = workers(relay.proc.pid)[0]
    relay.kill()
    wait_until(lambda: not alive(worker), timeout=20, message="the orphaned worker to stop")
    assert "the first relay worker is gone: stopping" in relay.log()


def test_concurrency_is_split_among_workers_not_the_listener_limit() -> None:
    """listener_concurrency holds for all relays of the database (their listener slots)."""
    config = Config(delivery=DeliveryConfig(concurrency=64, listener_concurrency=5))
    assert (share(config, 2).delivery.concurrency, share(config, 2).delivery.listener_concurrency) \
        == (32, 5)
    assert share(config, 128).delivery.concurrency == 1  # never 0
    assert share(config, 1) == config


def test_metrics_add_up_the_workers_reports(monkeypatch) -> None:
    mine, other = metrics._Stats(), metrics._Stats()
    monkeypatch.setattr(metrics, "STATS", mine)
    monkeypatch.setattr(metrics, "WORKERS", {2: other})
    for stats, delivered, lag in ((mine, 3, 0.01), (other, 4, 0.2)):
        stats.connected, stats.loop_lag = True, lag
        stats.events["person"] = delivered
        listener = stats.listeners[("person", 1)] = metrics._ListenerStats()
        listener.outcomes["delivered"] = delivered
        listener.buckets[0] = delivered
        listener.seconds = delivered / 1000
    other.connected = False
    total = metrics._all_workers()
    assert total.events == {"person": 7}
    assert total.listeners[("person", 1)].outcomes["delivered"] == 7
    assert total.listeners[("person", 1)].buckets[0] == 7
    assert (total.connected, total.loop_lag) == (False, 0.2)
    assert mine.events == {"person": 3}
