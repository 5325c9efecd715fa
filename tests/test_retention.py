"""Retention (issue 7): what `cdc-hooks prune` and the relay's schedule delete,
and what they keep, on real PostgreSQL. Ages are set by backdating rows, so
nothing waits for days; batches of 2 make every step loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from click.testing import Result
from receivers import InProcessRelay, wait_until

from cdc_hooks import retention
from cdc_hooks.config import Config, parse_config
from cdc_hooks.db import Database
from cdc_hooks.errors import ConfigError

Conn = psycopg.Connection[Any]
Cli = Callable[..., Result]

CONFIG = """
[[hooks]]
name = "ping"
provides = ["n"]

[retention]
delivered_days = 7
failed_days = 30
attempts_days = 7
events_days = 7
batch = 2
interval = 0
"""


@pytest.fixture
def config(installed: Callable[..., Config]) -> Config:
    return installed(CONFIG)


def listener(conn: Conn) -> int:
    row = conn.execute("INSERT INTO cdc_hooks.listeners (hook, url, secret) VALUES "
                       "('ping', 'http://127.0.0.1:9/', 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw')"
                       " RETURNING id").fetchone()
    assert row is not None
    return int(row[0])


def event(conn: Conn, event_id: int, days_old: float) -> int:
    conn.execute("INSERT INTO cdc_hooks.events (id, hook, kind, body, occurred_at) "
                 "VALUES (%s, 'ping', 'ping', '{}', now() - make_interval(secs => %s))",
                 (event_id, days_old * 86400))
    return event_id


def delivery(conn: Conn, event_id: int, listener_id: int, status: str,
             finished_days_ago: float | None) -> int:
    row = conn.execute(
        "INSERT INTO cdc_hooks.deliveries (event_id, listener_id, status, attempts, finished_at)"
        " VALUES (%s, %s, %s, 1, now() - make_interval(secs => %s)) RETURNING id",
        (event_id, listener_id, status,
         None if finished_days_ago is None else finished_days_ago * 86400)).fetchone()
    assert row is not None
    return int(row[0])


def attempt(conn: Conn, delivery_id: int, days_old: float) -> None:
    conn.execute("INSERT INTO cdc_hooks.attempts (delivery_id, attempted_at, duration_ms) "
                 "VALUES (%s, now() - make_interval(secs => %s), 1)", (delivery_id, days_old * 86400))


def ids(conn: Conn, table: str) -> set[int]:
    column = "delivery_id" if table == "attempts" else "id"
    return {r[0] for r in conn.execute(f"SELECT {column} FROM cdc_hooks.{table}")}


@pytest.fixture
def history(conn: Conn, config: Config) -> dict[str, int]:
    """Two listeners' worth of work of every age and kind, by name."""
    a, b = listener(conn), listener(conn)
    rows: dict[str, int] = {}
    for name, listener_id, status, days in [
        ("delivered_old", a, "delivered", 8), ("delivered_new", a, "delivered", 1),
        ("delivered_old_b", b, "delivered", 9), ("delivered_old_b2", b, "delivered", 10),
        ("delivered_old_b3", b, "delivered", 11),
        ("dead_old", a, "dead", 31), ("dead_kept", a, "dead", 10),
        ("pending_old", b, "pending", None),
    ]:
        event_id = event(conn, 1000 * (len(rows) + 1), days_old=40 if days is None else days + 1)
        rows[name] = delivery(conn, event_id, listener_id, status, days)
        rows[name + "_event"] = event_id
    rows["lonely_old"] = event(conn, 90000, days_old=8)  # no listener matched it
    rows["lonely_new"] = event(conn, 91000, days_old=1)
    for days in (8, 9, 1):
        attempt(conn, rows["dead_kept"], days)
    attempt(conn, rows["pending_old"], 20)
    return rows


