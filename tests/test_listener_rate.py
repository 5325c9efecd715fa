"""A listener's rate limit (issue 15, item 4): at most `rate` deliveries per second,
across every relay of the database, bursts smoothed rather than dropped. Real
PostgreSQL, real relay processes and a loopback receiver that stamps arrivals.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from receivers import InProcessRelay, RelayProcesses, Reply
from test_delivery_controls import AUTH, TOKEN, add, login, stored
from test_delivery_controls import CONFIG as CONTROLS
from test_web_api import csrf_of

from cdc_hooks.client import Client
from cdc_hooks.config import Config
from cdc_hooks.db import RelayStore
from cdc_hooks.registry import Hook, Registry
from cdc_hooks.relay.pacing import Pace
from cdc_hooks.web import create_app

# As test_delivery_controls', but a 429's delivery is retried soon (its Retry-After
# then decides), and each relay claims at most 16 deliveries of a listener (8 times its
# concurrency), so that both relays of a test get some to send.
CONFIG = CONTROLS.replace("retry_schedule = [3600]", "retry_schedule = [1]\nlistener_concurrency = 2")
URL = "http://127.0.0.1:9/paced"
# Requests in any one second beyond the rate: a slot may be used up to
# pacing.LATE after its time, and the receiver's own stamps jitter on a busy machine.
TOLERANCE = 3
BAD_RATES = ["0", "-1", "abc", "nan", "inf", "1e9", "0.0001"]


@pytest.fixture
def config(installed: Callable[..., Config]) -> Config:
    return installed(CONFIG)


@pytest.fixture
def client(config: Config) -> Iterator[TestClient]:
    with TestClient(create_app(config), base_url="https://testserver") as test_client:
        yield test_client


def send_events(conn: Any, count: int) -> None:
    """`count` events of the ping hook, committed at once: a burst."""
    conn.execute("SELECT cdc_hooks.send('ping', jsonb_build_object('n', g)) "
                 "FROM generate_series(1, %s) g", (count,))


def busiest_second(stamps: list[float]) -> int:
    """The most requests that arrived within any one second."""
    stamps = sorted(stamps)
    return max(bisect.bisect_left(stamps, at + 1.0) - i for i, at in enumerate(stamps))


def attempts(conn: Any) -> list[tuple[str, int, int]]:
    """(status, attempts, deliveries) of every delivery."""
    return conn.execute("SELECT status, attempts, count(*) FROM cdc_hooks.deliveries "
                        "GROUP BY 1, 2 ORDER BY 1, 2").fetchall()


def sending_ports(pid: int, to_port: int) -> set[int]:
    """The local ports of a process's TCP connections to 127.0.0.1:to_port (Linux /proc)."""
    sockets = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            target = os.readlink(fd)
            if target.startswith("socket:["):
                sockets.add(target[len("socket:["):-1])
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        if inode in sockets and int(remote.split(":")[1], 16) == to_port:
            ports.add(int(local.split(":")[1], 16))
    return ports


# Pacing ------------------------------------------------------------------------------


def test_two_relays_share_a_listeners_rate(conn, config, cli, receiver, tmp_path):
    rate, events = 20, 100
    add(cli, config, receiver.url("/paced"), "--rate", str(rate))
    relays = RelayProcesses(tmp_path)
    try:
        running = [relays.start(config), relays.start(config)]
        send_events(conn, events)
        received = receiver.wait_for(events, "/paced", timeout=60)
        ports = [sending_ports(relay.proc.pid, receiver.port) for relay in running]  # type: ignore[union-attr]
        assert [relay.terminate() for relay in running] == [0, 0]
    finally:
        relays.cleanup()
    assert len({r.webhook_id for r in received}) == events == len(received)
    assert busiest_second([r.at for r in received]) <= rate + TOLERANCE
    # Both relays sent: each has a connection the receiver got requests on.
    used = {r.peer_port for r in received}
    assert all(mine & used for mine in ports), (ports, used)
    # Waiting for a slot failed nothing and spent no attempt.
    assert attempts(conn) == [("delivered", 1, events)]
    assert conn.execute("SELECT count(*) FROM cdc_hooks.attempt_log").fetchone() == (events,)


