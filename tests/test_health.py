"""Auto-disable (issue 7): a listener failing every attempt for days is
disabled with an event on the built-in hook cdc_hooks.listener_disabled, as on
410 Gone; resuming sends what is pending. Real PostgreSQL, real relay and
receivers; days pass by backdating rows."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import psycopg
from click.testing import Result
from receivers import InProcessRelay, Reply, wait_until

from cdc_hooks import health
from cdc_hooks import install as installer
from cdc_hooks.config import Config
from cdc_hooks.db import Database

Conn = psycopg.Connection[Any]
Cli = Callable[..., Result]

CONFIG = """
[[hooks]]
name = "ping"
provides = ["n"]

[delivery]
allow_private_networks = true
retry_schedule = [3600, 3600]
timeout = 2

[retention]
interval = {interval}
"""


def configure(make_config: Callable[..., Config], interval: float = 0) -> Config:
    config = make_config(CONFIG.format(interval=interval))
    installer.install(config)
    return config


def add(cli: Cli, config: Config, hook: str, url: str) -> int:
    result = cli(config, "listeners", "add", hook, url)
    assert result.exit_code == 0, result.output
    return int(re.search(r"listener (\d+) added", result.stdout).group(1))  # type: ignore[union-attr]


def failing(conn: Conn, listener_id: int, *, dead: bool = False) -> int:
    """A delivery of listener_id that failed and waits an hour for its retry (or died)."""
    row = conn.execute("SELECT coalesce(max(id), 0) + 1000 FROM cdc_hooks.events").fetchone()
    event_id = int(row[0])  # type: ignore[index]
    conn.execute("INSERT INTO cdc_hooks.events (id, hook, kind, body, occurred_at) "
                 "VALUES (%s, 'ping', 'ping', '{\"n\": 1}', now())", (event_id,))
    row = conn.execute(
        "INSERT INTO cdc_hooks.deliveries (event_id, listener_id, status, attempts, "
        "next_attempt_at, finished_at) VALUES (%s, %s, %s, 2, now() + interval '1 hour', %s) "
        "RETURNING id", (event_id, listener_id, "dead" if dead else "pending",
                         "now" if dead else None)).fetchone()
    return int(row[0])  # type: ignore[index]


def age(conn: Conn, listener_id: int, days: float = 6) -> None:
    """Days pass: the listener unchanged, its failure streak begun, that long ago."""
    conn.execute("UPDATE cdc_hooks.listeners SET updated_at = now() - make_interval(days => %s) "
                 "WHERE id = %s", (days, listener_id))
    conn.execute("UPDATE cdc_hooks.listener_health SET failing_since = now() - "
                 "make_interval(days => %s) WHERE listener_id = %s", (days, listener_id))


def check(config: Config, days: float = 5) -> list[health.Disabled]:
    with Database.connect(config.dsn) as db:
        return health.check(db, days)


def state(conn: Conn, listener_id: int) -> tuple[str, str | None]:
    row = conn.execute("SELECT state, disabled_reason FROM cdc_hooks.listeners WHERE id = %s",
                       (listener_id,)).fetchone()
    assert row is not None
    return row[0], row[1]


def disabled_events(conn: Conn) -> list[dict[str, Any]]:
    return [json.loads(r[0])["data"] for r in conn.execute(
        "SELECT payload::text FROM cdc_hooks.outbox WHERE kind = 'cdc_hooks.listener_disabled' "
        "ORDER BY id")]


def test_failing_for_days_disables_with_an_event(conn, make_config, cli):
    config = configure(make_config)
    bad = add(cli, config, "ping", "http://127.0.0.1:9/bad")
    failing(conn, bad)
    assert check(config) == []  # the streak starts now
    age(conn, bad)
    [gone] = check(config)
    assert (gone.listener_id, gone.reason) == (bad, "every attempt failed for 5 days")
    assert state(conn, bad) == ("disabled", "every attempt failed for 5 days")
    assert disabled_events(conn) == [{"listener_id": bad, "hook": "ping",
                                      "url": "http://127.0.0.1:9/bad",
                                      "reason": "every attempt failed for 5 days"}]
    assert gone.event_id is not None
    assert check(config) == []  # once
    listing = cli(config, "listeners", "list").stdout
    assert re.search(rf"^{bad}\s.*disabled \(every attempt failed for 5 days\)", listing, re.M)
    assert "every attempt failed for 5 days" in cli(config, "status").stdout


def test_what_keeps_a_listener_enabled(conn, make_config, cli):
    config = configure(make_config)
    recovered, resumed, idle, young = (add(cli, config, "ping", f"http://127.0.0.1:9/{n}")
                                       for n in range(4))
    for listener_id in (recovered, resumed, idle, young):
        failing(conn, listener_id)
    assert check(config) == []
    for listener_id in (recovered, resumed, idle):
        age(conn, listener_id)
    age(conn, young, days=4)
    # A success since the last check ends the streak.
    conn.execute("INSERT INTO cdc_hooks.deliveries (event_id, listener_id, status, finished_at) "
                 "VALUES (1, %s, 'delivered', now())", (recovered,))
    # Resumed (or edited) within the period: it gets the whole period again.
    conn.execute("UPDATE cdc_hooks.listeners SET updated_at = now() WHERE id = %s", (resumed,))
    # Not failing any more (nothing retrying, nothing given up since the last check).
    conn.execute("DELETE FROM cdc_hooks.deliveries WHERE listener_id = %s", (idle,))
    assert check(config) == []
    assert {state(conn, i)[0] for i in (recovered, resumed, idle, young)} == {"active"}
    assert check(config, days=0) == []  # 0: never disable
    assert disabled_events(conn) == []


def test_an_open_circuit_is_failing_though_its_deliveries_wait_without_attempts(
        conn, make_config, cli):
    """Issue 14: while a listener's circuit is open its due deliveries wait for the
    probe, and no attempt is recorded; it fails still, and ends disabled as before.
    Resuming it closes its circuit."""
    config = configure(make_config)
    bad = add(cli, config, "ping", "http://127.0.0.1:9/bad")
    held = failing(conn, bad)
    conn.execute("UPDATE cdc_hooks.deliveries SET next_attempt_at = now() WHERE id = %s", (held,))
    conn.execute("INSERT INTO cdc_hooks.circuits (listener_id, failures, open_until, pause)"
                 " VALUES (%s, 5, now() + interval '1 minute', 60)", (bad,))
    assert check(config) == []  # the streak starts now
    age(conn, bad)
    [gone] = check(config)
    assert gone.listener_id == bad
    assert cli(config, "listeners", "resume", str(bad)).exit_code == 0
    assert conn.execute("SELECT count(*) FROM cdc_hooks.circuits").fetchone() == (0,)
    conn.execute("INSERT INTO cdc_hooks.circuits (listener_id, failures, open_until, pause)"
                 " VALUES (%s, 5, now() + interval '1 minute', 60)", (bad,))
    result = cli(config, "listeners", "update", str(bad), "--url", "http://127.0.0.1:9/new")
    assert result.exit_code == 0, result.output  # another receiver: its circuit starts closed
    assert conn.execute("SELECT count(*) FROM cdc_hooks.circuits").fetchone() == (0,)


def test_resume_sends_what_is_pending_and_leaves_dead_letters(conn, make_config, cli):
    config = configure(make_config)
    bad = add(cli, config, "ping", "http://127.0.0.1:9/bad")
    pending, dead = failing(conn, bad), failing(conn, bad, dead=True)
    check(config)
    age(conn, bad)
    assert len(check(config)) == 1
    assert cli(config, "listeners", "resume", str(bad)).exit_code == 0
    rows = {r[0]: r[1:] for r in conn.execute(
        "SELECT id, status, attempts, next_attempt_at <= now() FROM cdc_hooks.deliveries "
        "WHERE listener_id = %s", (bad,))}
    assert rows[pending] == ("pending", 0, True)  # due now, a fresh budget
    assert rows[dead] == ("dead", 2, False)  # dead letters wait for `redeliver`
    assert check(config) == []  # resumed just now: a whole period again


def test_the_relay_disables_resumes_and_reports_on_its_schedule(conn, make_config, cli, receiver):
    config = configure(make_config, interval=0.2)
    receiver.set_default("/down", Reply(503))
    down = add(cli, config, "ping", receiver.url("/down"))
    add(cli, config, "cdc_hooks.listener_disabled", receiver.url("/ops"))
    relay = InProcessRelay(config).start()
    try:
        assert cli(config, "send", "ping", "n:=1").exit_code == 0
        receiver.wait_for(1, "/down")
        wait_until(lambda: conn.execute(
            "SELECT failing FROM cdc_hooks.listener_health WHERE listener_id = %s",
            (down,)).fetchone() == (True,), message="health checked")
        age(conn, down)
        [ops] = receiver.wait_for(1, "/ops")
        assert ops.json["hook"] == "cdc_hooks.listener_disabled"
        assert ops.json["data"] == {"listener_id": down, "hook": "ping", "url": receiver.url("/down"),
                                    "reason": "every attempt failed for 5 days"}
        assert state(conn, down)[0] == "disabled"
        # Fixed, and resumed: the delivery waiting an hour for its retry goes at once.
        receiver.set_default("/down", Reply(200))
        assert cli(config, "listeners", "resume", str(down)).exit_code == 0
        wait_until(lambda: [r.status for r in receiver.received("/down")] == [503, 200],
                   message="pending delivery sent on resume")
    finally:
        relay.stop()


def test_410_gone_disables_with_the_same_event(conn, make_config, cli, receiver):
    config = configure(make_config)
    receiver.set_default("/gone", Reply(410))
    gone = add(cli, config, "ping", receiver.url("/gone"))
    add(cli, config, "cdc_hooks.listener_disabled", receiver.url("/ops"))
    relay = InProcessRelay(config).start()
    try:
        assert cli(config, "send", "ping", "n:=1").exit_code == 0
        [ops] = receiver.wait_for(1, "/ops")
    finally:
        relay.stop()
    assert ops.json["data"] == {"listener_id": gone, "hook": "ping", "url": receiver.url("/gone"),
                                "reason": "receiver answered 410 Gone"}
    assert state(conn, gone) == ("disabled", "receiver answered 410 Gone")


def test_prune_by_hand_checks_health_too(conn, make_config, cli):
    config = configure(make_config)
    bad = add(cli, config, "ping", "http://127.0.0.1:9/bad")
    failing(conn, bad)
    assert cli(config, "prune").stdout.startswith("pruned ")
    age(conn, bad)
    result = cli(config, "prune")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == f"listener {bad} disabled: every attempt failed for 5 days"