def test_prune_deletes_what_is_past_retention_and_keeps_the_rest(conn, config, cli, history):
    result = cli(config, "prune")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == ("pruned 4 delivered deliveries, 1 dead letters, "
                                     "3 attempts, 6 events")
    autovacuum = conn.execute("SELECT current_setting('autovacuum')::boolean").fetchone()[0]
    assert ("warning: autovacuum is off" in result.stderr) == (not autovacuum)
    assert ids(conn, "deliveries") == {history["delivered_new"], history["dead_kept"],
                                       history["pending_old"]}
    # Events go once no delivery needs them; those of kept deliveries stay, however old.
    assert ids(conn, "events") == {history["delivered_new_event"], history["dead_kept_event"],
                                   history["pending_old_event"], history["lonely_new"]}
    # The attempt log is pruned by its own age, even for deliveries that are kept.
    assert [r[0] for r in conn.execute("SELECT attempted_at > now() - interval '2 days' "
                                       "FROM cdc_hooks.attempts")] == [True]
    again = cli(config, "prune")
    assert again.stdout.strip() == "pruned 0 delivered deliveries, 0 dead letters, 0 attempts, 0 events"


def test_a_redelivered_dead_letter_is_pending_and_never_pruned(conn, config, cli, history):
    assert cli(config, "redeliver", str(history["dead_old"])).exit_code == 0
    cli(config, "prune")
    assert history["dead_old"] in ids(conn, "deliveries")
    assert history["dead_old_event"] in ids(conn, "events")


def test_one_pruner_at_a_time(conn, config, cli, history, clean_db):
    with psycopg.connect(clean_db, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(hashtext('cdc_hooks.maintenance'))")
        result = cli(config, "prune")
        assert result.exit_code == 1
        assert "another prune is running" in result.stderr
        with Database.connect(config.dsn) as db:
            assert retention.prune(db, config.retention) is None
    assert history["delivered_old"] in ids(conn, "deliveries")  # nothing was touched


def test_stopping_between_batches(conn, config, history):
    with Database.connect(config.dsn) as db:
        pruned = retention.prune(db, config.retention, stopping=lambda: True)
    assert pruned == retention.Pruned()
    assert history["delivered_old"] in ids(conn, "deliveries")


def test_the_relay_prunes_on_its_schedule(conn, config, make_config, history):
    scheduled = make_config(CONFIG.replace("interval = 0", "interval = 3600"))
    relay = InProcessRelay(scheduled).start()
    try:
        # The first round runs as the relay connects, then once an hour.
        wait_until(lambda: history["delivered_old"] not in ids(conn, "deliveries"),
                   message="relay pruned")
        wait_until(lambda: history["lonely_old"] not in ids(conn, "events"),
                   message="relay pruned events")
    finally:
        relay.stop()
    assert history["pending_old"] in ids(conn, "deliveries")


@pytest.mark.parametrize(("body", "message"), [
    ("[retention]\ndeliverd_days = 1\n", 'unknown key "deliverd_days" (did you mean "delivered_days"?)'),
    ("[retention]\nfailed_days = 0\n", "[retention] failed_days must be between"),
    ("[retention]\nattempts_days = \"7\"\n", "[retention] attempts_days must be a number"),
    ("[retention]\nbatch = 0.5\n", "[retention] batch must be an integer"),
    ("[retention]\ninterval = -1\n", "[retention] interval must be between"),
    ("[delivery]\ndisable_after_days = -1\n", "[delivery] disable_after_days must be between"),
    ("retention = 3\n", "[retention] must be a table"),
    ('[[hooks]]\nname = "cdc_hooks.mine"\nprovides = ["x"]\n', "reserved"),
])
def test_retention_config_is_validated(body: str, message: str) -> None:
    import tomllib

    with pytest.raises(ConfigError, match=None) as caught:
        parse_config(tomllib.loads(body))
    assert message in str(caught.value)


def test_retention_defaults() -> None:
    config = parse_config({})
    assert (config.retention.delivered_days, config.retention.failed_days,
            config.retention.attempts_days, config.retention.events_days) == (7, 30, 7, 7)
    assert config.retention.interval == 600
    assert config.delivery.disable_after_days == 5
    assert parse_config({"retention": {"delivered_days": 0.5}}).retention.delivered_days == 0.5