def test_a_429_with_retry_after_holds_a_delivery_back_on_top_of_the_rate(
        conn, config, cli, receiver):
    rate, events = 10, 20
    receiver.plan("/busy", Reply(429, headers={"Retry-After": "2"}))
    add(cli, config, receiver.url("/busy"), "--rate", str(rate))
    relay = InProcessRelay(config).start()
    try:
        send_events(conn, events)
        received = receiver.wait_for(events + 1, "/busy")
    finally:
        relay.stop()
    refused = received[0]
    [again] = [r for r in received[1:] if r.webhook_id == refused.webhook_id]
    assert refused.status == 429 and again.at - refused.at >= 2
    assert busiest_second([r.at for r in received]) <= rate + TOLERANCE
    assert attempts(conn) == [("delivered", 1, events - 1), ("delivered", 2, 1)]


def test_relays_reserve_slots_from_one_sequence_in_the_database(conn, config, cli):
    listener, _ = add(cli, config, URL, "--rate", "10")

    async def reserve() -> list[dict[int, float] | None]:
        first, second = [await RelayStore.connect(config.dsn) for _ in range(2)]
        try:
            return [await first.reserve_sends({listener: 1.0}),
                    await second.reserve_sends({listener: 1.0}),
                    await first.reserve_sends({listener: 0.5, listener + 1: 1.0})]
        finally:
            await first.close()
            await second.close()

    started = time.monotonic()
    reserved = asyncio.run(reserve())
    took = time.monotonic() - started
    # Each reservation ends where the last one did, plus its own length: no slot twice.
    ends = [answer[listener] for answer in reserved]  # type: ignore[index]
    for end, expected in zip(ends, (1.0, 2.0, 2.5), strict=True):
        assert expected - took <= end <= expected
    assert listener + 1 not in reserved[2]  # type: ignore[operator]  # no such listener
    removed = cli(config, "listeners", "remove", str(listener))
    assert removed.exit_code == 0, removed.output
    assert conn.execute("SELECT count(*) FROM cdc_hooks.listener_pace").fetchone() == (0,)


def test_a_relay_reserves_a_fifth_of_a_second_of_slots_and_forfeits_the_late_ones():
    asked: list[int] = []

    async def scenario() -> None:
        pace = Pace(20, wake=lambda: None, ask=lambda: asked.append(pace.wanted))
        now = time.monotonic()
        assert not pace.ready(now, waiting=100) and asked == [4]  # 0.2 s at 20/s
        assert not pace.ready(now, waiting=100) and asked == [4]  # asked once
        pace.reserved(ends_in=0.2)  # its slots: now, +50 ms, +100 ms, +150 ms
        first = pace.slots[0]
        assert [round(at - first, 6) for at in pace.slots] == [0, 0.05, 0.1, 0.15]
        assert abs(first - time.monotonic()) < 1
        assert pace.ready(first, waiting=100)
        pace.take()
        assert not pace.ready(first, waiting=100) and asked == [4]  # the next is 50 ms away
        # Past them all by more than LATE: forfeited, not sent in a bunch; asked again,
        # for no more slots than deliveries wait.
        assert not pace.ready(first + 0.3, waiting=2) and asked == [4, 2]
        pace.close()

    asyncio.run(scenario())


# Each interface sets, changes, lists and clears it ---------------------------------------


def test_the_cli_sets_lists_changes_and_removes_a_rate(conn, config, cli):
    listener, _ = add(cli, config, URL, "--rate", "50")
    assert stored(conn, listener, "rate") == 50
    assert "rate: 50/s" in cli(config, "listeners", "list").output
    for options, expected in ((["--rate", "2.5"], 2.5), (["--url", URL + "2"], 2.5),
                              (["--no-rate"], None)):
        result = cli(config, "listeners", "update", str(listener), *options)
        assert result.exit_code == 0, result.output
        assert stored(conn, listener, "rate") == expected
    assert "rate:" not in cli(config, "listeners", "list").output
    assert stored(conn, add(cli, config, URL)[0], "rate") is None  # the default: no limit


def test_the_api_the_client_and_python_set_change_and_clear_a_rate(conn, config, client):
    created = client.post("/api/listeners", headers=AUTH,
                          json={"hook": "ping", "url": URL, "rate": 50})
    assert created.status_code == 201 and created.json()["rate"] == 50, created.text
    path = f"/api/listeners/{created.json()['id']}"
    for body, expected in (({"rate": 2.5}, 2.5), ({"state": "paused"}, 2.5), ({"rate": None}, None)):
        answer = client.patch(path, headers=AUTH, json=body)
        assert answer.status_code == 200 and answer.json()["rate"] == expected, answer.text
    assert client.get("/api/listeners", headers=AUTH).json()[0]["rate"] is None
    spec = client.get("/openapi.json", headers=AUTH).json()["components"]["schemas"]
    assert all("rate" in spec[model]["properties"]
               for model in ("ListenerIn", "ListenerPatch", "ListenerOut"))

    api = Client("https://testserver", token=TOKEN, transport=client._transport)
    made = api.add_listener("ping", URL, rate=5)
    assert made.rate == 5
    assert api.update_listener(made.id, rate=7).rate == 7
    assert api.update_listener(made.id, rate=None).rate is None

    registry = Registry()
    registry.configure(config)
    new = Hook("ping", registry=registry).listener(url=URL, rate=0.5).save()
    assert stored(conn, new.id, "rate") == 0.5


def test_the_web_form_sets_shows_changes_and_clears_a_rate(conn, config, client):
    login(client)
    assert 'name="rate"' in client.get("/hooks/ping/listen").text
    csrf = csrf_of(client)
    created = client.post("/hooks/ping/listen", data={"csrf": csrf, "url": URL, "rate": "12.5"})
    assert created.status_code == 200, created.text
    [listener] = [row[0] for row in conn.execute("SELECT id FROM cdc_hooks.listeners")]
    assert stored(conn, listener, "rate") == 12.5
    assert "rate: 12.5/s" in client.get("/listeners").text
    edit = client.get(f"/listeners/{listener}/edit").text
    assert 'name="rate" value="12.5"' in edit
    for typed, expected in (("3", 3), ("", None)):
        saved = client.post(f"/listeners/{listener}/edit",
                            data={"csrf": csrf, "url": URL, "rate": typed}, follow_redirects=False)
        assert saved.status_code == 303, saved.text
        assert stored(conn, listener, "rate") == expected


# Bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("value", BAD_RATES)
def test_a_bad_rate_is_refused_by_the_cli_naming_the_option(conn, config, cli, value):
    result = cli(config, "listeners", "add", "ping", URL, f"--rate={value}")
    assert result.exit_code == 2 and "rate" in result.stderr, result.output
    assert conn.execute("SELECT count(*) FROM cdc_hooks.listeners").fetchone() == (0,)
    listener, _ = add(cli, config, URL, "--rate", "5")
    result = cli(config, "listeners", "update", str(listener), f"--rate={value}")
    assert result.exit_code == 2 and "rate" in result.stderr, result.output
    assert stored(conn, listener, "rate") == 5


def test_rate_and_no_rate_together_are_refused(conn, config, cli):
    listener, _ = add(cli, config, URL, "--rate", "5")
    result = cli(config, "listeners", "update", str(listener), "--rate", "6", "--no-rate")
    assert result.exit_code == 2 and "give --rate or --no-rate, not both" in result.stderr
    assert stored(conn, listener, "rate") == 5


@pytest.mark.parametrize("value", [0, -1, "50", True, 1e9, 0.0001])
def test_a_bad_rate_is_a_422_naming_the_field(conn, config, client, value):
    answer = client.post("/api/listeners", headers=AUTH,
                         json={"hook": "ping", "url": URL, "rate": value})
    assert answer.status_code == 422 and "body.rate" in answer.json()["detail"], answer.text
    assert conn.execute("SELECT count(*) FROM cdc_hooks.listeners").fetchone() == (0,)
    created = client.post("/api/listeners", headers=AUTH,
                          json={"hook": "ping", "url": URL, "rate": 5}).json()
    answer = client.patch(f"/api/listeners/{created['id']}", headers=AUTH, json={"rate": value})
    assert answer.status_code == 422 and "body.rate" in answer.json()["detail"], answer.text
    assert stored(conn, created["id"], "rate") == 5


@pytest.mark.parametrize(("typed", "message"), [
    ("abc", "rate: &#39;abc&#39; is not a number of deliveries per second"),
    ("0", "rate must be a number of deliveries per second from 0.001 to 100000, not 0.0"),
])
def test_a_bad_rate_in_the_web_form_is_shown_and_nothing_is_stored(conn, config, client, typed,
                                                                    message):
    login(client)
    csrf = csrf_of(client)
    answer = client.post("/hooks/ping/listen", data={"csrf": csrf, "url": URL, "rate": typed})
    assert answer.status_code == 422 and message in answer.text, answer.text
    assert f'name="rate" value="{typed}"' in answer.text  # as typed, to be corrected
    assert conn.execute("SELECT count(*) FROM cdc_hooks.listeners").fetchone() == (0,)
